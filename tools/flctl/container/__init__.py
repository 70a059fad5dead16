"""OCI images of fl-aggregator and fl-agent, built here from Debian packages without any registry
(``flctl container build``), and a fleet of them under podman (``flctl container fleet``).

platforms.py  the architectures images are built for: Debian/OCI names, pip wheel tags, binfmt emulation
podman.py     running podman with this project's containers.conf (runtime, ulimits), one error type
base.py       the base image: a minimal bookworm with python3 from mmdebstrap, imported into podman
payload.py    what goes on top: the fl-edge wheel and its dependencies as a venv, users, entry scripts
build.py      the images, their labels and health checks, per architecture, and the manifest lists
prune.py      removing what a build replaced (older images of a name, older bases) and counting the bytes freed
fleet.py      an aggregator and N agents from deploy/podman/ under `podman kube play`
cli.py        the command line
"""

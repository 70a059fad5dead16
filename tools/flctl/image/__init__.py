"""The development image of the appliance (``flctl image build``), from Debian packages, without bitbake.

build.py    the build: steps, cache keys, the finished image's files and manifest (``ImageArtifacts``)
cache.py    the content-addressed cache of build artifacts
rootfs.py   the root file system: mmdebstrap base, dependency venv, fl-agent, overlays
kernel.py   the Debian kernel (vmlinux for direct boot), its modules and the busybox initramfs
disk.py     ext4 file systems, the GPT disk image and its bmap
cli.py      the command line
"""

"""Running podman with the settings this kind of machine needs, written once into a containers.conf.

Two settings matter (measured, ../shared/RIG-FACTS.md and docs/containers.md): the OCI runtime is runc when it
is installed (crun refuses a hybrid cgroup v1/v2 host), and containers get open-file and process limits that
the machine lets root set: podman's default nofile of 1048576 is refused where root's hard limit is lower, and
in the sandbox this was measured in, runc was refused an nproc of 96367 (this process's own limit) but not
20000. podman reads the file through CONTAINERS_CONF, so flctl does not touch /etc/containers.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

from flctl.image.cache import cache_root

# The highest open-file and process limits handed to containers (plenty for one service each).
ULIMIT_CAP = 20000


class ContainerError(RuntimeError):
    """A container build or run step failed; the message names the step and the tail of its output."""


def containers_conf(cache: Path | None = None) -> Path:
    """Write (if changed) and return the containers.conf flctl's podman calls use."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)

    def limit(pair: tuple[int, int]) -> str:
        soft, hard = (min(v, ULIMIT_CAP) if v != resource.RLIM_INFINITY else ULIMIT_CAP for v in pair)
        return f"{soft}:{hard}"

    lines = ["[containers]", f'default_ulimits = ["nofile={limit(nofile)}", "nproc={limit(nproc)}"]', "[engine]"]
    if shutil.which("runc"):
        lines.append('runtime = "runc"')
    text = "\n".join(lines) + "\n"
    path = (cache or cache_root()) / "containers" / "containers.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def podman_env(cache: Path | None = None) -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf(cache))}


def podman(*args: str, what: str, cache: Path | None = None, log: Path | None = None, timeout: float = 3600,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``podman args``; output goes to ``log`` when given (else it is returned). A failure raises
    ContainerError with ``what`` and the output's tail."""
    return run_tool(["podman", *args], what=what, env=podman_env(cache), log=log, timeout=timeout, check=check)


def run_tool(cmd: list[str], *, what: str, env: dict[str, str] | None = None, log: Path | None = None,
             timeout: float = 3600, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        raise ContainerError(f"{what}: {cmd[0]} is not installed (tools/host-packages.txt)")
    if log is None:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
        output = done.stdout + done.stderr
    else:
        with open(log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True, env=env, timeout=timeout,
                                  check=False)
        output = log.read_text()
    if check and done.returncode != 0:
        tail = "".join(output.splitlines(keepends=True)[-20:])
        where = f"; log {log}" if log else ""
        raise ContainerError(f"{what} failed (exit {done.returncode}){where}:\n{tail}")
    return done


def image_exists(ref: str, cache: Path | None = None) -> bool:
    return podman("image", "exists", ref, what="podman image exists", cache=cache, check=False).returncode == 0


def image_id(ref: str, cache: Path | None = None) -> str | None:
    """The ID of the image ``ref`` names, or None when there is none."""
    done = podman("image", "inspect", "--format={{.Id}}", ref, what=f"podman image inspect {ref}", cache=cache,
                  check=False)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def image_inspect(ref: str, cache: Path | None = None) -> dict:
    out = podman("image", "inspect", ref, what=f"podman image inspect {ref}", cache=cache).stdout
    return json.loads(out)[0]

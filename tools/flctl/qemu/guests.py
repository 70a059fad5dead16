"""The guests ``flctl qemu run`` starts, and how they are stopped: the way a board is switched off.

``stop_guests`` presses each guest's power button (QMP ``system_powerdown``: systemd shuts down, the data
partition is unmounted cleanly) and waits up to a timeout for QEMU to exit, which it does once the guest has
powered off. A guest still running then is stopped (QMP ``quit``, else SIGKILL): for its data partition that
is a power cut. Ctrl-C or SIGTERM while waiting does the same at once.

Each QEMU runs in its own session, so the terminal's Ctrl-C reaches flctl only (which then stops the guests
this way) and not QEMU, which would exit at once on SIGINT.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..image.build import ImageArtifacts
from ..shutdown import StopRequested, dies_with_parent
from . import rig
from .qmp import QmpError, qmp_command

POWEROFF_TIMEOUT = 120.0  # seconds; a clean shutdown takes 5-30 s under TCG on a busy machine
QUIT_TIMEOUT = 10.0


@dataclass
class Guest:
    appliance: rig.Appliance
    process: subprocess.Popen
    qmp_socket: Path

    @property
    def running(self) -> bool:
        return self.process.poll() is None


def start_guest(
    art: ImageArtifacts, appliance: rig.Appliance, machine: rig.MachineConfig, qmp_socket: Path, console: bool
) -> Guest:
    """Start one guest; with ``console`` its serial console is also on this terminal."""
    cmd = rig.qemu_command(art, appliance, machine, qmp_socket=qmp_socket, console_on_stdio=console)
    process = subprocess.Popen(
        dies_with_parent(cmd), stdin=None if console else subprocess.DEVNULL, start_new_session=True
    )
    return Guest(appliance, process, qmp_socket)


POWERED_OFF = "powered off"
FORCED = "did not power off in time: stopped, a power cut for its data partition"


def stop_guests(
    guests: list[Guest], timeout: float = POWEROFF_TIMEOUT, report: Callable[[str], None] = print
) -> dict[str, str]:
    """Power every running guest off, forcing those still up after ``timeout``; returns each guest's outcome:
    ``POWERED_OFF`` (also for a QEMU that had already exited with 0, as it does after a poweroff from inside),
    ``FORCED``, or the exit code of a QEMU that had failed."""
    outcome = {g.appliance.name: _exit_outcome(g) for g in guests if not g.running}
    waiting = [g for g in guests if g.running]
    try:
        for g in waiting:
            try:
                qmp_command(g.qmp_socket, "system_powerdown")
            except QmpError as exc:
                report(f"{g.appliance.name}: cannot press the power button ({exc})")
        if waiting:
            report(f"powering off {', '.join(g.appliance.name for g in waiting)} (up to {timeout:.0f} s; "
                   "Ctrl-C again stops at once)")  # fmt: skip
        deadline = time.monotonic() + timeout
        while any(g.running for g in waiting) and time.monotonic() < deadline:
            time.sleep(0.2)
    except (KeyboardInterrupt, StopRequested):
        report("stopping the guests at once")
    for g in waiting:
        if g.running:
            _force_stop(g)
            outcome[g.appliance.name] = FORCED
        else:
            outcome[g.appliance.name] = _exit_outcome(g)
    return outcome


def _exit_outcome(guest: Guest) -> str:
    """QEMU exits with 0 once its guest has powered off; anything else is QEMU failing or being killed."""
    code = guest.process.returncode
    return POWERED_OFF if code == 0 else f"QEMU exited with {code}"


def _force_stop(guest: Guest) -> None:
    try:
        qmp_command(guest.qmp_socket, "quit", timeout=QUIT_TIMEOUT)
        guest.process.wait(timeout=QUIT_TIMEOUT)
    except (QmpError, subprocess.TimeoutExpired):
        guest.process.kill()
        guest.process.wait()

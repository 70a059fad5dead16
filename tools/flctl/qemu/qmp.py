"""A QMP client for one command at a time over QEMU's unix socket (``-qmp unix:PATH,server=on,wait=off``).

The rig uses it to ask a guest to power off (``system_powerdown``: the ACPI power button, which systemd
answers with a clean shutdown) and, when the guest does not, to stop the emulator (``quit``).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path


class QmpError(RuntimeError):
    """QEMU could not be reached on its QMP socket, or refused the command."""


def qmp_command(path: Path, command: str, timeout: float = 10.0) -> dict:
    """Connect, negotiate capabilities, run ``command``; returns its ``return`` value."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            stream = sock.makefile("rwb")
            _read_reply(stream, greeting=True)
            for name in ("qmp_capabilities", command):
                stream.write(json.dumps({"execute": name}).encode() + b"\n")
                stream.flush()
                reply = _read_reply(stream)
            return reply
    except OSError as exc:
        raise QmpError(f"QMP {command} on {path}: {exc}") from None


def _read_reply(stream, greeting: bool = False) -> dict:  # type: ignore[no-untyped-def]
    """The next reply (or the greeting), skipping the asynchronous events QEMU sends in between."""
    while True:
        line = stream.readline()
        if not line:
            raise QmpError("QEMU closed the QMP connection")
        message = json.loads(line)
        if greeting and "QMP" in message:
            return message
        if "error" in message:
            raise QmpError(f"QEMU refused: {message['error'].get('desc', message['error'])}")
        if "return" in message:
            return message["return"]

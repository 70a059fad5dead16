"""sd_notify(3) for a Type=notify service: READY, STATUS, WATCHDOG, STOPPING.

The protocol is one datagram to $NOTIFY_SOCKET; outside systemd the variable is unset and every call is a
no-op, so the same agent runs on a laptop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable


def notify(message: str) -> bool:
    """Send ``message`` (e.g. ``"READY=1"``) to systemd. Returns False when not running under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(message.encode(), address)
    return True


def watchdog_interval() -> float | None:
    """Half of WatchdogSec when systemd enabled the watchdog for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 / 2
    except ValueError:
        return None


async def watchdog_loop(healthy: Callable[[], bool] = lambda: True) -> None:
    """Ping the watchdog while ``healthy()`` says the agent's loop is making progress.

    A wedged main loop stops the pings and systemd restarts the service, which is the point of a watchdog:
    pinging from a loop that cannot tell whether the work is stuck would hide exactly the failure it is for.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy():
            notify("WATCHDOG=1")
        await asyncio.sleep(interval)

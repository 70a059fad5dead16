"""Loopback ports for servers that are bound a while after their port is chosen (fleets, QEMU rigs, tests).

``bind(port 0)`` hands out a port from the kernel's ephemeral range, the range every outgoing connection on
the machine also draws its local port from: between choosing it and the server binding it (seconds for an
aggregator subprocess, minutes for a QEMU guest's hostfwd), a client socket can take it. Ports are therefore
chosen at random below that range and checked free; collisions are then left to other explicit binds.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10000
_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned local ports (Linux's default when unreadable)."""
    try:
        low, high = (int(v) for v in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now and outside the ephemeral range, so no outgoing connection takes it."""
    low, _high = ephemeral_range()
    if low - LOWEST >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(LOWEST, low)
            if _is_free(host, port):
                return port
    with socket.socket() as s:  # a machine with an unusually wide ephemeral range: the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])

"""A process and its descendants, from /proc: what the benchmarks measure a server or an agent by."""

from __future__ import annotations

import contextlib
import os


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren...), from one pass over /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(entry))
    found, stack = [], list(children.get(pid, []))
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(children.get(p, []))
    return found


def pin_threads(cpus: set[int]) -> None:
    """Run every thread of this process on ``cpus`` from now on; threads and processes it starts later inherit it.

    os.sched_setaffinity(0, ...) moves the calling thread only: threads started before (OpenBLAS's, at numpy's
    import) would go on running, and spinning, on the other CPUs."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


def status_bytes(pid: int, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM...) in bytes; 0 when the process is gone."""
    return _kib_field(f"/proc/{pid}/status", field)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (its own threads, not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_status(pid: int) -> dict[str, float]:
    """``VmHWM`` and ``VmRSS`` in bytes and ``cpu_seconds`` of ``pid``: what the benchmarks sample a server by."""
    return {"VmHWM": status_bytes(pid, "VmHWM"), "VmRSS": status_bytes(pid, "VmRSS"), "cpu_seconds": cpu_seconds(pid)}


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` (shared pages split between their sharers); 0 when gone."""
    return _kib_field(f"/proc/{pid}/smaps_rollup", "Pss")


def _kib_field(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

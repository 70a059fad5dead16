"""CPU and memory budgets from cgroup v2, and a child cgroup that takes the trainer's out-of-memory kills.

systemd gives fl-agent.service its envelope (CPUQuota= -> ``cpu.max``, MemoryMax= -> ``memory.max``) and, with
``Delegate=yes``, hands the unit's cgroup to the service user. cgroup v2 forbids processes in a cgroup whose
children have controllers enabled ("no internal processes"), so the agent first moves itself into a leaf
``<unit>/agent``, enables the controllers in ``<unit>/cgroup.subtree_control`` and creates ``<unit>/trainer``
with its own ``memory.max`` (and ``memory.swap.max=0``, ``memory.oom.group=1``). A training run is a child
process placed in ``trainer`` before it receives its work, so when it allocates past the limit the kernel kills
the trainer and the agent lives on to count the kill and retry with a smaller batch.

Where nothing is delegated (a laptop, CI, a hybrid v1/v2 host whose memory controller is on v1) the same code
runs the child without a cgroup and reports the budget as *advisory*, with the reason.

Every reader takes the cgroup directory (and the locator takes the cgroupfs root and the ``/proc/self`` dir)
as arguments, so tests point them at a fake cgroupfs tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AGENT_LEAF = "agent"
TRAINER_LEAF = "trainer"
PROC_SELF = Path("/proc/self")
SYSTEM_MEMORY_PRESSURE = Path("/proc/pressure/memory")
# multiprocessing.connection.wait waits at most what poll(2) takes (2^31 - 1 ms, about 24.8 days) and raises
# OverflowError past it: the trainer's result is waited for in slices of this.
WAIT_SLICE_SECONDS = 86400.0


class CgroupFileError(ValueError):
    """A cgroup interface file is missing or does not have the format the kernel documents."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class TrainerKilled(RuntimeError):
    """The trainer child process died before returning a result.

    ``oom`` is True when the kernel's out-of-memory killer is the likely cause: the trainer cgroup's
    ``memory.events`` oom_kill count went up, or (without a cgroup to ask) the child died of SIGKILL.
    ``evidence`` says which of the two it was.
    """

    def __init__(self, *, exitcode: int | None, signal_number: int | None, oom: bool, evidence: str):
        if signal_number is not None:
            how = f"killed by {signal.Signals(signal_number).name}"
        else:
            how = f"exited with status {exitcode} without a result"
        cause = "out of memory" if oom else "not an out-of-memory kill"
        super().__init__(f"trainer {how} ({cause}: {evidence})")
        self.exitcode = exitcode
        self.signal_number = signal_number
        self.oom = oom
        self.evidence = evidence


class TrainerFailed(RuntimeError):
    """The training callable raised an exception in the child; the child's traceback is in ``child_traceback``.
    ``child_errno``: the errno of the OSError behind it (the exception itself, or the one it was raised from or while
    handling), None when there is none: what tells a card failing a read (EIO) from a bug or a bad model."""

    def __init__(self, message: str, child_traceback: str, child_errno: int | None = None):
        super().__init__(message)
        self.child_traceback = child_traceback
        self.child_errno = child_errno


def os_errno(exc: BaseException) -> int | None:
    """The errno of the first OSError in ``exc``'s chain (``exc``, then what it was raised from or while handling)."""
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen:
        if isinstance(item, OSError) and item.errno is not None:
            return item.errno
        seen.add(id(item))
        item = item.__cause__ or item.__context__
    return None


# ---------------------------------------------------------------------------------------------------------
# Parsing the interface files


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise CgroupFileError(path, "file not found") from None
    except OSError as exc:
        raise CgroupFileError(path, f"cannot read: {exc.strerror or exc}") from None


def _parse_int(path: Path, token: str, what: str) -> int:
    try:
        value = int(token)
    except ValueError:
        raise CgroupFileError(path, f"{what} {token!r} is not an integer") from None
    if value < 0:
        raise CgroupFileError(path, f"{what} {value} is negative")
    return value


def parse_limit(path: Path, text: str) -> int | None:
    """A single-value limit file (memory.max, memory.high, memory.swap.max): bytes, or None for "max"."""
    token = text.strip()
    if token == "max":
        return None
    if not token or len(token.split()) != 1:
        raise CgroupFileError(path, f"expected one integer or 'max', got {text.strip()!r}")
    return _parse_int(path, token, "limit")


@dataclass(frozen=True)
class CpuMax:
    """``cpu.max``: at most ``quota_us`` of CPU time per ``period_us`` (quota None = no limit)."""

    quota_us: int | None
    period_us: int

    @property
    def cpus(self) -> float | None:
        return None if self.quota_us is None else self.quota_us / self.period_us


def parse_cpu_max(path: Path, text: str) -> CpuMax:
    """Parse ``cpu.max``: ``"max 100000"`` or ``"50000 100000"``."""
    parts = text.split()
    if len(parts) != 2:
        raise CgroupFileError(path, f"expected '<quota|max> <period>', got {text.strip()!r}")
    period = _parse_int(path, parts[1], "period")
    if period == 0:
        raise CgroupFileError(path, "period is 0")
    quota = None if parts[0] == "max" else _parse_int(path, parts[0], "quota")
    return CpuMax(quota, period)


def parse_flat_keyed(path: Path, text: str) -> dict[str, int]:
    """A flat keyed file (cpu.stat, memory.events): one ``key value`` per line."""
    values: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CgroupFileError(path, f"line {number}: expected 'key value', got {line!r}")
        values[parts[0]] = _parse_int(path, parts[1], f"line {number}: value of {parts[0]}")
    return values


@dataclass(frozen=True)
class PressureLine:
    """One PSI line: the share of wall time (percent) some/all tasks were stalled, over 10/60/300 s."""

    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True)
class Pressure:
    some: PressureLine
    full: PressureLine | None


def parse_pressure(path: Path, text: str) -> Pressure:
    """Parse a PSI file (``memory.pressure``, ``/proc/pressure/memory``)."""
    lines: dict[str, PressureLine] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        kind, *fields = line.split()
        if kind not in ("some", "full"):
            raise CgroupFileError(path, f"line {number}: expected 'some' or 'full', got {kind!r}")
        kv: dict[str, str] = {}
        for field in fields:
            key, sep, value = field.partition("=")
            if not sep:
                raise CgroupFileError(path, f"line {number}: field {field!r} is not key=value")
            kv[key] = value
        try:
            lines[kind] = PressureLine(
                avg10=float(kv["avg10"]), avg60=float(kv["avg60"]), avg300=float(kv["avg300"]),
                total_us=int(kv["total"]),
            )
        except KeyError as exc:
            raise CgroupFileError(path, f"line {number}: missing {exc.args[0]}") from None
        except ValueError:
            raise CgroupFileError(path, f"line {number}: non-numeric value in {line!r}") from None
    if "some" not in lines:
        raise CgroupFileError(path, "no 'some' line")
    return Pressure(lines["some"], lines.get("full"))


# ---------------------------------------------------------------------------------------------------------
# One cgroup directory


@dataclass(frozen=True)
class Cgroup:
    """A cgroup v2 directory. Methods read its interface files; optional files return None when absent."""

    path: Path

    def _optional(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CgroupFileError(self.path / name, f"cannot read: {exc.strerror or exc}") from None

    def controllers(self) -> set[str]:
        """Controllers available here (``cgroup.controllers``)."""
        return set(_read(self.path / "cgroup.controllers").split())

    def subtree_control(self) -> set[str]:
        return set(_read(self.path / "cgroup.subtree_control").split())

    def procs(self) -> list[int]:
        path = self.path / "cgroup.procs"
        return [_parse_int(path, token, "pid") for token in _read(path).split()]

    def cpu_max(self) -> CpuMax | None:
        text = self._optional("cpu.max")
        return None if text is None else parse_cpu_max(self.path / "cpu.max", text)

    def _limit(self, name: str) -> int | None:
        text = self._optional(name)
        return None if text is None else parse_limit(self.path / name, text)

    def memory_max(self) -> int | None:
        """``memory.max`` in bytes; None when "max" or when the file is absent (root, no controller)."""
        return self._limit("memory.max")

    def memory_high(self) -> int | None:
        return self._limit("memory.high")

    def memory_current(self) -> int | None:
        text = self._optional("memory.current")
        if text is None:
            return None
        path = self.path / "memory.current"
        if len(text.split()) != 1:
            raise CgroupFileError(path, f"expected one integer, got {text.strip()!r}")
        return _parse_int(path, text.strip(), "usage")

    def cpu_stat(self) -> dict[str, int]:
        """``cpu.stat`` (usage_usec, user_usec, system_usec, nr_throttled, throttled_usec, ...)."""
        text = self._optional("cpu.stat")
        return {} if text is None else parse_flat_keyed(self.path / "cpu.stat", text)

    def memory_events(self) -> dict[str, int]:
        """``memory.events`` (low, high, max, oom, oom_kill, oom_group_kill); {} when absent."""
        text = self._optional("memory.events")
        return {} if text is None else parse_flat_keyed(self.path / "memory.events", text)

    def memory_pressure(self) -> Pressure | None:
        text = self._optional("memory.pressure")
        return None if text is None else parse_pressure(self.path / "memory.pressure", text)


# ---------------------------------------------------------------------------------------------------------
# Finding the process's own cgroup


def _unescape_mountinfo(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo`` octal."""
    out, i = [], 0
    while i < len(field):
        octal = field[i + 1 : i + 4]
        if field[i] == "\\" and len(octal) == 3 and octal.isdigit():
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_cgroup2_mount(mountinfo: Path = PROC_SELF / "mountinfo") -> tuple[Path, str] | None:
    """The first cgroup2 mount: (mount point, root of the hierarchy it shows), or None."""
    for number, line in enumerate(_read(mountinfo).splitlines(), 1):
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5:
            raise CgroupFileError(mountinfo, f"line {number}: not a mountinfo line: {line!r}")
        if right.split()[:1] == ["cgroup2"]:
            return Path(_unescape_mountinfo(fields[4])), _unescape_mountinfo(fields[3])
    return None


def own_cgroup_path(proc_cgroup: Path = PROC_SELF / "cgroup") -> str | None:
    """The cgroup v2 path of this process (the ``0::`` line of /proc/self/cgroup), or None."""
    for line in _read(proc_cgroup).splitlines():
        if line.startswith("0::"):
            path = line[3:].strip()
            if not path.startswith("/"):
                raise CgroupFileError(proc_cgroup, f"cgroup v2 path {path!r} is not absolute")
            return path
    return None


@dataclass(frozen=True)
class Location:
    """Where this process sits: the cgroupfs mount (``root``) and its cgroup directory (``cgroup``)."""

    root: Path
    cgroup: Path


def locate(root: Path | None = None, proc_self: Path = PROC_SELF) -> Location | str:
    """Find the process's cgroup v2 directory, or return the reason there is none.

    ``root`` overrides the mount point found in ``proc_self/mountinfo`` (tests pass a fake tree).
    """
    rel = own_cgroup_path(proc_self / "cgroup")
    if rel is None:
        return f"{proc_self / 'cgroup'} has no cgroup v2 ('0::') line"
    if root is None:
        mount = find_cgroup2_mount(proc_self / "mountinfo")
        if mount is None:
            return "no cgroup v2 hierarchy is mounted"
        root, mount_root = mount
        if mount_root != "/" and (rel == mount_root or rel.startswith(mount_root + "/")):
            rel = rel[len(mount_root) :] or "/"
    cgroup = root / rel.lstrip("/")
    if not cgroup.is_dir():
        return f"cgroup directory {cgroup} does not exist"
    return Location(root, cgroup)


# ---------------------------------------------------------------------------------------------------------
# The budget


def available_cpus() -> int:
    """CPUs this process may run on (scheduler affinity, which follows cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_for(cpu_quota: float | None, cpus: int) -> int:
    """Threads to train with: the whole CPUs of the quota, at least 1, at most the CPUs we may run on."""
    if cpu_quota is None:
        return max(1, cpus)
    return max(1, min(cpus, math.floor(cpu_quota + 1e-9)))


@dataclass(frozen=True)
class Budget:
    """The agent's envelope, as the kernel will enforce it (or not: see ``advisory``).

    ``cpu_quota`` is in CPUs (1.5 = 150 %), None when unlimited; ``memory_max`` in bytes, None when unlimited.
    Both are the tightest along the path from the agent's cgroup up to the root, so they stay right after
    the agent has moved itself into its ``agent`` leaf. ``base`` is the delegated cgroup the agent and
    trainer leaves live in (None when advisory).
    """

    cpu_quota: float | None
    threads: int
    memory_max: int | None
    memory_high: int | None
    delegated: bool
    advisory: bool
    reason: str
    base: Path | None = None


def _ancestors(cgroup: Path, root: Path) -> list[Path]:
    """``cgroup`` and its parents up to and including ``root``."""
    chain = [cgroup]
    while chain[-1] != root and chain[-1].parent != chain[-1] and root in chain[-1].parents:
        chain.append(chain[-1].parent)
    return chain


def effective_limits(cgroup: Path, root: Path) -> tuple[float | None, int | None, int | None]:
    """(cpu quota in CPUs, memory.max, memory.high): the tightest values from ``cgroup`` up to ``root``."""
    cpu: float | None = None
    mem_max: int | None = None
    mem_high: int | None = None
    for directory in _ancestors(cgroup, root):
        group = Cgroup(directory)
        cpu_max = group.cpu_max()
        if cpu_max is not None and cpu_max.cpus is not None:
            cpu = cpu_max.cpus if cpu is None else min(cpu, cpu_max.cpus)
        value = group.memory_max()
        if value is not None:
            mem_max = value if mem_max is None else min(mem_max, value)
        value = group.memory_high()
        if value is not None:
            mem_high = value if mem_high is None else min(mem_high, value)
    return cpu, mem_max, mem_high


def delegation_base(cgroup: Path) -> Path:
    """The delegated cgroup: the agent's own, or its parent once the agent has moved into its leaf."""
    return cgroup.parent if cgroup.name == AGENT_LEAF else cgroup


def _not_delegated_reason(base: Path) -> str | None:
    """Why the trainer cgroup cannot be made in ``base``, or None when it can."""
    try:
        controllers = Cgroup(base).controllers()
    except CgroupFileError as exc:
        return str(exc)
    if "memory" not in controllers:
        listed = " ".join(sorted(controllers)) or "none"
        return (f"the memory controller is not available in cgroup v2 at {base} (controllers: {listed}); "
                "on a hybrid v1/v2 host it is on the v1 hierarchy")
    if not os.access(base, os.W_OK | os.X_OK):
        return f"cannot create a child cgroup in {base}: not delegated to uid {os.geteuid()}"
    for name in ("cgroup.procs", "cgroup.subtree_control"):
        if not os.access(base / name, os.W_OK):
            return f"cannot write {base / name}: not delegated to uid {os.geteuid()}"
    return None


def read_budget(root: Path | None = None, proc_self: Path = PROC_SELF, cpus: int | None = None) -> Budget:
    """Read this process's budget. Never raises for a missing or undelegated cgroup: the budget is then
    advisory and ``reason`` says why. Malformed interface files raise :class:`CgroupFileError`."""
    cpus = available_cpus() if cpus is None else cpus
    where = locate(root, proc_self)
    if isinstance(where, str):
        return Budget(None, threads_for(None, cpus), None, None, False, True, where)
    cpu, mem_max, mem_high = effective_limits(where.cgroup, where.root)
    base = delegation_base(where.cgroup)
    if base == where.root:  # moving "our" processes would move every process of the hierarchy (or container)
        why_not: str | None = (f"the agent runs in the root cgroup {base}: give it a cgroup of its own "
                               "(a systemd unit with Delegate=yes)")
    else:
        why_not = _not_delegated_reason(base)
    delegated = why_not is None
    return Budget(
        cpu_quota=cpu, threads=threads_for(cpu, cpus), memory_max=mem_max, memory_high=mem_high,
        delegated=delegated, advisory=not delegated,
        reason=f"delegated cgroup {base}" if delegated else str(why_not),
        base=base if delegated else None,
    )


@dataclass(frozen=True)
class Usage:
    """What the agent's cgroup uses now (for metrics). Fields are None where the file is absent.

    ``trainer_oom_kills`` is the kernel's raw ``oom_kill`` count of the trainer cgroup: processes killed. With
    ``memory.oom.group=1`` the kernel counts the chosen victim twice (once as victim, once as group member;
    measured on Debian's 6.1), so count OOM events from :class:`TrainerKilled` (``TrainerSandbox.oom_kills``).
    """

    memory_current: int | None
    cpu_usage_usec: int | None
    cpu_throttled_usec: int | None
    memory_pressure_some_avg10: float | None
    trainer_oom_kills: int | None
    trainer_memory_peak: int | None  # memory.peak (kernel >= 5.19): the most any training run used


def read_usage(base: Path | None) -> Usage:
    """Usage of the delegated cgroup ``base`` (agent + trainer together) and of the trainer cgroup. All None
    when ``base`` is None (an advisory budget has no cgroup to read)."""
    if base is None:
        return Usage(None, None, None, None, None, None)
    group = Cgroup(base)
    stat = group.cpu_stat()
    pressure = group.memory_pressure()
    trainer = Cgroup(base / TRAINER_LEAF)
    has_trainer = trainer.path.is_dir()
    events = trainer.memory_events() if has_trainer else {}
    return Usage(
        memory_current=group.memory_current(),
        cpu_usage_usec=stat.get("usage_usec"),
        cpu_throttled_usec=stat.get("throttled_usec"),
        memory_pressure_some_avg10=None if pressure is None else pressure.some.avg10,
        trainer_oom_kills=events.get("oom_kill") if events else None,
        trainer_memory_peak=trainer._limit("memory.peak") if has_trainer else None,
    )


# ---------------------------------------------------------------------------------------------------------
# Memory pressure


def pressure_high(threshold: float, path: Path | None = None) -> bool:
    """True when memory pressure ("some" avg10, percent of time stalled) is at or above ``threshold``.

    ``path`` is a PSI file: a cgroup's ``memory.pressure``, or by default the system-wide
    ``/proc/pressure/memory``. A kernel without PSI counts as no pressure.
    """
    path = SYSTEM_MEMORY_PRESSURE if path is None else path
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    except OSError as exc:
        if path == SYSTEM_MEMORY_PRESSURE:  # PSI compiled in but disabled (psi=0): EOPNOTSUPP
            return False
        raise CgroupFileError(path, f"cannot read: {exc.strerror or exc}") from None
    return parse_pressure(path, text).some.avg10 >= threshold


@dataclass(frozen=True)
class PressureGate:
    """Pause training while memory is under pressure. Picklable, so the trainer child can hold one and call
    :meth:`wait` between batches or epochs. Returns the seconds it waited (at most ``max_wait``)."""

    threshold: float = 10.0
    max_wait: float = 30.0
    poll_interval: float = 1.0
    path: Path | None = None

    def wait(self, clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> float:
        start = clock()
        while pressure_high(self.threshold, self.path):
            waited = clock() - start
            if waited >= self.max_wait:
                log.warning("memory pressure still high after %.1f s: training goes on", waited)
                break
            sleep(min(self.poll_interval, self.max_wait - waited))
        return clock() - start

    async def wait_async(self, clock: Callable[[], float] = time.monotonic) -> float:
        """The same, for the agent's event loop."""
        start = clock()
        while pressure_high(self.threshold, self.path):
            waited = clock() - start
            if waited >= self.max_wait:
                break
            await asyncio.sleep(min(self.poll_interval, self.max_wait - waited))
        return clock() - start


def next_batch_size_after_oom(batch_size: int, minimum: int = 1, factor: float = 0.5) -> int | None:
    """The batch size to retry with after the trainer was killed for memory, or None to give up this round.

    Halving is the usual choice: activation memory is linear in the batch size, and two retries reach a
    quarter of the first attempt's memory.
    """
    if batch_size < 1 or minimum < 1:
        raise ValueError(f"batch size {batch_size} and minimum {minimum} must be >= 1")
    if not 0 < factor < 1:
        raise ValueError(f"factor {factor} must be between 0 and 1")
    if batch_size <= minimum:
        return None
    return max(minimum, min(batch_size - 1, math.floor(batch_size * factor)))


# ---------------------------------------------------------------------------------------------------------
# The trainer sandbox


def _child_main(conn: multiprocessing.connection.Connection) -> None:
    """Child side: wait for the work (sent only once we are in the trainer cgroup), run it, send the result."""
    try:
        fn, args, kwargs = conn.recv()
    except EOFError:
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as exc:  # the parent re-raises it as TrainerFailed
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), os_errno(exc)))
    else:
        try:
            conn.send(("ok", result, None, None))
        except Exception as exc:  # an unpicklable result
            conn.send(("error", f"cannot send the result back: {type(exc).__name__}: {exc}",
                       traceback.format_exc(), None))
    conn.close()


class CgroupSetupError(TrainerFailed):
    """The trainer cgroup could not be set up or the trainer not placed in it (names the file and error).
    Nothing is cached on failure: the next run tries again."""

    def __init__(self, path: Path, value: str, error: OSError):
        super().__init__(f"cannot write {value!r} to {path}: {error.strerror or error}", "")
        self.path = path
        self.errno = error.errno


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except ProcessLookupError:
        raise
    except OSError as exc:
        raise CgroupSetupError(path, value, exc) from exc


class TrainerSandbox:
    """Runs training callables in child processes inside ``<base>/trainer`` (or, advisory, without a cgroup).

    ``start_method`` "spawn" starts a fresh interpreter per run; "forkserver" forks each run from a server
    process started on first use (with ``preload`` modules imported there once), which is faster per run.

    Set-up (once, on first use): make ``<base>/agent`` and move every process of ``base`` into it, enable the
    memory (and cpu, where available) controllers for the children, make ``<base>/trainer`` with its limits.
    """

    def __init__(self, budget: Budget, memory_max: int | None, *, swap_max: int | None = 0,
                 start_method: str = "spawn", preload: Sequence[str] = ()):
        if memory_max is not None and memory_max <= 0:
            raise ValueError(f"trainer memory_max must be positive bytes, got {memory_max}")
        self.budget = budget
        self.memory_max = memory_max
        self.swap_max = swap_max
        self._context = multiprocessing.get_context(start_method)
        if preload:
            if start_method != "forkserver":
                raise ValueError(f"preload needs the forkserver start method, not {start_method!r}")
            # Modules imported once by the fork server (in the agent's cgroup) instead of by every trainer.
            self._context.set_forkserver_preload(list(preload))
        self._ready = False
        self.oom_kills = 0  # counted here for metrics: every TrainerKilled with oom=True

    @property
    def trainer_cgroup(self) -> Path | None:
        return None if self.budget.base is None else self.budget.base / TRAINER_LEAF

    def _prepare(self) -> None:
        base = self.budget.base
        if self._ready or base is None:
            return
        agent = base / AGENT_LEAF
        agent.mkdir(exist_ok=True)
        for pid in Cgroup(base).procs():
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                _write(agent / "cgroup.procs", str(pid))
        wanted = Cgroup(base).controllers() & {"cpu", "memory", "pids"}
        missing = wanted - Cgroup(base).subtree_control()
        if missing:
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(missing)))
        trainer = base / TRAINER_LEAF
        trainer.mkdir(exist_ok=True)
        _write(trainer / "memory.max", "max" if self.memory_max is None else str(self.memory_max))
        if self.swap_max is not None and (trainer / "memory.swap.max").exists():
            _write(trainer / "memory.swap.max", str(self.swap_max))
        if (trainer / "memory.oom.group").exists():  # kill the trainer's helpers with it, not one by one
            _write(trainer / "memory.oom.group", "1")
        self._ready = True
        log.info("trainer cgroup %s ready (memory.max=%s)", trainer, self.memory_max or "max")

    def _oom_events(self) -> tuple[int, int]:
        """(oom_kill, oom_group_kill) of the trainer cgroup: processes killed, group kills."""
        trainer = self.trainer_cgroup
        if trainer is None:
            return 0, 0
        events = Cgroup(trainer).memory_events()
        return events.get("oom_kill", 0), events.get("oom_group_kill", 0)

    def run(self, fn: Callable[..., Any], /, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` in a child process in the trainer cgroup and return its result.

        ``fn`` and its arguments must be picklable (a module-level function). Raises :class:`TrainerKilled`
        when the child dies without a result, :class:`TrainerFailed` when ``fn`` raised (its subclass
        :class:`CgroupSetupError` when the trainer cgroup could not be set up), TimeoutError (after killing the
        child) when ``timeout`` seconds pass.
        """
        self._prepare()
        before = self._oom_events()
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(target=_child_main, args=(child_end,), name="fl-trainer", daemon=True)
        process.start()
        child_end.close()
        try:
            trainer = self.trainer_cgroup
            if trainer is not None:
                with contextlib.suppress(ProcessLookupError):  # died at start: reported below
                    _write(trainer / "cgroup.procs", str(process.pid))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                parent_end.send((fn, args, kwargs))
            ready = _wait([parent_end, process.sentinel], timeout)
            if not ready:
                process.kill()
                raise TimeoutError(f"trainer gave no result within {timeout} s and was killed")
            message = None
            if parent_end in ready or parent_end.poll():
                with contextlib.suppress(EOFError, ConnectionResetError):
                    message = parent_end.recv()
            process.join()
        finally:
            parent_end.close()
            if process.is_alive():
                process.kill()
                process.join()
        if message is None:
            raise self._killed(process.exitcode, before)
        status, value, child_traceback, child_errno = message
        if status == "error":
            raise TrainerFailed(f"training failed in the trainer process: {value}", child_traceback, child_errno)
        return value

    def _killed(self, exitcode: int | None, oom_before: tuple[int, int]) -> TrainerKilled:
        signal_number = -exitcode if exitcode is not None and exitcode < 0 else None
        if self.trainer_cgroup is not None:
            kills, group_kills = (now - then for now, then in zip(self._oom_events(), oom_before, strict=True))
            oom = kills > 0 or group_kills > 0
            evidence = f"{self.trainer_cgroup / 'memory.events'} oom_kill +{kills}"
            if group_kills:
                evidence += f" oom_group_kill +{group_kills}"
        else:
            oom = signal_number == signal.SIGKILL
            evidence = ("SIGKILL with no cgroup to confirm (advisory budget): likely the kernel OOM killer"
                        if oom else "no cgroup accounting (advisory budget)")
        if oom:
            self.oom_kills += 1
        return TrainerKilled(exitcode=exitcode, signal_number=signal_number, oom=oom, evidence=evidence)

    def close(self) -> None:
        """Remove the trainer cgroup (it must be empty: no child running)."""
        trainer = self.trainer_cgroup
        if self._ready and trainer is not None:
            with contextlib.suppress(OSError):
                trainer.rmdir()
            self._ready = False


def _wait(objects: list[Any], timeout: float | None) -> list[Any]:
    """:func:`multiprocessing.connection.wait` for any ``timeout``: a round whose deadline is weeks away (the agent
    gives the trainer until then) is waited for in slices, not refused with OverflowError."""
    if timeout is None:
        return multiprocessing.connection.wait(objects)
    end = time.monotonic() + timeout
    while True:
        remaining = end - time.monotonic()
        ready = multiprocessing.connection.wait(objects, max(0.0, min(remaining, WAIT_SLICE_SECONDS)))
        if ready or remaining <= WAIT_SLICE_SECONDS:
            return ready


def run_in_trainer_cgroup(fn: Callable[..., Any], /, *args: Any, memory_max: int | None,
                          budget: Budget | None = None, timeout: float | None = None, **kwargs: Any) -> Any:
    """One-shot form of :meth:`TrainerSandbox.run` (reads the budget when not given)."""
    sandbox = TrainerSandbox(read_budget() if budget is None else budget, memory_max)
    return sandbox.run(fn, *args, timeout=timeout, **kwargs)

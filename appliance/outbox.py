"""A durable queue of signed updates on the data partition, delivered at least once, deduplicated by digest.

Each update is written to ``<state_dir>/outbox/`` *before* the first send: a temporary file is written and
fsynced, renamed to ``<seq>-<key>.upd`` and the directory fsynced, so after :meth:`Outbox.put` returns the
update survives a crash or a power cut. Delivery sees an update only once all three steps succeeded, and a put
that fails at any step is withdrawn and has changed nothing. The key is the hex SHA-256 of the message. The
aggregator answers an identical resend with the original receipt, so resending after a crash is safe: the outbox
delivers at least once, the aggregator's dedup by digest makes it exactly once. The file is removed (and the
directory fsynced) only after a receipt.

The delivery loop retries transient errors with capped exponential backoff and full jitter, and moves an update the
aggregator refused for good (:class:`PermanentRejection`) to ``outbox/rejected/``. An update whose file the card
fails to read (EIO) does not hold up the ones behind it; after READ_ATTEMPTS failed reads in a row, over
READ_FAILURE_SPAN_SECONDS at least, it is set aside (to ``rejected/``, or in memory when the card refuses that too),
counted as rejected ``unreadable``. The queue is bounded in messages and bytes: a put past the bound drops the
oldest pending updates once the new one is durable, counted and logged.

One process owns an outbox directory (the agent); the methods are safe to call from one event loop and from
other threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import random
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.durable import atomic_write, fsync_dir
from appliance.storage_errors import storage_reason

log = logging.getLogger(__name__)

SUFFIX = ".upd"
TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^(\d{12})-([0-9a-f]{64})\.upd$")
# Reads in a row of one update that fail (EIO) before it is set aside as unreadable. The kernel has retried each
# read already (the block layer and the MMC driver retry a failed read and reset the card), so a read that still
# fails is almost always a bad block that stays bad. Three give a card that recovers after a reset its chance while
# keeping the time lost small: each failed read can take the card's timeouts, seconds.
READ_ATTEMPTS = 3
# ... and the time those failures must span, from the first of them. Without it a card that fails every read for a
# moment (a controller reset, a brownout) failed all READ_ATTEMPTS reads of every pending update within a second or
# two (the waits between tries are jittered from 1 s), and set aside updates that read fine a moment later.
READ_FAILURE_SPAN_SECONDS = 60.0
UNREADABLE = "unreadable"  # the reason of an update set aside because it could not be read


class OutboxError(Exception):
    """An outbox operation was refused (message too large, bad key, unreadable directory)."""


class PermanentRejection(Exception):
    """Raised by a send callable when the aggregator refused the update for good (bad signature, wrong round,
    a different update already accepted for the round...). ``reason`` is the aggregator's stable reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TransientError(Exception):
    """Optional for send callables: a retryable failure with a stable ``reason`` for metrics. Any other
    exception except :class:`PermanentRejection` is retried too, counted under its class name."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def digest(message: bytes) -> str:
    """The idempotency key of a message: lowercase hex SHA-256."""
    return hashlib.sha256(message).hexdigest()



@dataclass(frozen=True)
class Entry:
    """One pending update: its order, key (SHA-256 hex) and size."""

    seq: int
    key: str
    size: int

    @property
    def name(self) -> str:
        return f"{self.seq:012d}-{self.key}{SUFFIX}"


@dataclass
class _Staged:
    """A put between its rename and its directory fsync: on disk under its final name, not pending yet. Another put
    of the same message waits for ``settled`` (set once it is pending or withdrawn)."""

    entry: Entry
    settled: threading.Event = field(default_factory=threading.Event)


@dataclass
class OutboxCounters:
    """Totals since the agent started, for the metrics module (plain attributes, read them any time)."""

    put_total: int = 0
    delivered_total: int = 0
    dropped_total: int = 0
    dropped_bytes_total: int = 0
    rejected_total: Counter[str] = field(default_factory=Counter)  # by the aggregator's reason, or UNREADABLE
    delivery_failures_total: Counter[str] = field(default_factory=Counter)  # transient, by reason
    corrupt_total: int = 0
    stale_temp_files_removed: int = 0


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter: the n-th retry waits uniform(0, min(cap, base * 2**n))."""

    base: float = 1.0
    cap: float = 300.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or self.factor < 1:
            raise ValueError(f"bad backoff: base={self.base} cap={self.cap} factor={self.factor}")

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the wait before retry number ``attempt`` (0 for the first retry)."""
        if attempt >= 64:  # avoid float overflow; the cap applies long before
            return self.cap
        return min(self.cap, self.base * self.factor**attempt)

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        return rng() * self.ceiling(attempt)


@dataclass(frozen=True)
class DeliveryReport:
    """What one :meth:`Outbox.deliver` call did, and why it returned."""

    delivered: int
    rejected: int
    failures: int
    stopped: str  # "empty", "max_failures" or "stop"


class Outbox:
    """An outbox directory (the agent uses ``<state_dir>/outbox``). Opening it removes the temp files a crash
    left behind."""

    def __init__(self, directory: Path | str, *, max_messages: int = 64, max_bytes: int = 256 * 1024 * 1024,
                 max_rejected: int = 32, clock: Callable[[], float] = time.monotonic):
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(f"outbox bounds must be >= 1 (max_messages={max_messages}, max_bytes={max_bytes})")
        self.directory = Path(directory)
        self.rejected_directory = self.directory / "rejected"
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_rejected = max_rejected
        self._clock = clock  # times failed reads (READ_FAILURE_SPAN_SECONDS)
        self.counters = OutboxCounters()
        self._lock = threading.RLock()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._entries: dict[str, Entry] = {}  # pending: durable, visible to delivery
        self._staged: dict[str, _Staged] = {}  # renamed, directory not synced yet: not pending
        self._read_failures: dict[str, tuple[int, float]] = {}  # key -> (failed reads in a row, clock at the first)
        self._next_seq = 0
        self._scan()

    # -- state ------------------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Find the pending updates and remove the temp files of puts a crash interrupted. On a failing card this
        must not stop the agent from starting (systemd would restart it into the same refusal, without heartbeats):
        a temp file the card refuses to remove (EROFS, EIO) is left for a later start, and an update whose size
        cannot be read (EIO) is set aside until the agent restarts, counted as rejected ``unreadable``."""
        removed = 0
        for path in self.directory.iterdir():
            if path.name.startswith(TMP_PREFIX):
                try:
                    path.unlink(missing_ok=True)  # a put that crashed before its rename: never acknowledged
                except OSError as exc:
                    if storage_reason(exc) is None:
                        raise
                    log.warning("outbox: cannot remove the half-written file %s (%s); left for a later start",
                                path, exc.strerror or exc)
                    continue
                removed += 1
                continue
            match = _NAME.match(path.name)
            if match is None:
                if path != self.rejected_directory:
                    log.warning("outbox: ignoring unexpected file %s", path)
                continue
            self._next_seq = max(self._next_seq, int(match[1]) + 1)
            try:
                size = path.stat().st_size
            except OSError as exc:
                if storage_reason(exc) is None:
                    raise
                self.counters.rejected_total[UNREADABLE] += 1
                log.error("outbox: update %s is unreadable (%s); set aside until the agent restarts", path,
                          exc.strerror or exc)
                continue
            entry = Entry(int(match[1]), match[2], size)
            self._entries[entry.key] = entry
        if self.rejected_directory.is_dir():  # keep sequence numbers unique across rejected/ too
            for path in self.rejected_directory.iterdir():
                match = _NAME.match(path.name)
                if match:
                    self._next_seq = max(self._next_seq, int(match[1]) + 1)
        if removed:
            log.info("outbox: removed %d half-written file(s) left by a crash", removed)
            try:
                fsync_dir(self.directory)
            except OSError as exc:  # a temp file back after a power cut is only removed again at the next start
                if storage_reason(exc) is None:
                    raise
                log.warning("outbox: cannot sync %s after removing them (%s)", self.directory, exc.strerror or exc)
        self.counters.stale_temp_files_removed += removed

    @property
    def depth(self) -> int:
        """Pending updates."""
        return len(self._entries)

    @property
    def pending_bytes(self) -> int:
        # A snapshot of the entries, taken at once: a put or a drop in another thread would change the dict while
        # a sum iterated over it ("dictionary changed size during iteration", which ended the heartbeat loop).
        return sum(entry.size for entry in list(self._entries.values()))

    def pending(self) -> list[Entry]:
        """Pending updates, oldest first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda entry: entry.seq)

    def read(self, entry: Entry) -> bytes:
        return (self.directory / entry.name).read_bytes()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    # -- put / remove -----------------------------------------------------------------------------------

    def put(self, message: bytes, key: str | None = None) -> str:
        """Store ``message`` durably and return its key. Call it before the first send.

        ``key`` may be given when the caller already hashed the message; it must be the message's SHA-256.
        Putting a message that is already pending changes nothing. The update becomes pending (visible to
        :meth:`pending` and :meth:`deliver`) only once it is durable: its file written and fsynced, renamed, the
        directory fsynced. Only then, when the queue would exceed its bounds, are the oldest pending updates dropped
        (counted in ``counters.dropped_total`` and logged). A put that raises has changed nothing: its files are
        removed and no update was dropped.
        """
        if not isinstance(message, bytes | bytearray | memoryview):
            raise TypeError(f"outbox messages are bytes, got {type(message).__name__}")
        message = bytes(message)
        actual = digest(message)
        if key is not None and key != actual:
            raise OutboxError(f"key {key!r} is not the SHA-256 of the message ({actual})")
        if len(message) > self.max_bytes:
            raise OutboxError(f"message of {len(message)} bytes exceeds the outbox bound of {self.max_bytes}")
        if actual not in self._entries:
            self._publish(message, actual)
        return actual

    def _publish(self, message: bytes, key: str) -> None:
        """Write ``message`` to a temp file of its own and fsync it, rename it to its entry's name (:meth:`_stage`),
        fsync the directory, and only then make it pending (:meth:`_commit`). The bytes and the directory are synced
        outside the lock: an fsync on an SD card can take seconds, and the delivery's reads, moves and removals (in
        worker threads of their own) take the same lock. A step that fails (a full, read-only or failing
        partition) removes what the put wrote and raises; nothing was pending, so nothing was sent."""
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{key[:16]}-", dir=self.directory)
        try:
            try:
                view = memoryview(message)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            staged = self._stage(tmp, key, len(message))
        except BaseException:
            with contextlib.suppress(OSError):  # left by a partition gone read-only: removed at the next start
                os.unlink(tmp)
            raise
        if staged is None:  # the same message is pending (durably) already: this copy is not needed
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        try:
            fsync_dir(self.directory)
        except BaseException:
            self._withdraw(staged)
            raise
        self._commit(staged)

    def _stage(self, tmp: str, key: str, size: int) -> _Staged | None:
        """Rename the synced temp file to a new entry's name, not pending yet. None when the message is pending
        already. While another put of the same message is between its rename and its commit, wait for it: it either
        committed (None) or was withdrawn (then this put stages its own copy)."""
        while True:
            with self._lock:  # dedup and the sequence number are decided here, one put at a time
                if key in self._entries:
                    return None
                other = self._staged.get(key)
                if other is None:
                    entry = Entry(self._next_seq, key, size)
                    os.rename(tmp, self.directory / entry.name)
                    self._next_seq += 1
                    staged = self._staged[key] = _Staged(entry)
                    return staged
            other.settled.wait()

    def _withdraw(self, staged: _Staged) -> None:
        """Undo a staged put whose directory fsync failed. The unlink may not be durable either (or may fail on a
        card gone read-only): a file left is found again at the next start (docs/outbox.md says what follows)."""
        with self._lock:
            del self._staged[staged.entry.key]
        with contextlib.suppress(OSError):
            os.unlink(self.directory / staged.entry.name)
        staged.settled.set()  # a put of the same message waiting for this one now stages its own copy

    def _commit(self, staged: _Staged) -> None:
        """Make a durable staged put pending, dropping the oldest pending updates when the queue exceeds its bounds."""
        with self._lock:
            entry = staged.entry
            del self._staged[entry.key]
            kept = self._make_room(entry)
            if kept:
                self._entries[entry.key] = entry
            self.counters.put_total += 1
        staged.settled.set()

    def _make_room(self, incoming: Entry) -> bool:
        """Drop the oldest updates, ``incoming`` (durable already) counted among them, until the queue is within its
        bounds; returns whether ``incoming`` was kept (it is the oldest only when a newer put committed first). The
        unlinks are made durable by the next directory fsync (a put or a removal); a power cut before it brings a
        dropped update back, to be delivered or dropped again. A drop whose unlink fails keeps that update and the
        rest: the queue stays over its bounds until a later put succeeds in dropping it."""
        queue = sorted([*self._entries.values(), incoming], key=lambda entry: entry.seq)
        total = sum(entry.size for entry in queue)
        count = len(queue)
        dropped = []
        for oldest in queue:
            if count <= self.max_messages and total <= self.max_bytes:
                break
            try:
                (self.directory / oldest.name).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("outbox full (%d messages / %d bytes max), but the oldest update %s cannot be dropped "
                            "(%s): kept", self.max_messages, self.max_bytes, oldest.key, exc.strerror or exc)
                break
            self._entries.pop(oldest.key, None)
            self._read_failures.pop(oldest.key, None)
            dropped.append(oldest)
            count -= 1
            total -= oldest.size
        self.counters.dropped_total += len(dropped)
        self.counters.dropped_bytes_total += sum(entry.size for entry in dropped)
        for entry in dropped:
            log.warning("outbox full (%d messages / %d bytes max): dropped the oldest update %s (%d bytes)",
                        self.max_messages, self.max_bytes, entry.key, entry.size)
        return incoming not in dropped

    def remove(self, key: str) -> bool:
        """Forget a delivered update (after its receipt): unlink its file and fsync the directory. Returns False when
        it was not pending. The directory is fsynced then too: a full outbox may have dropped the update while it was
        being sent, and that drop's unlink is not durable yet; unsynced, the acknowledged update would come back
        after a power cut."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                (self.directory / entry.name).unlink(missing_ok=True)
            fsync_dir(self.directory)
            return entry is not None

    def _rejected(self, entry: Entry, reason: str, detail: str) -> bool:
        """Set aside an update the aggregator refused for good, or whose bytes no longer match their name."""
        return self._set_aside(entry, reason, detail, f"update {entry.key} permanently rejected ({reason}"
                               f"{f': {detail}' if detail else ''})")

    def _trim_rejected(self) -> None:
        kept = sorted(p for p in self.rejected_directory.iterdir() if _NAME.match(p.name))
        for path in kept[: max(0, len(kept) - self.max_rejected)]:
            path.unlink(missing_ok=True)
            Path(f"{path}.reason").unlink(missing_ok=True)

    def rejected(self) -> list[tuple[str, str]]:
        """(key, reason) of the updates kept in ``rejected/``, oldest first."""
        if not self.rejected_directory.is_dir():
            return []
        out = []
        for path in sorted(self.rejected_directory.iterdir()):
            match = _NAME.match(path.name)
            if match:
                note = Path(f"{path}.reason")
                reason = (note.read_text(errors="replace").split("\n", 1)[0] if note.exists() else "") or "unknown"
                out.append((match[2], reason))
        return out

    # -- delivery ---------------------------------------------------------------------------------------

    def _first_readable(self) -> tuple[Entry | None, bytes, int]:
        """The oldest pending update that can be read, with its bytes, and how many were set aside on the way. A read
        the card fails (EIO) skips that update for now, so one bad file does not hold up the updates behind it, and
        sets it aside after READ_ATTEMPTS failures in a row over READ_FAILURE_SPAN_SECONDS. Any other OSError (a
        permission) is raised. Runs in a worker thread (:meth:`deliver`): a read on a failing card can take seconds,
        and so can the lock, held by a put's rename."""
        set_aside = 0
        for entry in self.pending():
            try:
                message = self.read(entry)
            except FileNotFoundError:  # dropped by a concurrent put
                with self._lock:
                    self._entries.pop(entry.key, None)
                continue
            except OSError as exc:
                if storage_reason(exc) is None:
                    raise
                set_aside += self._read_failed(entry, exc)
                continue
            with self._lock:
                self._read_failures.pop(entry.key, None)
            return entry, message, set_aside
        return None, b"", set_aside

    def _read_failed(self, entry: Entry, error: OSError) -> bool:
        """Count a failed read of ``entry``; it is set aside (True) once READ_ATTEMPTS reads in a row have failed over
        READ_FAILURE_SPAN_SECONDS at least."""
        now = self._clock()
        with self._lock:  # a put dropping this update forgets its count under the same lock
            failures, first = self._read_failures.get(entry.key, (0, now))
            failures += 1
            self._read_failures[entry.key] = (failures, first)
        if failures < READ_ATTEMPTS or now - first < READ_FAILURE_SPAN_SECONDS:
            log.warning("outbox: cannot read %s (%s), %d failed read(s) in a row; the updates behind it go first",
                        self.directory / entry.name, error.strerror or error, failures)
            return False
        cause = f"{failures} reads in a row failed over {now - first:.0f} s: {error.strerror or error}"
        what = f"update {self.directory / entry.name} is unreadable ({cause})"
        return self._set_aside(entry, UNREADABLE, cause, what)

    def _set_aside(self, entry: Entry, reason: str, detail: str, what: str) -> bool:
        """Take ``entry`` out of the queue for good, counted as rejected for ``reason``, and move its file to
        ``rejected/`` with a note of ``reason`` and ``detail``; one ERROR line starting with ``what``. Returns False
        when it was not pending any more (removed or dropped meanwhile). On a failing card the move itself may fail
        (EIO, EROFS): the update then stays set aside in memory only, still counted, and its file, still in the
        outbox, is tried again after a restart; this never raises. Runs in a worker thread (:meth:`deliver`)."""
        with self._lock:
            self._read_failures.pop(entry.key, None)
            if self._entries.pop(entry.key, None) is None:
                return False
            self.counters.rejected_total[reason] += 1
        try:
            self.rejected_directory.mkdir(exist_ok=True)
            os.rename(self.directory / entry.name, self.rejected_directory / entry.name)
        except OSError as exc:
            log.error("outbox: %s; set aside until the agent restarts (it cannot be moved to %s: %s)", what,
                      self.rejected_directory, exc.strerror or exc)
            return True
        log.error("outbox: %s; moved to %s", what, self.rejected_directory)
        note = self.rejected_directory / f"{entry.name}.reason"
        # For inspection, each tried whatever became of the one before (a failing card may refuse any of them): the
        # move's syncs, the note (whole or absent after a power cut: an update without one reads as reason
        # "unknown"), and the trim that keeps rejected/ to max_rejected.
        for step in (lambda: fsync_dir(self.rejected_directory), lambda: fsync_dir(self.directory),
                     lambda: atomic_write(note, f"{reason}\n{detail}\n".encode()), self._trim_rejected):
            with contextlib.suppress(OSError):
                step()
        return True

    async def deliver(
        self,
        send: Callable[[bytes], Awaitable[Any]],
        *,
        backoff: Backoff | None = None,
        max_failures: int | None = None,
        on_receipt: Callable[[str, Any], Awaitable[None] | None] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: Callable[[], float] = random.random,
        stop: Callable[[], bool] | None = None,
        in_thread: Callable[..., Awaitable[Any]] = asyncio.to_thread,
    ) -> DeliveryReport:
        """Send pending updates oldest first until the outbox is empty.

        ``send(message)`` returns the receipt, passed to ``on_receipt(key, receipt)`` (a function or a coroutine
        function, awaited), after which the update is removed. It raises :class:`PermanentRejection` for a refusal
        (the update moves to ``rejected/``); any other exception is transient: the same update is retried after a
        backoff delay. ``max_failures`` consecutive transient failures end the call (the updates stay pending), as
        does ``stop()`` returning True. Updates put while this runs are delivered in the same call.

        An update whose read fails with a storage error (EIO) is passed over for the next one; READ_ATTEMPTS failed
        reads in a row over READ_FAILURE_SPAN_SECONDS set it aside (:meth:`_set_aside`). When every pending update
        failed its read, the next try waits a backoff delay. An update set aside (refused, corrupt or unreadable)
        whose move to ``rejected/`` the card refuses stays set aside in memory, counted; that does not raise.

        Every file operation runs in ``in_thread(func, *args)``, off the event loop: the read, the move to
        ``rejected/`` and the removal (an unlink and a directory fsync), each of which can take seconds on a failing
        SD card, and would stop the agent's heartbeats and watchdog meanwhile. The event loop never takes the
        outbox's lock either. When the removal fails (say the partition went read-only) the OSError is raised: the
        update is no longer pending here, its file may remain, and a restart sends it again, which the aggregator
        answers with the same receipt.
        """
        backoff = backoff or Backoff()
        sleep = sleep or asyncio.sleep
        delivered = rejected = failures = consecutive = unreadable_passes = 0
        while True:
            if stop is not None and stop():
                return DeliveryReport(delivered, rejected, failures, "stop")
            if not self.depth:
                return DeliveryReport(delivered, rejected, failures, "empty")
            entry, message, set_aside = await in_thread(self._first_readable)
            rejected += set_aside
            if entry is None:  # every pending update failed its read: give the card a moment before the next try
                if self.depth:
                    await sleep(backoff.delay(unreadable_passes, rng))
                    unreadable_passes += 1
                continue
            unreadable_passes = 0
            if await in_thread(digest, message) != entry.key:  # about 40 ms for 4 MB on an appliance core
                self.counters.corrupt_total += 1
                rejected += await in_thread(self._rejected, entry, "corrupt",
                                            "stored bytes do not match their SHA-256 name")
                continue
            try:
                receipt = await send(message)
            except PermanentRejection as exc:
                rejected += await in_thread(self._rejected, entry, exc.reason, exc.detail)
                consecutive = 0
                continue
            except Exception as exc:
                reason = exc.reason if isinstance(exc, TransientError) else type(exc).__name__
                self.counters.delivery_failures_total[reason] += 1
                failures += 1
                consecutive += 1
                if max_failures is not None and consecutive >= max_failures:
                    log.warning("outbox: %d delivery failures in a row (last: %s), %d update(s) pending",
                                consecutive, exc, self.depth)
                    return DeliveryReport(delivered, rejected, failures, "max_failures")
                wait = backoff.delay(consecutive - 1, rng)
                log.info("outbox: delivery of %s failed (%s); retry in %.1f s", entry.key[:16], exc, wait)
                await sleep(wait)
                continue
            consecutive = 0
            if on_receipt is not None:
                noted = on_receipt(entry.key, receipt)
                if inspect.isawaitable(noted):
                    await noted
            try:  # False when a full outbox dropped it meanwhile: delivered all the same
                await in_thread(self.remove, entry.key)
            finally:  # counted with its removal, or when the removal failed: acknowledged all the same
                self.counters.delivered_total += 1
            delivered += 1

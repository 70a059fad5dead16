"""Secure-aggregation rounds on the aggregator (docs/aggregator.md "Secure aggregation", docs/protocol.md 12).

A secure round is an ordinary round of the engine (one task, one deadline, closed at its goal or deadline,
published or abandoned) whose updates arrive masked. This module runs its phases around it::

    round opens -> advertise (until every device of the goal advertised, or the phase timeout) -> roster
      -> share (until every device of the roster shared, or the phase timeout) -> routed shares
      -> masked inputs through POST /v1/updates (until all arrived, or the round's deadline)
      -> close: plan and unmask request -> unmask (until all asked answered, or the phase timeout)
      -> the weighted mean of the survivors' updates, which the engine's rule (FedAvg, FedAdam, FedYogi)
         turns into the next version exactly as it would the plain updates' mean

With ``--dp distributed`` the roster also fixes the discrete Gaussian noise each device adds to its quantised
words (``noise_sigma``, calibrated so that the whole roster's noise has noise multiplier z) and weights every
device 1 (W = 1). Before asking for the unmask the aggregator knows how many devices the sum will cover, so it
knows the noise the sum holds (fewer survivors, less noise): the round is accounted with that
(aggregator/privacy.py), and abandoned unmasked if that would take epsilon past the budget. A sum that is
unmasked and then not published (outside the bounds of honest rounds) is counted all the same: the aggregator
has seen it, and the devices' noise is what protects them from the aggregator. The ledger is told before the
masks come off (write-ahead, aggregator/privacy.py), so a crash after the unmask never leaves the sum uncounted.

What is stored: public keys, commitments, ciphertexts, masked inputs (uniform in Z_2^32), survivor lists and
shares that never reach t of both kinds for one device. The only plaintext made from updates is the unmasked
sum; it lives in memory until the engine publishes the model made from it, and nothing logs it.

Durability and restarts: every device message is stored before it is acknowledged (SQLite, the engine's
database); masked inputs go through the engine's spool like updates, whose receipts make the agents' outbox
delivery exactly-once. The roster and the unmask request are stored before anyone can read them, so after a
kill -9 the round goes on with the very same messages and the sum is recomputed from what is stored. A disk
that stops answering never holds a phase past its end by more than a phase timeout: the messages not stored by then
do not count (nor after a restart: the share phase's end and the unmask request name what does), and a record of
the round's own that is not written in that time abandons it (``store-unavailable``). A round
that cannot finish (too few devices or shares, its deadline gone during a phase) is abandoned with the reason
in its record, the status and the metrics; it is never published from a sum that is not exact, nor from one
outside the bounds every honest round keeps (aggregator/secagg_bounds.py: a device that does not follow the
protocol can write any words into its input).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import numpy as np
from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.signing import SigningKey
from prometheus_client import CollectorRegistry, Counter, Histogram

from aggregator.disk_writes import drained
from aggregator.privacy import RoundNoise, distributed_noise
from aggregator.record_checks import masked_check
from aggregator.registry import Registry
from aggregator.secagg_bounds import SumOutOfBounds, bounded_mean
from aggregator.store import DuplicateUpdate, SpoolJob, Store
from aggregator.strategies.chunks import UpdateSet
from aggregator.threadnames import name_this_thread
from appliance import wire
from appliance.errors import ProtocolError
from appliance.protocol import graph
from appliance.protocol import messages as m
from appliance.protocol.quantise import MIN_CLIP_NORM, levels_for, private_levels, sensitivity
from appliance.protocol.secagg import (
    DEFAULT_THRESHOLD_FRACTION,
    Accusation,
    Answer,
    Dealing,
    Keys,
    RoundSetup,
    RoutedShare,
    SecAggError,
    UnmaskPlan,
    judge,
    masked_with,
    plan_unmask,
    threshold_for,
    unmask_total,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEVICE_PHASES = ("advertise", "share", "masked", "unmask")
ABANDON_REASONS = ("too-few-advertised", "too-few-shared", "too-few-survivors", "too-few-shares", "deadline",
                   "privacy-budget", "unnoised", "sum-out-of-bounds", "spool-lost", "store-unavailable")
DIRECTIONS = ("received", "sent")
# Why a masked input that arrived is left out of the sum (docs/protocol.md 12.6).
EXCLUDED_REASONS = ("false-accusation", "bad-shares", "too-few-holders")

SCHEMA = """
CREATE TABLE IF NOT EXISTS secagg_rounds (
    round_id       INTEGER PRIMARY KEY,
    phase          TEXT NOT NULL,
    phase_started  REAL NOT NULL,
    phase_deadline REAL NOT NULL,
    roster         BLOB,
    request        BLOB,
    outcome        TEXT NOT NULL DEFAULT '',
    survivors      INTEGER NOT NULL DEFAULT 0,
    dropouts       TEXT NOT NULL DEFAULT '{}',
    shared         TEXT
);
CREATE TABLE IF NOT EXISTS secagg_messages (
    round_id  INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    phase     TEXT NOT NULL,
    body      BLOB NOT NULL,
    PRIMARY KEY (round_id, device_id, phase)
);
"""


class SecAggConfigError(ValueError):
    """Secure-aggregation settings that cannot work; the message names the option."""


class StoreStalled(Exception):
    """A device message whose write had not returned when its phase ended: not counted, not acknowledged (HTTP 503
    ``spool-unavailable``). Its write may still land later; the round's record says it does not count."""


@dataclass(frozen=True)
class SecAggConfig:
    """``fl-aggregator serve --secure-aggregation [--secagg-threshold F] [--secagg-neighbours K] ...``."""

    threshold: float = DEFAULT_THRESHOLD_FRACTION  # t = floor(F * (k + 1)) + 1 of a device's k + 1 holders
    neighbours: int | None = None  # k; None: 2 ceil(log2 n) (SecAgg+); 0: every device (the complete graph)
    phase_timeout: float = 30.0  # advertise, share and unmask each; masked inputs are due at the round's deadline
    max_samples: int = 4096  # W: one device's weight is min(its samples, W)

    def __post_init__(self) -> None:
        if not 0.5 <= self.threshold < 1:
            raise SecAggConfigError(f"--secagg-threshold must be in [0.5, 1), got {self.threshold}")
        if self.neighbours is not None and self.neighbours < 0:
            raise SecAggConfigError(f"--secagg-neighbours must be 0 (all) or positive, got {self.neighbours}")
        if not self.phase_timeout > 0:
            raise SecAggConfigError(f"--secagg-phase-timeout must be positive, got {self.phase_timeout}")
        if not 1 <= self.max_samples <= 2**20:
            raise SecAggConfigError(f"the weight cap must be in [1, 2^20], got {self.max_samples}")

    def degree(self, n: int) -> int:
        return n - 1 if self.neighbours == 0 else graph.effective_neighbours(n, self.neighbours)


def check_secure_strategy(strategy_cls: type, clip_norm: float, central_dp: bool) -> None:
    """Refuse, at start-up, what secure aggregation cannot run, with the reason."""
    if not getattr(strategy_cls, "sum_based", False):
        raise SecAggConfigError(
            f"--secure-aggregation needs a rule that only uses the sum of the updates (fedavg, fedadam, fedyogi): "
            f"{strategy_cls.name} looks at individual updates, which secure aggregation hides from the aggregator"
        )
    if not clip_norm >= MIN_CLIP_NORM:
        raise SecAggConfigError(f"--secure-aggregation needs --clip-norm >= {MIN_CLIP_NORM:g}: the quantisation range "
                                "comes from it")
    if central_dp:
        raise SecAggConfigError(
            "--dp central cannot be combined with --secure-aggregation: the aggregator clips each update before it "
            "adds noise, and under secure aggregation it never sees one (--dp distributed: the devices add it)"
        )


class SecAggMetrics:
    """``fl_aggregator_secagg_*``, registered in the app's registry; every series exists from the first scrape."""

    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.phase_seconds = Histogram(
            "fl_aggregator_secagg_phase_seconds", "Duration of each phase of secure rounds", ["phase"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=r,
        )
        self.dropouts = Counter(
            "fl_aggregator_secagg_dropouts_total",
            "Devices that took part in a secure round's previous phase and not in this one (share, masked, unmask)",
            ["phase"], registry=r,
        )
        self.bytes = Counter(
            "fl_aggregator_secagg_bytes_total", "Bytes of secure-aggregation messages, by phase and direction",
            ["phase", "direction"], registry=r,
        )
        self.excluded = Counter(
            "fl_aggregator_secagg_excluded_total",
            "Masked inputs left out of a sum, by reason: their device accused an honest dealer, dealt bad shares, or "
            "had too few holders left", ["reason"], registry=r,
        )
        self.abandoned = Counter(
            "fl_aggregator_secagg_abandoned_total", "Secure rounds abandoned, by reason", ["reason"], registry=r,
        )
        self.sum_devices = Histogram(
            "fl_aggregator_secagg_sum_devices", "Devices each published secure sum covers",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000), registry=r,
        )
        for phase in DEVICE_PHASES:
            self.phase_seconds.labels(phase)
            if phase != "advertise":
                self.dropouts.labels(phase)
            for direction in DIRECTIONS:
                self.bytes.labels(phase, direction)
        for reason in ABANDON_REASONS:
            self.abandoned.labels(reason)
        for reason in EXCLUDED_REASONS:
            self.excluded.labels(reason)


@dataclass(frozen=True)
class SecureOutcome:
    """What a secure round's close gives the engine: the survivors' weighted mean and total weight, or why not."""

    participants: int  # devices whose updates the sum covers (or that sent masked inputs, when abandoned)
    weight: int  # the sum of their weights, min(samples, W) each
    mean: np.ndarray | None  # float32; None: abandoned
    note: str
    noise: RoundNoise | None = None  # distributed DP: the noise the survivors' sum holds

    def updates(self) -> UpdateSet | None:
        """The sum as the rule sees it: one update, weighted by the total weight (FedAvg of it is itself)."""
        return None if self.mean is None else UpdateSet([self.mean], np.array([float(self.weight)]))


class _Abandon(Exception):
    def __init__(self, reason: str, note: str):
        super().__init__(note)
        self.reason = reason
        self.note = note


@dataclass
class SecureRound:
    """The open secure round's state (its durable twin is in ``secagg_rounds`` / ``secagg_messages``)."""

    round_id: int
    deadline: float  # masked inputs are due then: the round's deadline
    goal: int
    phase: str = "advertise"
    phase_started: float = 0.0
    phase_deadline: float = 0.0
    outcome: str = ""  # set when the round cannot finish: the reason
    advertised: dict[str, tuple[bytes, Keys]] = field(default_factory=dict)  # device -> (body, keys)
    roster: m.Roster | None = None
    roster_body: bytes = b""
    dealings: dict[int, tuple[bytes, Dealing]] = field(default_factory=dict)  # index -> (body, dealing)
    routed: dict[int, bytes] = field(default_factory=dict)  # index -> signed routed message (cache)
    # index -> (envelope, the accusations it carries)
    masked: dict[int, tuple[bytes, tuple[Accusation, ...]]] = field(default_factory=dict)
    in_flight: dict[int, tuple[bytes, asyncio.Future[bytes]]] = field(default_factory=dict)  # index -> (digest, ..)
    summed: set[int] = field(default_factory=set)  # masked inputs added to ``total`` (stored: counted from then on)
    cut: set[int] = field(default_factory=set)  # masked inputs still being stored when their phase ended: never count
    # (phase, device) -> (body, done): device messages being written; the phase's end waits a while for them
    storing: dict[tuple[str, str], tuple[bytes, asyncio.Future[None]]] = field(default_factory=dict)
    ending: bool = False  # the phase is over: its late messages are refused while the ones being stored land
    total: np.ndarray | None = None  # the sum of the committed masked inputs, uint32
    plan: UnmaskPlan | None = None
    request_body: bytes = b""
    answers: dict[int, tuple[bytes, Answer]] = field(default_factory=dict)
    dropouts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @cached_property
    def setup(self) -> RoundSetup:
        assert self.roster is not None
        return self.roster.setup()

    @property
    def shared(self) -> set[int]:
        return set(self.dealings)


class SecureRounds:
    """Runs the phases of the engine's open secure round and answers the secure-aggregation routes."""

    def __init__(self, config: SecAggConfig, engine: Any, store: Store, registry: Registry, key: SigningKey,
                 metrics: SecAggMetrics, limits: wire.Limits):
        self.config = config
        self.engine = engine
        self.store = store
        self.registry = registry
        self.key = key
        self.metrics = metrics
        self.limits = limits
        self.words = engine.models.layout.size + 1
        self.current: SecureRound | None = None
        self._changed = asyncio.Condition()
        self._driver: asyncio.Task[None] | None = None
        self._db = sqlite3.connect(store.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        if "shared" not in {row[1] for row in self._db.execute("PRAGMA table_info(secagg_rounds)")}:
            self._db.execute("ALTER TABLE secagg_rounds ADD COLUMN shared TEXT")  # a state from before the column
        self._db_lock = threading.Lock()
        # Every write goes through one thread of its own, in order: a disk that stops answering holds that thread
        # (and the writes queued behind it), never the verify pool, the event loop or the status reads.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="secagg-writer",
                                          initializer=name_this_thread)
        self._reads = sqlite3.connect(store.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._reads_lock = threading.Lock()
        self._wakers: set[asyncio.Task[None]] = set()
        self._unrecorded: dict[int, SecureRound] = {}  # abandoned rounds whose record has not landed yet

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.engine.executor, fn, *args)

    @property
    def store_timeout(self) -> float:
        """How long the aggregator waits on its own disk: one phase timeout."""
        return self.config.phase_timeout

    def _on_writer(self, what: str, fn: Callable[..., T], *args: Any) -> Future:
        """Run ``fn(*args)`` on the writer thread, after the writes queued before it, as a write under way on the
        aggregator's disk named ``what`` (``Store.writes``): a secure round's write that hangs shows, by name, in
        ``fl_aggregator_disk_wait_seconds``, /v1/status's ``disk``, /readyz and the log of a stop, as the plain
        rounds' writes do."""
        def write() -> T:
            with self.store.writes.writing(what):
                return fn(*args)

        return self._writer.submit(write)

    async def _record(self, round_id: int, what: str, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        """Write ``statements`` of the round's own record (the roster, a phase's end, the unmask request): _Abandon
        ``store-unavailable`` when the write fails, or has not returned within :attr:`store_timeout` (it goes on in
        the writer thread and lands or fails on its own; the writes queued behind it wait for it)."""
        write = asyncio.wrap_future(self._on_writer(f"the {what} of secure round {round_id}", self._write, statements))
        try:
            await asyncio.wait_for(asyncio.shield(write), self.store_timeout)
        except TimeoutError:
            write.add_done_callback(functools.partial(_log_late_write, what))
            raise _Abandon("store-unavailable", f"the {what} was not stored within {self.store_timeout:g} s: the "
                           "disk stopped answering") from None
        except (OSError, sqlite3.Error) as exc:
            raise _Abandon("store-unavailable", f"the {what} could not be stored: {exc}") from None

    def _record_later(self, round_id: int, what: str, statements: list[tuple[str, tuple[Any, ...]]]) -> Future:
        """Queue a write of the round's record without waiting for it (any thread): what the aggregator already
        acts on, such as an abandonment, which a stalled disk must not hold up; it lands after the writes before it."""
        write = self._on_writer(f"the {what} of secure round {round_id}", self._write, statements)
        write.add_done_callback(functools.partial(_log_failed_write, what))
        return write

    def _wake(self) -> None:
        """:meth:`_notify` from a done callback, which cannot await it."""
        task = asyncio.get_running_loop().create_task(self._notify())
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    # ------------------------------------------------------------------------------------------ storage

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._db_lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, values in statements:
                    self._db.execute(sql, values)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @staticmethod
    def _phase_row(sr: SecureRound, phase: str, started: float, deadline: float, dropouts: dict[str, int],
                   **columns: Any) -> tuple[str, tuple[Any, ...]]:
        """The round's row as of a phase's end: inserted when it is not there, since the round's first record is
        not waited for (:meth:`opened`) and may have failed; an UPDATE would then change nothing and say nothing."""
        names = ("round_id", "phase", "phase_started", "phase_deadline", "outcome", "dropouts", *columns)
        updates = ", ".join(f"{name}=excluded.{name}" for name in names[1:])
        return (f"INSERT INTO secagg_rounds ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) "
                f"ON CONFLICT (round_id) DO UPDATE SET {updates}",
                (sr.round_id, phase, started, deadline, sr.outcome, json.dumps(dropouts), *columns.values()))

    def _save_message(self, round_id: int, device_id: str, phase: str, body: bytes) -> None:
        self._write([("INSERT OR IGNORE INTO secagg_messages (round_id, device_id, phase, body) VALUES (?, ?, ?, ?)",
                      (round_id, device_id, phase, body))])

    async def close(self, deadline: float) -> None:
        """Shut the writer down after the writes queued on it, waiting for them until ``deadline``
        (``time.monotonic``). A write that has not returned by then (a disk that stopped answering) is left behind,
        with the connection it writes through: nothing it holds was acknowledged (aggregator/disk_writes.py)."""
        if await drained(self._writer, deadline):
            self._db.close()
        self._reads.close()

    # ---------------------------------------------------------------------------------------- lifecycle

    async def opened(self, round_: Any) -> None:
        """The engine installed ``round_`` (new, or resumed after a restart): start or resume its phases."""
        await self.stop()
        rows = await self._run(self._read, "SELECT phase, phase_started, phase_deadline, roster, request, outcome, "
                               "dropouts, shared FROM secagg_rounds WHERE round_id=?", (round_.round_id,))
        row = rows[0] if rows else None
        sr = SecureRound(round_.round_id, round_.deadline, round_.goal)
        now = time.time()
        if row is None:
            sr.phase_started, sr.phase_deadline = now, min(now + self.config.phase_timeout, round_.deadline)
            # Not waited for: the writer thread stores every later message of the round after it, and the roster
            # waits for it in turn, with the time the disk is given (_record).
            self._record_later(sr.round_id, "first record", [(
                "INSERT INTO secagg_rounds (round_id, phase, phase_started, phase_deadline) VALUES (?, ?, ?, ?)",
                (sr.round_id, sr.phase, sr.phase_started, sr.phase_deadline))])
        else:
            await self._run(self._restore, sr, row, round_)
            log.info("secure round %d resumed in phase %s", sr.round_id, sr.phase)
        self.current = sr
        if sr.outcome or sr.phase == "unmask" or (sr.phase == "masked" and len(sr.masked) == len(sr.shared) > 0):
            round_.full.set()  # nothing more to wait for before the close: the engine closes it now
        self._driver = asyncio.create_task(self._drive(sr, round_), name=f"secagg-{sr.round_id}")
        await self._notify()

    def _restore(self, sr: SecureRound, row: tuple[Any, ...], round_: Any) -> None:
        """Worker thread: the round's state from the database and the spool, after a restart."""
        phase, started, deadline, roster, request, outcome, dropouts, shared = row
        sr.phase, sr.phase_started, sr.phase_deadline, sr.outcome = phase, started, deadline, outcome
        sr.dropouts = json.loads(dropouts)
        messages = self._read("SELECT device_id, phase, body FROM secagg_messages WHERE round_id=?", (sr.round_id,))
        lookup = self.registry.signer_key
        for device_id, kind, body in messages:
            body = bytes(body)
            if kind == "advertise":
                sr.advertised[device_id] = (body, m.decode_advertise(body, lookup).keys)
        if roster is not None:
            sr.roster, sr.roster_body = m.decode_roster(bytes(roster), self.key.verify_key, self.limits), bytes(roster)
        # A masked input stored after the masked phase ended (named with the unmask request) stays out, as before
        # the restart: its device was never acknowledged, the request and its verdicts were made without it.
        late = {device for (device,) in self._read("SELECT device_id FROM left_out_updates WHERE round_id=? AND "
                                                   "reason='late'", (sr.round_id,))}
        committed = {row.device_id: row for row in self.store.round_updates(sr.round_id) if row.device_id not in late}
        sr.total = np.zeros(self.words, dtype=np.uint32)
        for device_id, kind, body in messages:
            body = bytes(body)
            if kind == "share":
                sr.dealings[sr.roster.index_of(device_id)] = (body, m.decode_shares(body, lookup, self.limits).dealing)
            elif kind == "masked" and device_id in committed:  # stored but never acknowledged: not received
                index = sr.roster.index_of(device_id)
                sr.masked[index] = (body, m.accusations_of(wire.verify(body, lookup, self.limits).payload))
                update = committed[device_id]
                np.add(sr.total, self.store.read_delta(sr.round_id, update.offset, update.length).view("<u4"),
                       out=sr.total)
            elif kind == "unmask":
                sr.answers[sr.roster.index_of(device_id)] = (body, m.decode_unmask(body, lookup, self.limits).answer)
        if shared is not None:  # the share phase's end: a set of shares stored after it (a stalled write) never counts
            routed = set(json.loads(shared))
            sr.dealings = {u: dealing for u, dealing in sr.dealings.items() if u in routed}
        round_.accepted = len(sr.masked)
        if request is not None:
            sr.request_body = bytes(request)
            decoded = m.decode_unmask_request(sr.request_body, self.key.verify_key, self.limits)
            excluded = sorted(set(sr.masked) - set(decoded.survivors))
            verdicts = judge(sr.setup, _dealings(sr), {v: accused for v, (_, accused) in sr.masked.items()})
            sr.plan = UnmaskPlan(list(decoded.survivors), list(decoded.dropped), excluded, verdicts)
            lost = [sr.roster.device_ids[v] for v in decoded.survivors if v not in sr.masked]
            if lost and not sr.outcome:
                # A survivor's masked input the spool lost (Store.recover_segment): the survivors' pairwise masks
                # with it no longer cancel, and the request that named it a survivor may already have drawn shares
                # of its self mask, so its key cannot be asked for now. Nothing exact can be unmasked.
                self._fail(sr, _Abandon("spool-lost", f"the masked inputs of survivors {', '.join(sorted(lost))} "
                                        "were lost from the spool (the disk lost or changed data it had reported "
                                        "written), so the others' sum cannot be unmasked"))

    async def stop(self) -> None:
        if self._driver is not None:
            self._driver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._driver
            self._driver = None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _drive(self, sr: SecureRound, round_: Any) -> None:
        """Advance the advertise and share phases at their deadlines (or as soon as everyone has acted)."""
        while sr.phase in ("advertise", "share") and not sr.outcome:
            remaining = self._phase_wait(sr)
            if remaining > 0 and not self._phase_complete(sr):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining), self._changed:
                        await self._changed.wait_for(lambda: self._phase_complete(sr))
            await self._drain(sr)
            try:
                if sr.phase == "advertise":
                    await self._publish_roster(sr)
                else:
                    await self._publish_routing(sr, round_)
            except _Abandon as exc:
                self._fail(sr, exc)
                round_.full.set()  # the engine closes the round now, with the reason
            await self._notify()

    def _phase_wait(self, sr: SecureRound) -> float:
        """How long to wait now for the phase's deadline: at most --secagg-phase-timeout, counted on the monotonic
        clock (asyncio's) from when the wait starts. A wall clock behind the phase's deadline on disk (a restart
        before time sync) or stepped back mid-phase then keeps the phase open one timeout, not the years it is off."""
        return min(sr.phase_deadline - time.time(), self.config.phase_timeout)

    async def _drain(self, sr: SecureRound) -> None:
        """End the intake of the phase: its late messages are refused from now on, and the ones admitted before
        (being stored: acknowledged only once stored) are waited for, up to :attr:`store_timeout`. A message whose
        write has not returned by then (a disk that stopped answering) is cut: it does not count, even if its write
        lands later, and its device is not acknowledged (:class:`StoreStalled`, HTTP 503)."""
        sr.ending = True
        pending = [waiter for _, waiter in sr.in_flight.values()] + [stored for _, stored in sr.storing.values()]
        if pending:
            await asyncio.wait(pending, timeout=self.store_timeout)
        phase = sr.phase
        cut = StoreStalled(f"not stored before the {phase} phase ended (the disk did not answer within "
                           f"{self.store_timeout:g} s of its end): it does not count in round {sr.round_id}")
        with sr.lock:  # a masked input already added to the total is stored: it counts
            late = [v for v, (_, waiter) in sr.in_flight.items() if not waiter.done() and v not in sr.summed]
            sr.cut.update(late)
        for v in late:
            _fail_future(sr.in_flight.pop(v)[1], cut)
        stalled = [key for key, (_, stored) in sr.storing.items() if not stored.done()]
        for key in stalled:
            _fail_future(sr.storing.pop(key)[1], cut)
        if late or stalled:
            ids = sr.roster.device_ids if sr.roster is not None else ()
            who = sorted([device for _, device in stalled] + [ids[v] for v in late])
            log.warning("secure round %d: the %s phase ended while the messages of %s were still being written (the "
                        "disk did not answer within %g s): they do not count", sr.round_id, phase, ", ".join(who),
                        self.store_timeout)
        await asyncio.gather(*(waiter for _, waiter in list(sr.in_flight.values())), return_exceptions=True)

    def _phase_complete(self, sr: SecureRound) -> bool:
        if sr.phase == "advertise":
            return len(sr.advertised) >= sr.goal
        if sr.phase == "share":
            return sr.roster is not None and len(sr.dealings) == sr.setup.size
        return False

    def _fail(self, sr: SecureRound, exc: _Abandon) -> None:
        """Abandon the round now (any thread): its record follows, without holding anything up on a stalled disk."""
        sr.outcome = exc.note
        self._unrecorded[sr.round_id] = sr  # the status tells of it from memory until its record lands
        row = self._phase_row(sr, sr.phase, sr.phase_started, sr.phase_deadline, sr.dropouts)
        self._record_later(sr.round_id, "abandonment", [row]).add_done_callback(
            lambda _: self._unrecorded.pop(sr.round_id, None))
        self.metrics.abandoned.labels(exc.reason).inc()
        log.warning("secure round %d cannot finish: %s", sr.round_id, exc.note)

    async def _end_phase(self, sr: SecureRound, next_phase: str, deadline: float, dropped: int, what: str,
                         also: tuple[tuple[str, tuple[Any, ...]], ...] = (), **columns: Any) -> None:
        """Record the move to ``next_phase`` (with ``columns``: the roster, the request...; and the statements
        ``also``, in the same transaction), then make it; _Abandon when the record cannot be written in time
        (:meth:`_record`)."""
        now = time.time()
        dropouts = dict(sr.dropouts)
        if sr.phase != "advertise":  # those who acted in the phase before and not in this one
            dropouts[sr.phase] = dropped
        row = self._phase_row(sr, next_phase, now, deadline, dropouts, **columns)
        await self._record(sr.round_id, what, [row, *also])
        self.metrics.phase_seconds.labels(sr.phase).observe(max(0.0, now - sr.phase_started))
        if sr.phase != "advertise":
            self.metrics.dropouts.labels(sr.phase).inc(dropped)
        sr.dropouts = dropouts
        sr.phase, sr.phase_started, sr.phase_deadline, sr.ending = next_phase, now, deadline, False

    def _minimum(self) -> int:
        return max(2, self.engine.policy.min_clients)

    async def _publish_roster(self, sr: SecureRound) -> None:
        n = len(sr.advertised)
        if n < self._minimum():
            raise _Abandon("too-few-advertised", f"{n} devices advertised keys, below the minimum of {self._minimum()}")
        ids = tuple(sorted(sr.advertised))
        k = self.config.degree(n)
        levels, max_samples, sigma = levels_for(n), self.config.max_samples, 0.0
        z = self._distributed_dp()
        if z is not None:  # device-level DP: every device weighs 1, and the room holds the noise
            (levels, sigma), max_samples = private_levels(n, z, self.words - 1), 1
        roster = m.Roster(
            sr.round_id, ids, tuple(sr.advertised[d][1] for d in ids), k, threshold_for(k, self.config.threshold),
            levels, max_samples, float(self.engine.plan.clip_norm),
            deadline=int(min(time.time() + self.config.phase_timeout, sr.deadline)), noise_sigma=sigma,
        )
        body = m.encode_roster(roster, self.key)
        await self._end_phase(sr, "share", float(roster.deadline), 0, "roster", roster=body)
        sr.roster, sr.roster_body = roster, body
        log.info("secure round %d: roster of %d devices, %d neighbours each, threshold %d", sr.round_id, n, k,
                 roster.threshold)

    async def _publish_routing(self, sr: SecureRound, round_: Any) -> None:
        shared = len(sr.dealings)
        if shared < self._minimum():
            raise _Abandon("too-few-shared", f"{shared} devices sent their shares, below the minimum of "
                           f"{self._minimum()}")
        await self._end_phase(sr, "masked", sr.deadline, sr.setup.size - shared, "end of the share phase",
                              shared=json.dumps(sorted(sr.dealings)))

    # -------------------------------------------------------------------------------------- admission

    def _open_round(self, round_id: int, phase: str) -> SecureRound:
        """The current secure round if it is ``round_id`` and in ``phase``; else the reason why not."""
        sr = self.current
        engine_round = self.engine.current
        if sr is None or engine_round is None or round_id != sr.round_id or engine_round.round_id != round_id:
            past = self.store.get_round(round_id)
            if past is not None and past.status != "open":
                raise ProtocolError("round-closed", f"round {round_id} is {past.status}")
            raise ProtocolError("wrong-round", f"round {round_id} is not open")
        if sr.outcome:
            raise ProtocolError("round-closed", f"round {round_id} cannot finish: {sr.outcome}")
        if sr.phase != phase:
            raise ProtocolError("wrong-phase", f"round {round_id} is in phase {sr.phase!r}, not {phase!r}")
        if sr.ending and phase == "masked":
            raise ProtocolError("round-closed", f"round {round_id} is closing: masked inputs were due at its deadline")
        if sr.ending:
            raise ProtocolError("wrong-phase", f"the {phase} phase of round {round_id} has ended")
        return sr

    def _count(self, phase: str, direction: str, size: int) -> None:
        self.metrics.bytes.labels(phase, direction).inc(size)

    async def _store(self, sr: SecureRound, device_id: str, phase: str, body: bytes, what: str,
                     keep: Callable[[], None]) -> None:
        """Store a device's message, then take it into the round (``keep``). One message of a device per phase
        is stored at a time: the same bytes again wait for it, other bytes are a ``duplicate`` (so the message
        stored is the one kept); and the phase does not end while one is being stored (:meth:`_drain`)."""
        key = (phase, device_id)
        if key in sr.storing:
            first, stored = sr.storing[key]
            if first != body:
                raise ProtocolError("duplicate", f"this device is already sending a different {what} in this round")
            return await asyncio.shield(stored)
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[None] = loop.create_future()
        sr.storing[key] = (body, stored)
        write = asyncio.wrap_future(self._on_writer(_message_write(sr.round_id, device_id, phase), self._save_message,
                                                    sr.round_id, device_id, phase, body))
        write.add_done_callback(functools.partial(self._message_landed, sr, key, stored, keep))
        await asyncio.shield(stored)

    def _message_landed(self, sr: SecureRound, key: tuple[str, str], stored: asyncio.Future[None],
                        keep: Callable[[], None], write: asyncio.Future[None]) -> None:
        """The write of a device message returned: take the message into the round, unless its phase's end cut it."""
        error = _error_of(write)
        if stored.done():  # cut (StoreStalled): the round went on without it, so it never counts
            if error is None:
                log.info("secure round %d: the %s message of device %s was stored after its phase ended; it does not "
                         "count", sr.round_id, key[0], key[1])
            return
        del sr.storing[key]
        if error is None:
            keep()
            stored.set_result(None)
        else:
            _fail_future(stored, error)
        self._wake()

    @staticmethod
    def _same_or_duplicate(previous: bytes | None, body: bytes, what: str) -> bool:
        """True when ``body`` repeats what was accepted (answered again, idempotent); a different one is refused."""
        if previous is None:
            return False
        if previous == body:
            return True
        raise ProtocolError("duplicate", f"this device already sent a different {what} in this round")

    async def advertise(self, body: bytes) -> dict[str, Any]:
        message = m.decode_advertise(body, self.registry.key_for)
        sr = self._open_round(message.round_id, "advertise")
        self._count("advertise", "received", len(body))
        previous = sr.advertised.get(message.device_id)
        if not self._same_or_duplicate(previous[0] if previous else None, body, "advertisement"):
            _check_keys(message.keys)
            await self._store(sr, message.device_id, "advertise", body, "advertisement",
                              lambda: sr.advertised.__setitem__(message.device_id, (body, message.keys)))
        return {"round": sr.round_id, "phase": "advertise", "accepted": message.device_id}

    async def shares(self, body: bytes) -> dict[str, Any]:
        message = await self._run(m.decode_shares, body, self.registry.key_for, self.limits)
        sr = self._open_round(message.round_id, "share")
        self._count("share", "received", len(body))
        index = sr.roster.index_of(message.device_id) if sr.roster else -1
        previous = sr.dealings.get(index)
        if not self._same_or_duplicate(previous[0] if previous else None, body, "set of shares"):
            _check_dealing(sr, index, message.dealing)
            await self._store(sr, message.device_id, "share", body, "set of shares",
                              lambda: sr.dealings.__setitem__(index, (body, message.dealing)))
        return {"round": sr.round_id, "phase": "share", "accepted": message.device_id}

    async def masked(self, body: bytearray, digest: bytes, signer: str, payload: dict[str, Any]) -> bytes:
        """A masked input, arrived through POST /v1/updates with its envelope verified (``payload``): spooled
        durably, then its signed receipt."""
        sr = self._open_round(m.round_of(payload), "masked")
        index = sr.roster.index_of(signer) if sr.roster else -1
        if index not in sr.dealings:
            raise ProtocolError("not-in-roster", f"device {signer} sent no shares in round {sr.round_id}: "
                                "nobody masked with it, so its input could never be unmasked")
        if index in sr.in_flight:
            first, waiter = sr.in_flight[index]
            if first == digest:
                return await asyncio.shield(waiter)
            raise ProtocolError("duplicate", f"device {signer} is already sending another masked input")
        if index in sr.masked:
            raise ProtocolError("duplicate", f"device {signer} already sent a masked input in round {sr.round_id}")
        message = await self._run(m.decode_masked, body, self.registry.key_for, self.words, self.limits)
        sr = self._open_round(message.round_id, "masked")  # the phase may have ended while it was decoded
        partners = set(sr.setup.graph[index]) & sr.shared
        if not {a.dealer for a in message.rejected} <= partners:
            raise ProtocolError("bad-payload", "'rejected' names devices that were no neighbour of this one")
        self._count("masked", "received", len(body))
        receipt = wire.encode_receipt(wire.Receipt(signer, sr.round_id, update_digest=digest,
                                                   accepted_at=int(time.time())), self.key)
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        sr.in_flight[index] = (digest, waiter)
        envelope = bytes(body[: len(body) - m.masked_section_bytes(self.words)])  # it holds the rejections
        words = message.words
        if sr.total is None:
            sr.total = np.zeros(self.words, dtype=np.uint32)

        def accumulate() -> None:  # the spool's finisher thread, once the input is stored
            with sr.lock:  # against the phase's end (_drain), which cuts the inputs not summed by then
                if index in sr.cut:
                    raise StoreStalled("stored after the masked phase ended: it does not count")
                assert sr.total is not None
                np.add(sr.total, words, out=sr.total)
                sr.summed.add(index)

        check = masked_check(body, envelope, digest, payload, words.nbytes)  # its signed section digest
        job = SpoolJob(digest=digest, device_id=signer, round_id=sr.round_id, num_samples=0, metrics={},
                       delta=words.view("<f4"), receipt=receipt, accepted_at=time.time(), then=accumulate,
                       check=check)  # the bits of the words, as they are: a float32 view, not a conversion
        landing = asyncio.ensure_future(self._spool_masked(sr, index, envelope, job))
        landing.add_done_callback(functools.partial(self._masked_landed, sr, index, job, envelope, message.rejected,
                                                    waiter))
        return await asyncio.shield(waiter)

    async def _spool_masked(self, sr: SecureRound, index: int, envelope: bytes, job: SpoolJob) -> None:
        """Store a masked input: its envelope (with its accusations) in the database, its words in the spool."""
        await asyncio.wrap_future(self._on_writer(_message_write(sr.round_id, job.device_id, "masked"),
                                                  self._save_message, sr.round_id, job.device_id, "masked", envelope))
        if index in sr.cut:  # the phase ended while the envelope was written: the words are not spooled
            raise StoreStalled("stored after the masked phase ended: it does not count")
        await self.store.spool(job)

    def _masked_landed(self, sr: SecureRound, index: int, job: SpoolJob, envelope: bytes, rejected: Any,
                       waiter: asyncio.Future[bytes], landing: asyncio.Future[None]) -> None:
        """A masked input's storing finished: count it and answer with its receipt, unless its phase's end cut it
        (then its device was answered already, and the input is not in the sum)."""
        error = _error_of(landing)
        if waiter.done():
            return
        sr.in_flight.pop(index, None)
        if error is not None:
            _fail_future(waiter, ProtocolError("duplicate", str(error)) if isinstance(error, DuplicateUpdate)
                         else error)
            self._wake()
            return
        sr.masked[index] = (envelope, rejected)
        waiter.set_result(job.receipt)
        round_ = self.engine.current
        round_.devices[job.device_id] = job.digest
        round_.accepted = len(sr.masked)
        self.engine.metrics.round_updates.set(round_.accepted)
        self.engine.metrics.updates_accepted.inc()
        if len(sr.masked) == len(sr.dealings):
            round_.full.set()
        self._wake()

    def stored_late(self, device_id: str, digest: bytes) -> bool:
        """Whether the masked input ``digest`` of ``device_id`` was stored after its masked phase ended (a stalled
        disk): its record holds a receipt, which was never given and must not be given to a resend."""
        sr = self.current
        roster = () if sr is None or sr.roster is None else sr.roster.device_ids
        if device_id in roster and roster.index(device_id) in sr.cut:
            return True
        return self.store.stored_late(digest)

    async def unmask(self, body: bytes) -> dict[str, Any]:
        message = await self._run(m.decode_unmask, body, self.registry.key_for, self.limits)
        sr = self._open_round(message.round_id, "unmask")
        self._count("unmask", "received", len(body))
        index = sr.roster.index_of(message.device_id) if sr.roster else -1
        if index not in sr.masked:
            raise ProtocolError("not-in-roster", f"device {message.device_id} was not asked to unmask: its masked "
                                "input did not arrive")
        previous = sr.answers.get(index)
        if not self._same_or_duplicate(previous[0] if previous else None, body, "unmask answer"):
            _check_answer(sr, index, message.answer)
            await self._store(sr, message.device_id, "unmask", body, "unmask answer",
                              lambda: sr.answers.__setitem__(index, (body, message.answer)))
        return {"round": sr.round_id, "phase": "unmask", "accepted": message.device_id}

    # ------------------------------------------------------------------------------------- publications

    async def _wait(self, round_id: int, ready: Callable[[SecureRound], bool], timeout: float) -> SecureRound:
        def check() -> bool:
            sr = self.current
            return sr is None or sr.round_id != round_id or bool(sr.outcome) or ready(sr)

        if not check() and timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout), self._changed:
                    await self._changed.wait_for(check)
        sr = self.current
        if sr is None or sr.round_id != round_id:
            past = self.store.get_round(round_id)
            if past is not None and past.status != "open":
                raise ProtocolError("round-closed", f"round {round_id} is {past.status}")
            raise ProtocolError("wrong-round", f"round {round_id} is not open")
        if sr.outcome:
            raise ProtocolError("round-closed", f"round {round_id} cannot finish: {sr.outcome}")
        return sr

    async def roster(self, round_id: int, wait: float) -> bytes | None:
        sr = await self._wait(round_id, lambda s: s.roster is not None, wait)
        if sr.roster is None:
            return None
        self._count("share", "sent", len(sr.roster_body))
        return sr.roster_body

    async def routed(self, round_id: int, device_id: str, wait: float) -> bytes | None:
        sr = await self._wait(round_id, lambda s: s.phase not in ("advertise", "share"), wait)
        if sr.phase in ("advertise", "share"):
            return None
        assert sr.roster is not None
        index = sr.roster.index_of(device_id)
        if index not in sr.dealings:
            raise ProtocolError("not-in-roster", f"device {device_id} sent no shares in round {round_id}")
        body = sr.routed.get(index)
        if body is None:
            shares = tuple(
                RoutedShare(u, sr.dealings[u][1].self_commitments, sr.dealings[u][1].key_commitments,
                            sr.dealings[u][1].ciphertexts[index])
                for u in sorted(set(sr.setup.graph[index]) & sr.shared)
            )
            routed = m.Routed(sr.round_id, device_id, index, shares, int(sr.deadline))
            body = await self._run(m.encode_routed, routed, self.key)
            sr.routed[index] = body
        self._count("masked", "sent", len(body))
        return body

    async def unmask_request(self, round_id: int, wait: float) -> bytes | None:
        sr = await self._wait(round_id, lambda s: bool(s.request_body), wait)
        if not sr.request_body:
            return None
        self._count("unmask", "sent", len(sr.request_body))
        return sr.request_body

    # ------------------------------------------------------------------------------------------- closing

    async def finish(self, round_: Any) -> SecureOutcome:
        """Close the secure round: ask for the shares, unmask the sum, and hand back the weighted mean."""
        sr = self.current
        await self.stop()
        if sr is None or sr.round_id != round_.round_id:
            return SecureOutcome(0, 0, None, "the secure round's state is gone")
        noise, written = None, False
        try:
            if sr.outcome:
                raise _Abandon("", sr.outcome)
            if sr.phase in ("advertise", "share"):
                raise _Abandon("deadline", f"the round's deadline passed in the {sr.phase} phase")
            if sr.phase == "masked":
                await self._drain(sr)  # the masked inputs being stored at the deadline count, if stored in time
                await self._ask(sr)
            assert sr.plan is not None
            noise = self._noise(sr, len(sr.plan.survivors))
            await self._collect_answers(sr)
            await self._drain(sr)  # so do the answers being stored: then the answers stay as they are
            if noise is not None and self.engine.privacy is not None:  # (a round noised before a restart without --dp)
                written = await self._run(self._count_before_unmask, sr, noise)
            mean, weight = await self._run(self._unmasked_mean, sr)
            covers = len(sr.plan.survivors)
            await self._end_phase(sr, "done", time.time(), len(sr.masked) - len(sr.answers), "unmasked round's record",
                                  survivors=covers)
        except _Abandon as exc:
            if exc.reason:
                self._fail(sr, exc)
            note = f"secure aggregation: {exc.note}"
            ledger = self.engine.privacy
            if ledger is not None and ledger.unmasking is not None and ledger.unmasking.round_id == sr.round_id:
                if written and exc.reason == "too-few-shares":  # unmask_total takes no mask off without them all
                    await self._run(self._uncount, sr.round_id)
                    self.engine.metrics.dp_epsilon.set(ledger.spent())
                else:  # the engine settles it once the round's end is recorded (rounds.py)
                    seen = written or exc.reason == "sum-out-of-bounds"
                    how = "was unmasked" if seen else "may have been unmasked before the aggregator stopped"
                    note += f"; its noised sum {how}, so the round counts in epsilon (now {ledger.spent():.4g})"
            await self._notify()
            return SecureOutcome(len(sr.masked), 0, None, note)
        self.metrics.sum_devices.observe(covers)
        await self._notify()
        note = f"secure aggregation: the sum of {covers} devices"
        if sr.plan.excluded:
            note += f" ({len(sr.plan.excluded)} masked inputs left out{_why_left_out(sr)})"
        if noise is not None:
            note += f", noised by the devices (noise multiplier {noise.noise_multiplier:.4g})"
        return SecureOutcome(covers, weight, mean, note, noise)

    def _count_before_unmask(self, sr: SecureRound, noise: RoundNoise) -> bool:
        """Worker thread, distributed DP: write in the privacy ledger that the aggregator is about to see this noised
        sum, before any mask comes off (write-ahead), so that a crash at any later step over-counts at worst. The
        devices' noise is what protects them from the aggregator: once it holds the sum, the round counts in
        epsilon whether or not it is published. The budget is checked again here (a round resumed after a restart
        was asked for its shares by the process before). False: counted already, before a restart."""
        ledger = self.engine.privacy
        assert ledger is not None
        if ledger.unmasking is not None and ledger.unmasking.round_id == sr.round_id:
            return False
        assert sr.plan is not None
        self._check_budget(len(sr.plan.survivors), noise)
        with self.store.writes.writing(f"the privacy ledger's count of secure round {sr.round_id}"):
            ledger.begin_unmask(sr.round_id, noise)
        self.engine.metrics.dp_epsilon.set(ledger.spent())
        return True

    def _uncount(self, round_id: int) -> None:
        """Worker thread: take round ``round_id``'s count out of the privacy ledger again (no mask came off), as a
        write under way on the disk."""
        ledger = self.engine.privacy
        assert ledger is not None
        with self.store.writes.writing(f"the privacy ledger's settlement of secure round {round_id}"):
            ledger.unmask_failed()

    def _distributed_dp(self) -> float | None:
        """z of ``--dp distributed``, or None."""
        ledger = self.engine.privacy
        return ledger.config.noise_multiplier if ledger is not None and ledger.config.mode == "distributed" else None

    def _noise(self, sr: SecureRound, survivors: int) -> RoundNoise | None:
        """The noise the sum of ``survivors`` devices' inputs holds (distributed DP), or None without; _Abandon
        when distributed DP is on and the roster asked for no noise (a round opened before a restart with --dp)."""
        if not sr.setup.noise_sigma:
            if self._distributed_dp() is not None:
                raise _Abandon("unnoised", "the round's roster asked the devices for no noise, and --dp distributed "
                               "publishes only noised sums")
            return None
        dimension = self.words - 1
        return distributed_noise(sr.setup.noise_sigma, survivors, sensitivity(sr.setup.levels, dimension), dimension)

    async def _ask(self, sr: SecureRound) -> None:
        rejections = {v: accused for v, (_, accused) in sr.masked.items()}
        # The accusations are judged on a worker thread (a DLEQ check and a dealer's shares opened and checked each:
        # a round full of them took seconds, and held the status and every upload on the event loop). What they are
        # judged on is fixed by now (the masked phase has ended: _drain), and the round's state changes only after.
        plan = await self._run(plan_unmask, sr.setup, _dealings(sr), rejections)
        if len(plan.survivors) < self._minimum():
            raise _Abandon("too-few-survivors", f"{len(plan.survivors)} masked inputs can count, below the minimum of "
                           f"{self._minimum()}")
        if len(plan.survivors) < sr.setup.threshold:  # every device must refuse such a request (protocol.md 12.6)
            raise _Abandon("too-few-survivors", f"{len(plan.survivors)} masked inputs can count, below the threshold "
                           f"of {sr.setup.threshold} shares the devices require of an unmask request")
        noise = self._noise(sr, len(plan.survivors))
        if noise is not None and self.engine.privacy is not None:
            self._check_budget(len(plan.survivors), noise)
        request = m.UnmaskRequest(sr.round_id, tuple(plan.survivors), tuple(plan.dropped),
                                  int(time.time() + self.config.phase_timeout))
        body = m.encode_unmask_request(request, self.key)
        assert sr.roster is not None
        ids = sr.roster.device_ids
        left_out = tuple(("INSERT OR IGNORE INTO left_out_updates (round_id, device_id, reason) VALUES (?, ?, ?)",
                          (sr.round_id, ids[v], reason)) for v, reason in _left_out(sr, plan).items())
        await self._end_phase(sr, "unmask", float(request.deadline), len(sr.dealings) - len(sr.masked),
                              "unmask request", also=left_out, request=body)
        sr.plan, sr.request_body = plan, body
        for v in plan.excluded:
            self.metrics.excluded.labels(plan.exclusion_reason(v)).inc()
        await self._notify()
        log.info("secure round %d: unmasking %d survivors (%d dropped, %d left out)", sr.round_id,
                 len(plan.survivors), len(plan.dropped), len(plan.excluded))
        for v, accused in sorted(rejections.items()):
            for u in (a.dealer for a in accused):  # the trace an operator revokes a device by
                if (v, u) in plan.verdicts.false:
                    log.warning("secure round %d: device %s accused device %s of bad shares, and its ciphertext holds "
                                "good ones: the accuser's input is left out of the sum", sr.round_id, ids[v], ids[u])
                elif (v, u) in plan.verdicts.held:
                    log.warning("secure round %d: device %s dealt device %s shares that fail its checks: the dealer's "
                                "input is left out of the sum", sr.round_id, ids[u], ids[v])
                else:  # secagg.judge: one of the two was left out by another accusation, logged with it
                    out = v if v in plan.verdicts.false_accusers | plan.verdicts.cheating_dealers else u
                    log.warning("secure round %d: device %s accused device %s of bad shares too; not judged, as "
                                "device %s is left out of the sum already", sr.round_id, ids[v], ids[u], ids[out])

    def _check_budget(self, survivors: int, noise: RoundNoise) -> None:
        """_Abandon (never unmasked) when the sum of ``survivors`` devices, holding ``noise``, would take epsilon past
        the budget, or has no finite epsilon."""
        ledger = self.engine.privacy
        assert ledger is not None
        refusal = ledger.next_round_refusal(noise)
        if refusal is not None:
            raise _Abandon("privacy-budget", f"the sum of {survivors} devices holds noise multiplier "
                           f"{noise.noise_multiplier:.4g}: {refusal}; it is never unmasked")

    async def _collect_answers(self, sr: SecureRound) -> None:
        if sr.phase_deadline < time.time():  # resumed after the deadline: give the devices one more timeout
            sr.phase_deadline = time.time() + self.config.phase_timeout
        remaining = self._phase_wait(sr)
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining), self._changed:
                    await self._changed.wait_for(lambda: len(sr.answers) == len(sr.masked))

    def _unmasked_mean(self, sr: SecureRound) -> tuple[np.ndarray, int]:
        """Worker thread: the survivors' weighted mean delta and total weight, or _Abandon (too few shares, or a
        sum out of the honest bounds)."""
        assert sr.plan is not None and sr.total is not None
        total = sr.total.copy()
        for v in sr.plan.excluded:  # their inputs were added as they arrived: take them out again
            np.subtract(total, self._spooled(sr, v), out=total)
        rejections = {v: rejected for v, (_, rejected) in sr.masked.items()}
        partners = masked_with(sr.setup, sr.shared, rejections)
        commitments = {u: (d.self_commitments, d.key_commitments) for u, (_, d) in sr.dealings.items()}
        answers = {v: a for v, (_, a) in sr.answers.items()}
        try:
            report = unmask_total(total, sr.setup, sr.plan, partners, commitments, answers)
        except SecAggError as exc:
            raise _Abandon("too-few-shares", exc.detail) from None
        if report.bad_holders:
            log.warning("secure round %d: %d devices answered with shares that do not fit their commitments",
                        sr.round_id, len(report.bad_holders))
        setup = sr.setup
        try:  # a device that does not follow the protocol can put any words into the sum: never publish them
            mean, weight = bounded_mean(total, survivors=len(sr.plan.survivors), levels=setup.levels,
                                        max_samples=setup.max_samples, clip_norm=setup.clip_norm,
                                        noise_sigma=setup.noise_sigma)
        except SumOutOfBounds as exc:
            raise _Abandon("sum-out-of-bounds", f"{exc}: a device did not follow the protocol") from None
        return mean.astype(np.float32), weight

    def _spooled(self, sr: SecureRound, index: int) -> np.ndarray:
        assert sr.roster is not None
        device_id = sr.roster.device_ids[index]
        update = next(u for u in self.store.round_updates(sr.round_id) if u.device_id == device_id)
        return np.array(self.store.read_delta(sr.round_id, update.offset, update.length).view("<u4"))

    # -------------------------------------------------------------------------------------------- status

    def describe(self) -> dict[str, Any]:
        """The settings, for the status: what every secure round of this aggregator runs with."""
        return {
            "threshold": self.config.threshold,
            "neighbours": "2 ceil(log2 n)" if self.config.neighbours is None else self.config.neighbours or "all",
            "phase_timeout": self.config.phase_timeout,
            "max_samples": self.config.max_samples,
        }

    def round_status(self, round_id: int) -> dict[str, Any] | None:
        """What the status shows of a secure round: its phase, how many devices the sum covers, the dropouts. The
        open round's, and an abandoned one's whose record has not landed yet, come from memory: the status tells of
        them (an abandonment above all) while their record waits on a stalled disk."""
        sr = self.current
        if sr is None or sr.round_id != round_id:
            sr = self._unrecorded.get(round_id)
        left_out = self.store.round_left_out_reasons(round_id)
        if sr is not None:
            covers = len(sr.plan.survivors) if sr.phase == "done" and sr.plan is not None else 0
            return {"phase": sr.phase, "outcome": sr.outcome, "sum_devices": covers, "dropouts": dict(sr.dropouts),
                    "left_out": left_out}
        with self._reads_lock:
            return recorded_round_status(self._reads, round_id, left_out)

    def _read(self, sql: str, values: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Rows of the database through a connection of their own: a write hanging on the writer's connection (a
        stalled disk) holds that connection, not the reads (WAL)."""
        with self._reads_lock:
            return self._reads.execute(sql, values).fetchall()


def recorded_round_status(db: sqlite3.Connection, round_id: int, left_out: dict[str, int]) -> dict[str, Any] | None:
    """A secure round's status as its record in ``db`` holds it (``secure`` of a round in /v1/status and in
    ``fl-aggregator status --state``), with ``left_out`` (``Store.round_left_out_reasons``); None for a round that was
    not secure, as in a state where none ever was (it has no ``secagg_rounds``)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='secagg_rounds'").fetchone() is None:
        return None
    row = db.execute("SELECT phase, outcome, survivors, dropouts FROM secagg_rounds WHERE round_id=?",
                     (round_id,)).fetchone()
    if row is None:
        return None
    phase, outcome, survivors, dropouts = row
    return {"phase": phase, "outcome": outcome, "sum_devices": survivors, "dropouts": json.loads(dropouts),
            "left_out": left_out}


def _left_out(sr: SecureRound, plan: UnmaskPlan) -> dict[int, str]:
    """Why each masked input that arrived and is not in the sum is left out: the plan's reason (EXCLUDED_REASONS),
    or ``late``: stored after the masked phase ended (a stalled disk: its device got no receipt, and its record may
    land later)."""
    return {**{v: plan.exclusion_reason(v) for v in plan.excluded}, **{v: "late" for v in sr.cut}}


def _message_write(round_id: int, device_id: str, phase: str) -> str:
    """How the write of a device's message is named among the writes under way (``Store.writes``)."""
    return f"device {device_id}'s {phase} message in secure round {round_id}"


def _error_of(future: asyncio.Future[Any]) -> BaseException | None:
    """The exception a finished future holds (retrieved), or None."""
    return asyncio.CancelledError() if future.cancelled() else future.exception()


def _fail_future(future: asyncio.Future[Any], error: BaseException) -> None:
    future.set_exception(error)
    future.exception()  # retrieved: nobody else may be waiting


def _log_late_write(what: str, write: asyncio.Future[None]) -> None:
    error = _error_of(write)
    if error is None:
        log.info("secure round: the %s was stored after the round had given up waiting for it", what)
    else:
        log.warning("secure round: the %s could not be stored: %s", what, error)


def _log_failed_write(what: str, write: Future) -> None:
    if write.exception() is not None:
        log.error("secure round: the %s could not be stored: %s", what, write.exception())


def _check_keys(keys: Keys) -> None:
    if not crypto_core_ed25519_is_valid_point(keys.mask):
        raise ProtocolError("bad-key", "the mask key is not a point of the prime-order Ed25519 group")
    if not crypto_core_ed25519_is_valid_point(keys.cipher):
        raise ProtocolError("bad-key", "the cipher key is not a point of the prime-order Ed25519 group")


def _dealings(sr: SecureRound) -> dict[int, Dealing]:
    return {u: dealing for u, (_, dealing) in sr.dealings.items()}


def _why_left_out(sr: SecureRound) -> str:
    """The round note's account of the inputs left out for an accusation: ': false accusation by X; bad shares
    from Y' (device ids), or nothing when every one of them had too few holders."""
    assert sr.plan is not None and sr.roster is not None
    ids = sr.roster.device_ids
    parts = []
    for reason, what in (("false-accusation", "false accusation by"), ("bad-shares", "bad shares from")):
        who = [ids[v] for v in sr.plan.excluded if sr.plan.exclusion_reason(v) == reason]
        if who:
            parts.append(f"{what} {', '.join(who)}")
    return f": {'; '.join(parts)}" if parts else ""


def _check_dealing(sr: SecureRound, index: int, dealing: Dealing) -> None:
    setup = sr.setup
    if index < 0:
        raise ProtocolError("not-in-roster", "this device is not in the round's roster")
    if sorted(dealing.ciphertexts) != setup.graph[index]:
        raise ProtocolError("bad-shares", "shares must go to exactly this device's neighbours in the roster's graph")
    if len(dealing.self_commitments) != setup.threshold or len(dealing.key_commitments) != setup.threshold:
        raise ProtocolError("bad-shares", f"each secret needs {setup.threshold} commitments")
    if dealing.key_commitments[0] != setup.keys[index].mask:
        raise ProtocolError("bad-shares", "the key commitments must start with the advertised mask key")


def _check_answer(sr: SecureRound, index: int, answer: Answer) -> None:
    """An answer holds only what this device holds, of the kind the request asked: never both kinds for one."""
    assert sr.plan is not None
    held = {*sr.setup.graph[index], index}
    survivors, dropped = set(sr.plan.survivors), set(sr.plan.dropped)
    if not set(answer.self_shares) <= held & survivors:
        raise ProtocolError("bad-shares", "self-mask shares only of survivors whose shares this device holds")
    neighbours = set(sr.setup.graph[index])
    if not set(answer.key_shares) <= held & dropped or not set(answer.pair_seeds) <= neighbours & dropped:
        raise ProtocolError("bad-shares", "key shares and seeds only of dropped devices this device was given")

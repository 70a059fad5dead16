"""The round state machine: open -> collecting -> closing -> published (or abandoned and reopened).

A round trains on one model version. It collects updates until the goal count or its deadline; then it
closes. With a quorum (``min_clients`` updates) the strategy produces the next version, which is signed,
written to disk and recorded in the same SQLite transaction that closes the round and opens the next one.
Without a quorum the round is abandoned and a new round opens on the same version. Devices that never answer
are normal: nobody waits for them past the deadline.

Every accepted update is on disk (spool fsync + SQLite commit) before its receipt exists. On restart the open
round is rebuilt from the spool, so each acknowledged update counts exactly once.

Async mode (``RoundPolicy.buffer``, aggregator/buffered.py) runs the same machine with a round as a FedBuff
buffer: its goal is K, and it also takes updates trained on older versions (up to the staleness bound), their
deltas scaled by the staleness weight before they are spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import math
import sqlite3
import threading
import time
import zipfile
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from nacl.signing import SigningKey

from aggregator.adaptive_clip import unclipped_norm
from aggregator.buffered import MAX_BUFFER, AsyncActivity, BufferPolicy
from aggregator.disk_writes import drained, within
from aggregator.metrics import AggregatorMetrics
from aggregator.models import ModelStore
from aggregator.norms import l2_norm
from aggregator.privacy import ACCOUNTING, PendingRelease, PrivacyLedger, RoundNoise, clip_round
from aggregator.record_checks import RecordCheck, TensorSection
from aggregator.registry import Registry
from aggregator.store import DuplicateUpdate, RoundRow, SpoolJob, Store, UpdateRow
from aggregator.strategies import AggregationError, Strategy
from aggregator.strategies.chunks import DEFAULT_CHUNK_BYTES, UpdateSet
from aggregator.threadnames import name_this_thread
from aggregator.verify import UpdateHeader
from appliance import wire
from appliance.durable import atomic_write
from appliance.errors import ProtocolError

if TYPE_CHECKING:
    from aggregator.secagg_round import SecureRounds

log = logging.getLogger(__name__)
T = TypeVar("T")


# No bound may exceed this: a delta inside it, times the largest sample count (2^31), and its square (FedAdam's
# second moment, Krum's distances) stay far inside float32, so no accepted update can overflow any strategy.
MAX_UPDATE_NORM = 1e15
# Headroom of the clip-norm bound: a device's clipped float32 delta, quantised, may come out a little longer.
CLIP_NORM_HEADROOM = 1.1
# The largest sample count one update may carry weight for (``--max-samples``). An agent trains on the newest
# ``samples_per_round`` frames of its buffer (512 by default), which holds at most ``buffer_max_frames`` (4096 by
# default), and signs that count once, whatever the epochs: an honest agent with the default buffer never
# claims more than 4096. Secure rounds use the same number as the weight cap W of their roster.
DEFAULT_MAX_SAMPLES = 4096
# What an update's signed num_samples can hold at all (aggregator/verify.py refuses more as bad-payload).
MAX_SAMPLES_LIMIT = 2**31 - 1
# ``--store-timeout``: an fsync of a few MB takes milliseconds to a second on the slowest SD card; a write that has not
# returned in 30 s is a disk that stopped answering (the secure round's --secagg-phase-timeout has the same default).
DEFAULT_STORE_TIMEOUT = 30.0


def update_norm_bound(explicit: float | None, clip_norm: float, params: np.ndarray) -> tuple[float, str]:
    """The L2 bound on one round's deltas, and where it comes from (shown in the status).

    An operator's ``--max-update-norm`` wins; else 1.1 x the task's clip norm (honest devices clip to it);
    else a bound from the model itself: max(||params||, sqrt(P)), so that one update can at most move the model
    by its own size (or by an RMS of 1 per parameter for a model near zero). Honest deltas are orders of
    magnitude smaller (``fl_aggregator_update_norm_ratio`` shows where they sit); a hostile one cannot void
    the round.
    """
    if explicit is not None:
        return explicit, "max-update-norm"
    if clip_norm > 0:
        return min(CLIP_NORM_HEADROOM * clip_norm, MAX_UPDATE_NORM), "clip-norm"
    size = l2_norm(params)
    return min(max(size, float(np.sqrt(params.size)), 1.0), MAX_UPDATE_NORM), "model"


@dataclass(frozen=True)
class RoundPolicy:
    """When rounds open and close, and what an update must satisfy to count."""

    min_clients: int = 2
    goal_clients: int = 0  # 0: every enrolled, unrevoked device (at the time the round opens)
    round_timeout: float = 600.0
    max_rounds: int = 0  # 0: unlimited; otherwise stop publishing after this many versions (keep serving)
    update_window: float = 3600.0  # an update's created_at may be at most this old...
    clock_skew: float = 300.0  # ...and at most this far in the future
    # L2 bound on a delta. None: derived per round (see :func:`update_norm_bound`); there is always a bound.
    max_update_norm: float | None = None
    # The largest num_samples one device's update may claim (its weight in every sum-based rule); more: refused.
    # An update signed by an enrolled site (``enroll --site``) carries its devices' sum and is not held to it.
    max_samples: int = DEFAULT_MAX_SAMPLES
    # Async mode (FedBuff): a round is a buffer of this policy's K updates; None: synchronous rounds.
    buffer: BufferPolicy | None = None
    # How long an upload waits for its spool write, and a round's close for the uploads still being written, on a
    # disk that stopped answering; past it they do not count and are not acknowledged (``--store-timeout``).
    store_timeout: float = DEFAULT_STORE_TIMEOUT

    def __post_init__(self) -> None:
        if self.min_clients < 1:
            raise ValueError("min-clients must be at least 1")
        if self.goal_clients < 0:
            raise ValueError("goal-clients must be 0 (all enrolled devices) or positive")
        for name, count in (("min-clients", self.min_clients), ("goal-clients", self.goal_clients)):
            if count > MAX_BUFFER:  # a round's goal, the larger of the two, is a 64-bit integer in aggregator.db
                raise ValueError(f"{name} must be at most {MAX_BUFFER}, got {count}")
        if self.round_timeout <= 0:
            raise ValueError("round-timeout must be positive")
        if not 0 < self.store_timeout < math.inf:
            raise ValueError(f"store-timeout must be a positive number of seconds, got {self.store_timeout}")
        if self.update_window <= 0:  # a window of 0 or less refuses every update as too old
            raise ValueError("update-window must be positive")
        if self.max_update_norm is not None and not 0 < self.max_update_norm <= MAX_UPDATE_NORM:
            raise ValueError(f"max-update-norm must be in (0, {MAX_UPDATE_NORM:g}]")
        if not 1 <= self.max_samples <= MAX_SAMPLES_LIMIT:
            raise ValueError(f"max-samples must be in [1, {MAX_SAMPLES_LIMIT}], got {self.max_samples}")
        if self.buffer is not None and self.min_clients > self.buffer.size:
            raise ValueError(f"--min-clients ({self.min_clients}) must not exceed --buffer ({self.buffer.size}): "
                             "a buffer publishes at K updates")


@dataclass(frozen=True)
class TrainingPlan:
    """What each task asks the devices to do (sent in the signed Task)."""

    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    prox_mu: float = 0.0
    encoding: str = "float32"
    clip_norm: float = 0.0

    def __post_init__(self) -> None:
        if self.encoding not in wire.ENCODINGS:
            raise ValueError(f"unknown encoding {self.encoding!r}; expected one of {', '.join(wire.ENCODINGS)}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch-size must be at least 1")
        if self.learning_rate <= 0 or self.prox_mu < 0 or self.clip_norm < 0:
            raise ValueError("lr must be positive, prox-mu and clip-norm non-negative")
        flags = {"epochs": "epochs", "batch_size": "batch-size", "learning_rate": "lr", "prox_mu": "prox-mu"}
        for name, flag in flags.items():  # devices refuse a task past these (appliance/wire.py)
            if not getattr(self, name) <= wire.TASK_BOUNDS[name]:
                raise ValueError(f"{flag} must be at most {wire.TASK_BOUNDS[name]:g}, got {getattr(self, name)!r}")


# Site mode (aggregator/upstream.py): given the closed round, its sample-weighted mean delta, total samples and
# weighted metrics, send them upstream; returns a note for the round's record, raises ForwardError if refused.
Forwarder = Callable[["OpenRound", np.ndarray, int, dict[str, float]], Awaitable[str]]


class ForwardError(Exception):
    """The parent aggregator did not take a site's partial result; the site round is recorded as abandoned."""


class Unavailable(Exception):
    """The update could not be stored (disk error): the client should retry later (HTTP 503)."""


class StoredLate(Exception):
    """An update whose spool record landed after its round's close stopped waiting for it (a disk that stopped
    answering): it does not count, and its device was never acknowledged."""


class UnknownRound(LookupError):
    """A round this aggregator never opened (HTTP 404 ``unknown-round``); the message says which rounds it has."""


# How long the round clock waits before closing a round again after closing it failed (a disk error, say).
CLOSE_RETRY_SECONDS = 5.0

# The round clock reads the wall clock again at least this often while it waits for a deadline, so that a clock
# stepped forward (time sync at last) past a round's deadline closes the round within this, not at the end of the
# wait it had measured on the monotonic clock before the step.
WALL_CLOCK_CHECK_SECONDS = 30.0

# Async mode: how long an upload waits for room in a full or closing buffer before it is told to come back. A
# city's buffer closes in seconds; an async site's can stay full until its parent publishes (other sites
# offline), and a waiting upload holds its upload slot.
BUFFER_ROOM_SECONDS = 30.0

#: How many ids of each round's ``devices`` and ``lost_devices`` ``GET /v1/status`` lists (the first accepted),
#: beside ``devices_total`` and ``lost_devices_total``; ``GET /v1/status/rounds/{round}/devices`` (and
#: ``/lost_devices``) pages through the rest. 100 ids are 3.6 KB of JSON: a fleet of up to 100 devices (every
#: demo, rig and test) still sees whole lists, and at 10,000 devices a round the default 20 rounds stay near
#: 100 KB instead of 7 MB on every poll.
STATUS_ROUND_DEVICES = 100
#: The lists of a round's devices that ``GET /v1/status/rounds/{round}/{list}`` pages through.
ROUND_DEVICE_LISTS = ("devices", "lost_devices", "left_out_devices")


class BufferFull(Exception):
    """Async mode: no buffer can take the update now (full for :data:`BUFFER_ROOM_SECONDS`, or a site between
    two of its parent's versions); the client retries later (HTTP 503)."""


@dataclass(frozen=True)
class RecordedEnd:
    """A round whose end is recorded (its commit succeeded): what the steps after that commit need. A failure in
    those steps is retried from here, never by closing the round again, which would aggregate its updates a second
    time onto the version already published, or record an abandoned or forwarded round and the next round again
    (that next round's row is there already: the retry failed on it forever)."""

    outcome: str  # "published" (with a new version or, in site mode, forwarded), "abandoned" or "superseded"
    version: int | None  # the new version recorded with it; None: none here (abandoned, or forwarded upstream)
    next_round: tuple[int, float, float, int] | None  # (round id, opened_at, deadline, goal), recorded with it


@dataclass
class OpenRound:
    """The round currently collecting updates (in memory; its durable twin is the SQLite row)."""

    round_id: int
    model_version: int
    base_digest: bytes
    opened_at: float
    deadline: float
    goal: int
    task: bytes
    norm_bound: float
    norm_bound_source: str
    clip_norm: float  # what the task asks the devices to clip to (with adaptive clipping, this round's C)
    devices: dict[str, bytes] = field(default_factory=dict)  # device -> update digest (committed or in flight)
    accepted: int = 0
    samples: int = 0
    pending: int = 0
    pending_samples: int = 0  # what the updates being stored claim (``pending`` of them)
    closing: bool = False
    noise: RoundNoise | None = None  # distributed DP: the noise the survivors' sum held (secagg_round.py)
    unclipped_norms: list[float] | None = None  # adaptive clipping: the devices' norms before they clipped
    full: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    closes_by: float = math.inf  # on the monotonic clock: the latest it closes, whatever the wall clock does
    close_under_way: asyncio.Event | None = None  # set when the close under way (close_round) ends
    ended: RecordedEnd | None = None  # its end is recorded; the steps after that commit are not all done
    # The updates being stored (digest -> device) until the spool's finisher thread takes them into the round; under
    # ``lock``: once the close stops waiting for them (--store-timeout), those still here are ``late`` (device ->
    # digest), never count, and are named in the round's record. Updates admitted after (a close that failed reopens
    # the round until the clock retries it) count as usual.
    storing: dict[bytes, str] = field(default_factory=dict)
    late: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.idle.set()

    def last_until(self, deadline: float, length: float) -> None:
        """Set the round's ``deadline`` (the aggregator's time, which its task states), and ``closes_by``: at most
        ``length`` seconds from now on the monotonic clock. A clock stepped back, or one that is behind the deadline
        read from disk at a restart (a board that booted at its image's build date, before time sync), must not
        keep a round open for the years it is off."""
        self.deadline = deadline
        self.closes_by = time.monotonic() + max(0.0, min(deadline - time.time(), length))

    def seconds_left(self) -> float:
        """Until the round closes: its deadline by the aggregator's clock, or ``closes_by``, whichever comes first."""
        return min(self.deadline - time.time(), self.closes_by - time.monotonic())


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A done callback that retrieves a task's exception: one whose caller stopped waiting must not log it as lost."""
    if not task.cancelled():
        task.exception()


def _weighted_metrics(rows: list[UpdateRow]) -> dict[str, float]:
    """Sample-weighted mean of each training metric the devices reported.

    Each value is scaled by its share of the weight before summing, so every partial sum is a convex
    combination: finite for any finite inputs (1e308 from one device and -1e308 from another cannot overflow
    to Infinity or NaN, which JSON cannot carry).
    """
    weights: dict[str, float] = {}
    for row in rows:
        for name in row.metrics:
            weights[name] = weights.get(name, 0.0) + row.num_samples
    terms: dict[str, list[float]] = {name: [] for name in weights}
    for row in rows:
        for name, value in row.metrics.items():
            terms[name].append(value * (row.num_samples / weights[name]))
    return {name: math.fsum(terms[name]) for name in sorted(terms) if weights[name] > 0}


def save_strategy_state(path: Path, state: dict[str, np.ndarray]) -> None:
    """Write the strategy's state (FedAdam's moments...) beside its model version, atomically: the version's row
    is committed next, and a state file whose rename was not yet durable would come back missing after a power
    cut, its moments silently started again from zero."""
    out = io.BytesIO()
    np.savez(out, **state)
    atomic_write(path, out.getbuffer())


def load_strategy_state(path: Path) -> dict[str, np.ndarray]:
    """The state :func:`save_strategy_state` wrote; RuntimeError naming ``path`` when it cannot be read whole."""
    try:
        # Opened here, not by np.load: numpy leaves its own file open when the archive it reads is cut short.
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise RuntimeError(
            f"{path} is damaged ({exc or type(exc).__name__}): restore it from a backup, or remove it to go on "
            "with the strategy's state (FedAdam/FedYogi moments) started again from zero"
        ) from None


class RoundEngine:
    """Owns the open round: admits, spools and accumulates updates; closes, aggregates and publishes."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        models: ModelStore,
        strategy: Strategy,
        policy: RoundPolicy,
        plan: TrainingPlan,
        key: SigningKey,
        metrics: AggregatorMetrics,
        executor: Executor,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        privacy: PrivacyLedger | None = None,
    ):
        self.store = store
        self.registry = registry
        self.models = models
        self.strategy = strategy
        self.policy = policy
        self.plan = plan
        self.key = key
        self.metrics = metrics
        self.executor = executor
        self.chunk_bytes = chunk_bytes
        self.privacy = privacy  # central DP: the noised rounds' ledger and the budget (aggregator/privacy.py)
        # The model's tensor section, rebuilt from a spooled record: how most records are checked at a resume.
        self.tensor_section = TensorSection(models.layout.specs)
        self.current: OpenRound | None = None
        self.version = 0
        self.params: np.ndarray | None = None
        self._changed = asyncio.Condition()
        self._inflight: dict[bytes, asyncio.Future[bytes]] = {}
        self._timer: asyncio.Task[None] | None = None
        # Site mode: a closed round goes upstream instead of publishing, and rounds open only on the parent's tasks.
        self.forward: Forwarder | None = None
        # Site mode: whether a round's forward was written (aggregator/upstream.py), read when the round resumes.
        self.forward_written: Callable[[int], bool] | None = None
        # Async site under an async parent (aggregator/upstream.py reads the parent's mode): the next buffer opens
        # right after a forward, on the same version, instead of waiting for the parent's next version.
        self.reopen_after_forward = False
        self._adopting = 0  # open_for_upstream calls waiting to move the site to its parent's newer version
        self._opening = False  # open_for_upstream between retiring the old round and installing the new one
        # Secure aggregation (aggregator/secagg_round.py): every round is secure; only the survivors' sum is seen.
        self.secure: SecureRounds | None = None
        # Async mode: staleness of the accepted updates and the publication times (status page, metrics).
        self.activity = AsyncActivity() if policy.buffer is not None else None
        # The engine's own records are written on this thread, in order (:meth:`write_record`).
        self._records = ThreadPoolExecutor(max_workers=1, thread_name_prefix="round-records",
                                           initializer=name_this_thread)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def write_record(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Write one of the engine's own records (a round's end, the next round, a model version, the privacy
        ledger's settlement; a site's task and forward records, aggregator/upstream.py) on the records thread, in
        order. A disk that stops answering holds that thread and what awaits the record (the close of a round), never
        the event loop: the status, task polls, model downloads and metrics go on answering from what is committed,
        and uploads are refused (:meth:`disk_stall`). The record is awaited however long the disk takes: it lands or
        fails, once, and the round goes on from there."""
        def write() -> T:
            with self.store.writes.writing(what):
                return fn(*args)

        return await asyncio.get_running_loop().run_in_executor(self._records, write)

    def disk_stall(self) -> str | None:
        """Why uploads are refused now: the oldest write under way on the aggregator's disk has waited longer than
        ``--store-timeout`` (an upload queued behind it would wait as long, holding its body); None otherwise."""
        oldest = self.store.writes.oldest()
        if not self._stalled(oldest):
            return None
        return (f"the aggregator's disk has not finished a write for {oldest[0]:.0f} s ({oldest[1]}; "
                f"--store-timeout {self.policy.store_timeout:g} s): no update is taken until it answers")

    def _state_path(self, version: int) -> Path:
        return self.models.directory / f"v{version:08d}.strategy.npz"

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Publish version 0 on first start; otherwise resume the open round from the spool."""
        if self.policy.buffer is not None and (self.secure is not None or self.privacy is not None):
            raise RuntimeError("--mode async cannot be combined with --secure-aggregation or --dp")
        self.store.start_writer()
        latest = self.store.latest_model()
        if latest is None:
            now = time.time()
            params = self.models.initial_params()
            digest = await self.write_record("model version 0", self.models.write, 0, params, int(now))
            await self.write_record("model version 0's row", self.store.add_model, 0, digest, None, now)
            latest = (0, digest)
        self.version = latest[0]
        if self.models.release_bytes(self.version) is None:
            raise RuntimeError(f"model version {self.version} is recorded but {self.models.path(self.version)} is gone")
        try:
            self.params = await self._run(self.models.params, self.version)
        except wire.ProtocolError as exc:
            raise RuntimeError(
                f"{self.models.path(self.version)} does not verify with this aggregator's key ({exc}): "
                "was the state directory used with another key?"
            ) from None
        state_path = self._state_path(self.version)
        if state_path.exists():
            self.strategy.restore(load_strategy_state(state_path))
        if self.privacy is not None and self.privacy.pending is not None:
            await self._publish_counted(self.privacy.pending)
        self.metrics.model_version.set(self.version)
        self.metrics.enrolled_devices.set(self.registry.active_count())
        for outcome, ended_at in self.store.last_round_ends().items():
            self.metrics.last_round_timestamp.labels(outcome).set(ended_at)
        if self.privacy is not None:
            self._check_privacy_history()
            self._settle_stale_unmask()
            self.metrics.dp_epsilon.set(self.privacy.spent())
        if self.activity is not None:
            self._start_activity(self.activity)
        row = self.store.open_round()
        self.store.drop_stale_segments(keep=row.round_id if row else None)
        if row is not None:
            await self._resume(row)
        elif not self._finished(self.version) and self.forward is None:
            await self._open(self.store.last_round_id() + 1, time.time(), persist=True)
        self._timer = asyncio.create_task(self._clock(), name="round-clock")

    async def _publish_counted(self, release: PendingRelease) -> None:
        """Restart after a crash between counting a noised round in the privacy ledger and recording its version:
        publish exactly the model that was counted, with its round's record, and open the next round. Its noise is
        never drawn again (that would spend the round's privacy twice while the ledger counts it once)."""
        assert self.privacy is not None
        row = self.store.get_round(release.round_id)
        if release.version <= self.version:  # the crash came after the version was recorded
            self.privacy.published()
            return
        if release.version != self.version + 1 or row is None or row.status != "open":
            raise RuntimeError(
                f"{self.privacy.pending_path} holds version {release.version} of round {release.round_id}, which "
                f"does not follow this state (newest version {self.version}, round {release.round_id} "
                f"{'missing' if row is None else row.status}): was the state directory restored from a backup?"
            )
        digest = await self.write_record(f"model version {release.version}", self._write_version, release.version,
                                         release.params, release.strategy_state, int(release.closed_at))
        self.version, self.params = release.version, release.params
        if release.strategy_state:
            self.strategy.restore(release.strategy_state)
        now = time.time()
        opens = not self._finished(self.version)
        await self.write_record(f"the record of round {release.round_id}'s end", functools.partial(
            self.store.finish_round,  # a private round records no device metrics (close_round)
            release.round_id, "published", release.closed_at, release.participants, release.samples, {},
            note=release.note, new_model=(release.version, digest),
            next_round=(release.round_id + 1, self.version, now, now + self.policy.round_timeout, self._goal())
            if opens else None,
        ))
        await self.write_record("the privacy ledger's settlement", self.privacy.published)
        log.warning("round %d: published model version %d, counted in the privacy ledger before the aggregator "
                    "stopped (the same model: its noise is not drawn again)", release.round_id, release.version)

    def _settle_stale_unmask(self) -> None:
        """Distributed DP, at start-up: a sum the ledger was told would be unmasked, in a round that is no longer
        open, ended without a version (the crash came between the round's end and the ledger's settlement): it
        stays counted, as a sum unmasked but not published."""
        assert self.privacy is not None
        unmasking = self.privacy.unmasking
        row = self.store.open_round()
        if unmasking is not None and (row is None or row.round_id != unmasking.round_id):
            self.privacy.unmask_abandoned()
            log.warning("round %d ended while its noised sum was being unmasked: it counts in epsilon (now %.4g)",
                        unmasking.round_id, self.privacy.spent())

    def _check_privacy_history(self) -> None:
        """A DP guarantee must cover every round since the initial model: refuse a state whose published
        versions were (partly) trained without the ledger's noise."""
        assert self.privacy is not None
        noised = len(self.privacy.rounds)
        if self.version != noised:
            raise RuntimeError(
                f"--dp: this state has published {self.version} versions but {noised} were trained with DP noise; "
                "a guarantee must cover every round from the initial model: start a new --state"
            )

    async def stop(self, deadline: float) -> None:
        """Stop the round clock, then wait until ``deadline`` (``time.monotonic``) for the open round's updates being
        stored and the records under way to land; one that has not by then (a disk that stopped answering) is left
        behind: nothing it holds was acknowledged (aggregator/disk_writes.py)."""
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        if self.current is not None:
            await within(deadline, self.current.idle.wait())
        await drained(self._records, deadline)

    def _finished(self, version: int) -> bool:
        """Whether no round opens after model ``version``: --rounds reached, or the privacy budget spent."""
        if self.policy.max_rounds > 0 and version >= self.policy.max_rounds:
            return True
        refusal = None if self.privacy is None else self.privacy.next_round_refusal()
        if refusal is not None:
            log.warning("privacy: %s; no more rounds open (version %d stays published)", refusal, self.version)
            return True
        return False

    def _start_activity(self, activity: AsyncActivity) -> None:
        """Async mode: count the versions of the last hour from the round history; export versions per hour."""
        since = time.time() - activity.WINDOW
        ends = [r.closed_at for r in self.store.recent_rounds(1000) if r.status == "published" and r.closed_at]
        for closed_at in sorted(ends):
            if closed_at >= since:
                activity.published(closed_at)
        self.metrics.versions_per_hour.set_function(activity.versions_per_hour)

    def _goal(self) -> int:
        if self.policy.buffer is not None:
            return self.policy.buffer.size
        goal = self.policy.goal_clients or self.registry.active_count()
        return max(goal, self.policy.min_clients)

    def _clip_norm(self) -> float:
        """The clip norm of the next round's task: --clip-norm, or where adaptive clipping has moved it."""
        return self.plan.clip_norm if self.privacy is None else self.privacy.round_clip_norm(self.plan.clip_norm)

    def _task(self, round_id: int, deadline: float, opened_at: float, clip_norm: float) -> bytes:
        digest = self.store.model_digest(self.version)
        assert digest is not None
        task = wire.Task(
            round_id=round_id,
            model_version=self.version,
            model_digest=digest,
            package_digest=self.models.package_digest,
            deadline=int(deadline),
            epochs=self.plan.epochs,
            batch_size=self.plan.batch_size,
            learning_rate=self.plan.learning_rate,
            prox_mu=self.plan.prox_mu,
            encoding=self.plan.encoding,
            clip_norm=clip_norm,
            issued_at=int(opened_at),
            secure_aggregation=self.secure is not None,
        )
        return wire.encode_task(task, self.key)

    def _new_open_round(self, round_id: int, opened_at: float, deadline: float, goal: int) -> OpenRound:
        digest = self.store.model_digest(self.version)
        assert digest is not None
        self.strategy.start_round(self.models.layout.size)
        assert self.params is not None
        clip_norm = self._clip_norm()
        if self.privacy is not None and self.privacy.config.adaptive is not None:
            clip_round(self.strategy, clip_norm)  # the server clips to, and calibrates the noise to, this round's C
        bound, source = update_norm_bound(self.policy.max_update_norm, clip_norm, self.params)
        round_ = OpenRound(
            round_id=round_id,
            model_version=self.version,
            base_digest=digest,
            opened_at=opened_at,
            deadline=deadline,
            goal=goal,
            task=self._task(round_id, deadline, opened_at, clip_norm),
            norm_bound=bound,
            norm_bound_source=source,
            clip_norm=clip_norm,
        )
        round_.last_until(deadline, deadline - opened_at)
        return round_

    async def _open(self, round_id: int, now: float, persist: bool) -> None:
        deadline = now + self.policy.round_timeout
        goal = self._goal()
        if persist:
            await self.write_record(f"round {round_id}'s row", self.store.insert_round, round_id, self.version, now,
                                    deadline, goal)
        await self._install(self._new_open_round(round_id, now, deadline, goal))

    async def _install(self, round_: OpenRound | None) -> None:
        if round_ is not None and self.secure is not None:
            # Its phases start before it is current, so before anyone sees its task (a device that got it while they
            # started had its advertisement refused). If they fail to start, the round before stays current: the
            # clock's retry of the steps after that round's end installs this one again (a round made current
            # without its phases refused every device until its deadline).
            await self.secure.opened(round_)
        if self.current is not None and self.current is not round_:
            self.current.full.set()  # wakes the clock if it still waits on the round closed outside it
        self.current = round_
        self.metrics.current_round.set(round_.round_id if round_ else 0)
        self.metrics.round_updates.set(round_.accepted if round_ else 0)
        async with self._changed:
            self._changed.notify_all()
        if round_ is not None:
            log.info("round %d open on model version %d (goal %d)", round_.round_id, self.version, round_.goal)

    async def _resume(self, row: RoundRow) -> None:
        """Rebuild the open round after a restart: every committed update, counted once."""
        if row.model_version != self.version:
            raise RuntimeError(
                f"open round {row.round_id} trains version {row.model_version} but the newest is {self.version}"
            )
        # Records lost or changed on disk: their updates are out of the round.
        recovery = await self._run(self.store.recover_segment, row.round_id, self.tensor_section)
        self.metrics.spool_cut_bytes.inc(recovery.cut_bytes)
        if recovery.lost:
            self.metrics.spool_lost_updates.labels(recovery.cause).inc(len(recovery.lost))
        if recovery.corrupt:
            self.metrics.spool_lost_updates.labels("record-corrupt").inc(len(recovery.corrupt))
        round_ = self._new_open_round(row.round_id, row.opened_at, row.deadline, row.goal)
        rows = self.store.round_updates(row.round_id)
        for update in rows:
            round_.devices[update.device_id] = update.digest
            round_.accepted += 1
            round_.samples += update.num_samples
        if rows and not self.strategy.needs_all_updates and self.secure is None:  # masked inputs are no deltas
            await self._run(self._replay, row.round_id, rows)
        if round_.accepted >= round_.goal:
            round_.full.set()
        if self.forward_written is not None and self.forward_written(row.round_id):
            # A site stopped while forwarding this round: the forward it wrote (which its parent may have counted
            # already) is what the round sends, so the round takes no more updates, which that forward would lack,
            # and closes now.
            round_.closing = True
            round_.full.set()
        log.info("resumed round %d with %d acknowledged updates (%d lost from the spool)", row.round_id, len(rows),
                 len(recovery.lost) + len(recovery.corrupt))
        await self._install(round_)

    def _replay(self, round_id: int, rows: list[UpdateRow]) -> None:
        for update in rows:
            self.strategy.add(self.store.read_delta(round_id, update.offset, update.length), float(update.num_samples))

    async def _clock(self) -> None:
        """Close each round at its goal or deadline, forever. The wait is cut into slices of at most
        WALL_CLOCK_CHECK_SECONDS so that a wall clock stepped forward past the deadline closes the round then."""
        while True:
            round_ = self.current
            if round_ is None:
                return
            remaining = round_.seconds_left()
            if remaining > 0 and not round_.full.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, WALL_CLOCK_CHECK_SECONDS)):
                        await round_.full.wait()
                if self.current is round_ and not round_.full.is_set() and round_.seconds_left() > 0:
                    continue
            if self.current is not round_:  # closed outside the clock (a site adopting its parent's version)
                continue
            below_quorum = not round_.full.is_set() and round_.accepted < self.policy.min_clients
            if self.policy.buffer is not None and below_quorum and (self.forward is None or (
                    round_.accepted == 0 and self.reopen_after_forward)):
                # An async buffer is never abandoned: its acknowledged updates wait for more. (A site's is, as in
                # sync mode, so that it follows its parent's newer versions; under an async parent an empty one
                # waits for its devices, and open_for_upstream supersedes it when the parent's next version comes.)
                self._extend(round_)
                continue
            try:
                await self.close_round()
            except Exception:
                ended = round_.ended
                if ended is not None:  # counted by close_round
                    what = ended.outcome if ended.version is None else f"published as model version {ended.version}"
                    log.exception("round %d is recorded %s, but a step after its commit failed; retrying the steps "
                                  "after the commit in %.0f s", round_.round_id, what, CLOSE_RETRY_SECONDS)
                else:
                    log.exception("closing round %d failed; retrying in %.0f s", round_.round_id, CLOSE_RETRY_SECONDS)
                # A round whose end is recorded takes no more updates, and nor does a round whose noised model the
                # privacy ledger counted: the retry publishes exactly that model, so an update it took now would be
                # acknowledged and left out of it.
                round_.closing = round_.ended is not None or self._counted(round_)
                await asyncio.sleep(CLOSE_RETRY_SECONDS)

    def _counted(self, round_: OpenRound) -> bool:
        """Under --dp: whether ``round_``'s noised model is counted in the privacy ledger and not yet published."""
        pending = None if self.privacy is None else self.privacy.pending
        return pending is not None and pending.round_id == round_.round_id

    def _extend(self, round_: OpenRound) -> None:
        """Async mode: give a buffer below --min-clients at its deadline another --round-timeout, with a task
        re-signed for the new deadline (devices skip a task whose deadline has passed)."""
        now = time.time()
        round_.last_until(now + self.policy.round_timeout, self.policy.round_timeout)
        round_.task = self._task(round_.round_id, round_.deadline, now, round_.clip_norm)
        log.info("buffer %d holds %d updates, below --min-clients %d: collecting until %s", round_.round_id,
                 round_.accepted, self.policy.min_clients, time.strftime("%H:%M:%S", time.localtime(round_.deadline)))

    # ---------------------------------------------------------------------------------------------- tasks

    async def wait_for_task(self, after: int, timeout: float) -> bytes | None:
        """The signed task of the open round if its id is above ``after``; waits up to ``timeout`` for one."""

        def ready() -> bool:
            r = self.current
            return r is not None and r.round_id > after and not r.closing

        if not ready() and timeout > 0:
            self.metrics.waiting_clients.inc()
            try:
                async with asyncio.timeout(timeout), self._changed:
                    await self._changed.wait_for(ready)
            except TimeoutError:
                pass
            finally:
                self.metrics.waiting_clients.dec()
        return self.current.task if ready() and self.current is not None else None

    # -------------------------------------------------------------------------------------------- updates

    async def known_receipt(self, digest: bytes) -> bytes | None:
        """The receipt of an update with exactly these bytes that is acknowledged (or being stored right now).

        This is what makes delivery idempotent: a resend gets the original receipt, whatever happened since. One
        being stored is waited for up to --store-timeout (:class:`Unavailable` past it: the disk stopped answering).
        """
        waiter = self._inflight.get(digest)
        if waiter is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(waiter), self.policy.store_timeout)
            except TimeoutError:
                raise Unavailable(f"an identical upload is still being written after {self.policy.store_timeout:g} "
                                  "s: the disk stopped answering") from None
            except Exception:  # it failed: whether a copy is stored is read below
                pass
        return self.stored_receipt(digest)

    def stored_receipt(self, digest: bytes) -> bytes | None:
        """The receipt in the stored record of an update with these bytes (any thread), or None. A record stored after
        its round stopped waiting for it (:meth:`stored_late`) holds a receipt that was never given: refused
        (``round-closed``), not given now. Nor is one committed but not yet taken into its round (:meth:`_take`): the
        close may stop waiting for it right then; None, and the caller waits for the upload under way instead."""
        receipt = self.store.receipt_for(digest)
        if receipt is None:
            return None
        current = self.current
        if current is not None:
            with current.lock:  # with the cut: an update is storing, taken or late, never between
                if digest in current.storing and digest not in current.late.values():
                    return None
        if self.stored_late(digest):
            raise ProtocolError("round-closed", "this update was stored after its round had stopped waiting for it "
                                "(the aggregator's disk had stopped answering), so the round went on without it: it "
                                "was never acknowledged and counts nowhere")
        return receipt

    def stored_late(self, digest: bytes) -> bool:
        """Whether the update ``digest`` was cut from its round's close while it was being stored (any thread): in
        memory until the round's end is recorded, in ``left_out_updates`` from then on."""
        current = self.current
        return (current is not None and digest in current.late.values()) or self.store.stored_late(digest)

    def admit(self, header: UpdateHeader, digest: bytes, now: float | None = None) -> OpenRound:
        """Decide from the signed metadata alone whether this update can count in the open round."""
        if self.secure is not None:
            raise ProtocolError("not-secure", "this aggregator's rounds are secure: devices send masked inputs "
                                "(docs/protocol.md section 12), not updates")
        now = time.time() if now is None else now
        if header.created_at < now - self.policy.update_window or header.created_at > now + self.policy.clock_skew:
            raise ProtocolError(
                "expired",
                f"created_at {header.created_at} is outside the accepted window "
                f"[{int(now - self.policy.update_window)}, {int(now + self.policy.clock_skew)}]",
            )
        self._check_samples(header)
        round_ = self.current
        if self.policy.buffer is not None and round_ is not None:
            admitted = self._admit_buffered(header, digest, round_, self.policy.buffer)
            if not self._has_room(round_, self.policy.buffer):  # commit waits for the next buffer and checks there
                return admitted
            return self._check_forward_samples(header, admitted)
        if self.policy.buffer is not None and self._opening:  # no round for a moment: not a refusal
            raise BufferFull("the site is moving to its parent's new version; its next buffer opens in a moment")
        if round_ is None or header.round_id != round_.round_id:
            past = self.store.get_round(header.round_id)
            if past is not None and past.status != "open":
                raise ProtocolError("round-closed", f"round {header.round_id} is {past.status}; it takes no updates")
            open_id = round_.round_id if round_ else None
            raise ProtocolError("wrong-round", f"round {header.round_id} is not open (open round: {open_id})")
        if round_.closing:
            raise ProtocolError("round-closed", f"round {round_.round_id} is closing; it takes no more updates")
        if header.model_version != round_.model_version or header.base_digest != round_.base_digest:
            raise ProtocolError(
                "wrong-model",
                f"round {round_.round_id} trains model version {round_.model_version} "
                f"({round_.base_digest.hex()[:16]}...), the update is based on version {header.model_version} "
                f"({header.base_digest.hex()[:16]}...)",
            )
        if header.device_id in round_.devices and round_.devices[header.device_id] != digest:
            raise ProtocolError(
                "duplicate", f"device {header.device_id} already has a different update in round {round_.round_id}"
            )
        return self._check_forward_samples(header, round_)

    def _check_forward_samples(self, header: UpdateHeader, round_: OpenRound) -> OpenRound:
        """Site mode: refuse an update that would take the round's samples past what its forward can carry (one
        signed count of at most 2^31 - 1): the parent would refuse that forward and the round's acknowledged updates
        would be lost. The updates being stored count at the samples they claim."""
        if self.forward is None:
            return round_
        held = round_.samples + round_.pending_samples
        if held + header.num_samples > MAX_SAMPLES_LIMIT:
            raise ProtocolError(
                "too-many-samples",
                f"the update claims {header.num_samples} samples and this site's round {round_.round_id} already "
                f"holds {round_.samples}; the round's forward to its parent carries at most {MAX_SAMPLES_LIMIT} "
                "samples in all",
            )
        return round_

    def _check_samples(self, header: UpdateHeader) -> None:
        """Refuse a device's claim of more samples than ``--max-samples``: the count is its weight in the sum, and a
        signature proves who sent it, not that it is true. A site's forward (``enroll --site``) sums its devices'
        counts, each held to the site's own bound, and is not held to this per-device one."""
        bound = self.policy.max_samples
        if header.num_samples > bound and not self.registry.is_site(header.device_id):
            raise ProtocolError(
                "too-many-samples",
                f"the update claims {header.num_samples} samples; one update counts for at most {bound} here "
                "(--max-samples): raise it for devices that train on more frames, or enrol a site aggregator with "
                "`fl-aggregator enroll --site`",
            )

    def _admit_buffered(
        self, header: UpdateHeader, digest: bytes, round_: OpenRound, buffer: BufferPolicy
    ) -> OpenRound:
        """Async mode: an update counts in the open buffer if it was trained on a version this aggregator
        published for the round it names, at most ``max_staleness`` versions ago. A closing buffer is not a
        refusal here: :meth:`commit` waits for the next one."""
        if header.round_id != round_.round_id:
            trained = self.store.get_round(header.round_id) if header.round_id < round_.round_id else None
            if trained is None:
                raise ProtocolError("wrong-round", f"round {header.round_id} was never open "
                                    f"(open buffer: {round_.round_id})")
            if header.model_version != trained.model_version:
                raise ProtocolError("wrong-model", f"round {header.round_id} trained model version "
                                    f"{trained.model_version}, the update is based on version {header.model_version}")
        staleness = round_.model_version - header.model_version
        buffer.check(staleness, header.model_version, round_.model_version)
        base = round_.base_digest if staleness == 0 else self.store.model_digest(header.model_version)
        if header.base_digest != base:
            raise ProtocolError(
                "wrong-model",
                f"the update's base digest {header.base_digest.hex()[:16]}... is not model version "
                f"{header.model_version}'s ({(base or b'').hex()[:16]}...)",
            )
        # A full or closing buffer passes the update on to the next (commit checks it again there): a device whose
        # update is in it sends its next one for the next buffer, however long the close takes (its records are
        # awaited, on a stalled disk for minutes), and must not be refused as a duplicate meanwhile.
        if (self._has_room(round_, buffer) and header.device_id in round_.devices
                and round_.devices[header.device_id] != digest):
            raise ProtocolError(
                "duplicate", f"device {header.device_id} already has a different update in buffer {round_.round_id}"
            )
        return round_

    async def commit(
        self, header: UpdateHeader, digest: bytes, delta: np.ndarray, metrics: dict[str, float],
        check: RecordCheck | None = None,
    ) -> bytes:
        """Spool the verified update durably, count it, and return its signed receipt.

        Call :meth:`admit` right before (without awaiting in between): the round may have moved on. ``check`` is
        what the delta's spool record must match at a resume (aggregator/record_checks.py); None: a CRC-32.
        """
        if digest in self._inflight or self.stored_receipt(digest) is not None:
            receipt = await self.known_receipt(digest)  # an identical upload overtook this one
            if receipt is not None:
                return receipt
        if self.policy.buffer is not None:
            await self._buffer_room(self.policy.buffer)
        round_ = self.admit(header, digest)
        stall = self.disk_stall()
        if stall is not None:
            raise Unavailable(stall)
        now = time.time()
        staleness = round_.model_version - header.model_version
        if self.policy.buffer is not None and self.policy.buffer.weight(staleness) != 1.0:
            delta = self.policy.buffer.scaled(delta, staleness)
            check = None  # the spooled bytes are the scaled delta, which no signed digest covers
        # The receipt names the round the device trained for (in async mode, the buffer may be a later one).
        receipt = wire.encode_receipt(
            wire.Receipt(header.device_id, header.round_id, update_digest=digest, accepted_at=int(now)), self.key
        )
        round_.devices[header.device_id] = digest
        round_.pending += 1
        round_.pending_samples += header.num_samples
        round_.idle.clear()
        with round_.lock:
            round_.storing[digest] = header.device_id
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = waiter
        weight = float(header.num_samples)
        job = SpoolJob(
            digest=digest, device_id=header.device_id, round_id=round_.round_id, num_samples=header.num_samples,
            metrics=metrics, delta=delta, receipt=receipt, accepted_at=now,
            then=lambda: self._take(round_, digest, delta, weight), check=check,
        )
        # Once queued, the update is stored and counted even if this handler is cancelled or stops waiting
        # (Store.spool), so the round counts it even then: a task of its own finishes what follows. The device is
        # answered within --store-timeout: past it, 503 and no receipt (the update still counts if it lands while the
        # round waits, and its resend then gets the receipt).
        stored = asyncio.ensure_future(self._store_and_count(round_, header, job, waiter, staleness))
        stored.add_done_callback(_retrieve)
        try:
            return await asyncio.wait_for(asyncio.shield(stored), self.policy.store_timeout)
        except TimeoutError:
            raise Unavailable(f"the update was not stored within {self.policy.store_timeout:g} s (--store-timeout): "
                              "the aggregator's disk stopped answering; it is not acknowledged, send it again "
                              "later") from None

    def _take(self, round_: OpenRound, digest: bytes, delta: np.ndarray, weight: float) -> None:
        """The spool's finisher thread, once an update is committed: take it into its round (a rule that sums as
        updates arrive adds it now), unless the round's close stopped waiting for it (:meth:`_cut`)."""
        with round_.lock:  # the close's cut waits for an addition under way: the rule reads the sum next
            if digest in round_.late.values():
                raise StoredLate(f"the update was stored after round {round_.round_id}'s close had stopped waiting for "
                                 "it (the aggregator's disk stopped answering): it does not count")
            if not self.strategy.needs_all_updates:
                self.strategy.add(delta, weight)
            round_.storing.pop(digest, None)

    async def _store_and_count(
        self, round_: OpenRound, header: UpdateHeader, job: SpoolJob, waiter: asyncio.Future[bytes], staleness: int
    ) -> bytes:
        """Spool ``job``, then count it in ``round_`` and answer identical uploads waiting on ``waiter``."""
        digest, receipt = job.digest, job.receipt
        started = time.perf_counter()
        try:
            await self.store.spool(job)
            self.metrics.spool_seconds.observe(time.perf_counter() - started)
        except BaseException as exc:
            round_.devices.pop(header.device_id, None)
            with round_.lock:
                round_.storing.pop(digest, None)
            round_.pending_samples -= header.num_samples
            error: BaseException = exc
            if isinstance(exc, DuplicateUpdate):
                error = ProtocolError("duplicate", str(exc))
            elif isinstance(exc, OSError | sqlite3.Error):
                error = Unavailable(f"the update could not be written to the spool: {exc}")
            elif isinstance(exc, StoredLate):
                error = Unavailable(str(exc))
            if not waiter.done():
                waiter.set_exception(error)
                waiter.exception()  # mark retrieved: nobody else may be waiting
            raise error from exc
        finally:
            self._inflight.pop(digest, None)
            round_.pending -= 1
            if round_.pending == 0:
                round_.idle.set()
            if self.policy.buffer is not None:  # a failed update frees its place in the buffer
                async with self._changed:
                    self._changed.notify_all()
        round_.accepted += 1
        round_.samples += header.num_samples
        round_.pending_samples -= header.num_samples  # here, not above: no await between it and the line before
        self.metrics.updates_accepted.inc()
        if self.activity is not None:
            self.activity.accepted(staleness)
            self.metrics.update_staleness.observe(staleness)
        self.metrics.round_updates.set(round_.accepted)
        waiter.set_result(receipt)
        if round_.accepted >= round_.goal:
            round_.full.set()
        return receipt

    @staticmethod
    def _has_room(round_: OpenRound, buffer: BufferPolicy) -> bool:
        """Async mode: whether the buffer ``round_`` takes another update now (exactly K make a version)."""
        return not round_.closing and round_.accepted + round_.pending < buffer.size

    async def _buffer_room(self, buffer: BufferPolicy) -> None:
        """Async mode: wait until the open buffer has room (exactly K updates make a version). An update that
        arrives while a buffer is full or closing goes into the next one rather than being refused."""

        def room() -> bool:
            r = self.current
            if r is None:  # a site moving to its parent's new version has a round again in a moment
                return not self._opening
            return self._has_room(r, buffer)

        if not room():
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(room), BUFFER_ROOM_SECONDS)
                except TimeoutError:
                    raise BufferFull(f"the open buffer has had no room for {BUFFER_ROOM_SECONDS:.0f} s "
                                     "(a site waits for its parent's next version)") from None

    # -------------------------------------------------------------------------------------------- closing

    async def close_round(self) -> None:
        """Close the open round now: publish with a quorum, otherwise abandon; then open the next round.

        A close of the round already under way is waited for, not repeated: a site closes its round when its parent's
        next task comes (open_for_upstream), and the round clock finds the round still open at its deadline while that
        close's forward is on its way. A second close forwarded and recorded the round twice, and could drop the next
        round the first one opened. If the close waited for fails, so does this one (the clock retries)."""
        round_ = self.current
        if round_ is None:
            return
        under_way = round_.close_under_way
        if under_way is not None:
            await under_way.wait()
            if self.current is round_:
                raise RuntimeError(f"the close of round {round_.round_id} under way failed")
            return
        round_.close_under_way = ended = asyncio.Event()
        try:
            await self._close(round_)
        except Exception:
            self._after_commit_failed(round_)
            raise
        finally:
            round_.close_under_way = None
            ended.set()

    def _after_commit_failed(self, round_: OpenRound) -> None:
        """A close or a supersede failed: if after the commit recording the round's end, the failure is counted and
        the round clock retries the steps after it now (a close outside the clock, a site's, was retried only at the
        round's deadline, and was not counted)."""
        if round_.ended is not None:
            self.metrics.publication_failures.inc()
            round_.full.set()

    async def _close(self, round_: OpenRound) -> None:
        round_.closing = True
        if not round_.idle.is_set():
            try:
                async with asyncio.timeout(self.policy.store_timeout):
                    await round_.idle.wait()
            except TimeoutError:
                self._cut(round_)
        if round_.ended is not None:  # recorded already: only the steps after its commit are left
            await self._complete_end(round_, round_.ended)
            return
        if self.secure is not None:  # secure aggregation: all there is to aggregate is the survivors' weighted mean
            outcome = await self.secure.finish(round_)
            round_.noise = outcome.noise
            if outcome.mean is not None:
                self.strategy.add(outcome.mean, float(outcome.weight))
            await self._conclude(round_, outcome.participants, outcome.weight, {}, outcome.updates(), outcome.note)
            return
        late = set(round_.late.values())
        rows = [r for r in self.store.round_updates(round_.round_id) if r.digest not in late]
        if self.privacy is not None and self.privacy.config.adaptive is not None:
            round_.unclipped_norms = await self._run(self._unclipped_norms, round_, rows)
        samples = sum(r.num_samples for r in rows)
        # Under DP only the published model is noised: the devices' own metrics (their pre-clip update_norm
        # above all, which adaptive clipping counts with noise) would be published in the clear beside the
        # round's device list, so a private round records none.
        summary = {} if self.privacy is not None else _weighted_metrics(rows)
        await self._conclude(round_, len(rows), samples, summary, self._spooled(round_, rows))

    def _cut(self, round_: OpenRound) -> None:
        """The close has waited --store-timeout for the updates still being stored (a disk that stopped answering):
        the round goes on without them. Their devices were answered 503 by now (each upload waits at most as long),
        so none was acknowledged; when their records land they count nowhere (:meth:`_take`), and the round's record
        names them as left out, ``late``, so that a resend is not given their receipts (:meth:`stored_receipt`)."""
        with round_.lock:
            round_.late.update({device: digest for digest, device in round_.storing.items()})
        log.warning("round %d: %d updates were not stored within %g s (--store-timeout: the disk stopped answering; "
                    "devices %s): the round closes without them, and none of them was acknowledged", round_.round_id,
                    len(round_.late), self.policy.store_timeout, ", ".join(sorted(round_.late)))

    async def _conclude(
        self, round_: OpenRound, participants: int, samples: int, summary: dict[str, float],
        updates: UpdateSet | None, note: str = "",
    ) -> None:
        """Publish (or forward) a closed round with a quorum, otherwise abandon it; then open the next round.
        ``updates`` None: there is nothing to aggregate, ``note`` says why."""
        now = time.time()
        next_id = round_.round_id + 1
        if updates is None:
            log.info("round %d abandoned: %s", round_.round_id, note)
            await self._abandon(round_, participants, samples, summary, now, note)
        elif participants >= self.policy.min_clients and self.forward is not None:
            await self._forward_round(round_, updates, participants, samples, summary, now)
        elif participants >= self.policy.min_clients:
            started = time.perf_counter()
            optimiser = self.strategy.state()  # FedAdam/FedYogi moments before this round's step
            try:
                params, digest = await self._run(self._aggregate, round_, updates, now, participants, samples, note)
            except AggregationError as exc:
                self.strategy.load_state(optimiser)  # an abandoned round leaves no trace in the moments
                log.warning("round %d abandoned: %s", round_.round_id, exc)
                await self._abandon(round_, participants, samples, summary, now, str(exc))
                return
            except Exception:
                self.strategy.load_state(optimiser)
                raise
            version = round_.model_version + 1
            opens = not self._finished(version)
            deadline = now + self.policy.round_timeout
            goal = self._goal()
            try:
                await self.write_record(f"the record of round {round_.round_id}'s end", functools.partial(
                    self.store.finish_round, round_.round_id, "published", now, participants, samples, summary,
                    note=note, new_model=(version, digest),
                    next_round=(next_id, version, now, deadline, goal) if opens else None, late=list(round_.late),
                ))
            except Exception:
                # Not recorded, so not published: GET /v1/models/{version} stays 404, and the retried close (_clock)
                # takes the same updates from the same model and moments again instead of stepping twice.
                self.strategy.load_state(optimiser)
                raise
            # From here on the version is published, whatever fails: the round clock's retry only completes it. Not
            # before: while the record is being written (however long a stalled disk takes), the status, the tasks
            # and GET /v1/models/latest go on serving the version before, which is the one committed.
            self.version, self.params = version, params
            round_.ended = end = RecordedEnd("published", version, (next_id, now, deadline, goal) if opens else None)
            self.metrics.aggregate_seconds.observe(time.perf_counter() - started)
            self.metrics.round_ended("published", now)
            self.metrics.model_version.set(version)
            if self.activity is not None:
                self.activity.published(now)
            log.info("round %d published model version %d from %d updates", round_.round_id, version, participants)
            self._finish_metrics(round_, participants, now)
            await self._complete_end(round_, end)
        else:
            note = f"{participants} updates, below the quorum of {self.policy.min_clients}"
            log.info("round %d abandoned: %s", round_.round_id, note)
            await self._abandon(round_, participants, samples, summary, now, note)

    async def _complete_end(self, round_: OpenRound, end: RecordedEnd) -> None:
        """The steps after the commit recording a round's end, each of which may be run again after a failure: settle
        the privacy ledger (forget the model it counted; for an abandoned round, count the sum it was unmasking),
        delete the round's spool segment, open the next round recorded with the end (in async mode, after a new
        version, then delete the releases no update may be based on any more)."""
        if self.privacy is not None:
            if end.version is not None:
                await self.write_record("the privacy ledger's settlement", self.privacy.published)
            unmasking = self.privacy.unmasking
            if end.outcome == "abandoned" and unmasking is not None and unmasking.round_id == round_.round_id:
                # after the round's end is recorded: a crash in between leaves the entry to _settle_stale_unmask
                await self.write_record("the privacy ledger's settlement", self.privacy.unmask_abandoned)
            self.metrics.dp_epsilon.set(self.privacy.spent())
        await self.write_record(f"the deletion of round {round_.round_id}'s spool", self.store.drop_segment,
                                round_.round_id)
        following = end.next_round
        await self._install(None if following is None else self._new_open_round(*following))
        if self.policy.buffer is not None and end.version is not None:
            await self._run(self._drop_old_versions, end.version)

    async def _abandon(
        self, round_: OpenRound, participants: int, samples: int, summary: dict[str, float], now: float, note: str
    ) -> None:
        # Site mode: the next round opens on the parent's next task. Otherwise a distributed sum unmasked in this
        # round may have spent the budget.
        opens = self.forward is None and not self._finished(self.version)
        following = (round_.round_id + 1, now, now + self.policy.round_timeout, self._goal()) if opens else None
        await self.write_record(f"the record of round {round_.round_id}'s end", functools.partial(
            self.store.finish_round, round_.round_id, "abandoned", now, participants, samples, summary, note=note,
            next_round=None if following is None else (following[0], self.version, *following[1:]),
            late=list(round_.late),
        ))
        round_.ended = end = RecordedEnd("abandoned", None, following)
        self.metrics.round_ended("abandoned", now)
        self._finish_metrics(round_, participants, now)
        await self._complete_end(round_, end)

    async def _supersede(self, round_: OpenRound, version: int) -> None:
        """Async site: a buffer still empty when the parent's next version comes moves to it. Recorded and counted
        as ``superseded``, not ``abandoned``: an idle site sees one per parent version, and nothing was lost. A step
        after that record that fails is retried by the round clock from it (RecordedEnd), never by recording and
        counting the round again. The round clock, finding the buffer at its deadline meanwhile (its record on a slow
        disk), waits for this end as for a close under way (:meth:`close_round`): it closed the buffer again, recorded
        and counted it abandoned too, and could drop the round opened on the parent's version."""
        round_.close_under_way = under_way = asyncio.Event()
        try:
            now = time.time()
            await self.write_record(f"the record of round {round_.round_id}'s end", functools.partial(
                self.store.finish_round, round_.round_id, "superseded", now, 0, 0, {},
                note=f"no updates when upstream version {version} came"))
            round_.ended = end = RecordedEnd("superseded", None, None)
            self.metrics.round_ended("superseded", now)
            await self._complete_end(round_, end)
        except Exception:
            self._after_commit_failed(round_)
            raise
        finally:
            round_.close_under_way = None
            under_way.set()

    async def _forward_round(
        self, round_: OpenRound, updates: UpdateSet, participants: int, samples: int, summary: dict[str, float],
        now: float,
    ) -> None:
        """Site mode: send the round's weighted mean upstream as one update; the new version comes from the parent.

        The round is recorded as ``published`` with a note naming the parent round (no new model version here).
        """
        assert self.forward is not None
        try:
            delta = await self._run(self._mean_delta, updates)
            note = await self.forward(round_, delta, samples, summary)
        except (AggregationError, ForwardError) as exc:
            log.warning("round %d abandoned: %s", round_.round_id, exc)
            await self._abandon(round_, participants, samples, summary, time.time(), str(exc))
            return
        # Async: the next buffer opens now, in the same transaction, on the version the devices train on (unless the
        # parent's newer version is waiting to be adopted): no window in which the site refuses their updates.
        reopens = self.policy.buffer is not None and self.reopen_after_forward and not self._adopting
        next_id, deadline, goal = round_.round_id + 1, time.time() + self.policy.round_timeout, self._goal()
        await self.write_record(f"the record of round {round_.round_id}'s end", functools.partial(
            self.store.finish_round, round_.round_id, "published", now, participants, samples, summary, note=note,
            next_round=(next_id, self.version, now, deadline, goal) if reopens else None, late=list(round_.late)))
        round_.ended = end = RecordedEnd("published", None, (next_id, now, deadline, goal) if reopens else None)
        self.metrics.round_ended("published", now)
        self._finish_metrics(round_, participants, now)
        log.info("round %d: %s", round_.round_id, note)
        await self._complete_end(round_, end)

    def _spooled(self, round_: OpenRound, rows: list[UpdateRow]) -> UpdateSet:
        """The round's updates as views of its memory-mapped spool segment (read by the rule on a worker thread)."""
        segment = self.store.segment_path(round_.round_id)
        spool = np.memmap(segment, dtype="<f4", mode="r") if rows else np.empty(0, dtype="<f4")
        deltas = [spool[r.offset // 4 : (r.offset + r.length) // 4] for r in rows]
        return UpdateSet(deltas, np.array([r.num_samples for r in rows], dtype=np.float64), self.chunk_bytes)

    def _unclipped_norms(self, round_: OpenRound, rows: list[UpdateRow]) -> list[float]:
        """Adaptive clipping (worker thread): each device's norm before it clipped, from its signed metrics; the
        spooled delta is read only for a device that reported none (aggregator/adaptive_clip.py)."""
        def received(row: UpdateRow) -> float:
            delta = self.store.read_delta(round_.round_id, row.offset, row.length)
            return l2_norm(delta)

        return [unclipped_norm(row.metrics.get("update_norm"), lambda row=row: received(row), round_.clip_norm)
                for row in rows]

    def _mean_delta(self, updates: UpdateSet) -> np.ndarray:
        delta = self.strategy.aggregate(updates)
        if not np.isfinite(delta).all():
            raise AggregationError("the site's mean delta holds NaN or Inf; refusing to forward it")
        return delta

    async def open_for_upstream(self, version: int, params: np.ndarray | None, deadline: float) -> int:
        """Site mode: adopt the parent's model ``version`` (``params`` when it is new to this site, re-signed by
        this site's key) and open a round on it that closes by ``deadline``. A round still open is closed first
        (it forwards what it has, or is abandoned); in async mode a buffer holding updates is left to fill (or reach
        its deadline) and forward, and the next round opens after; an empty one is superseded at once. Returns the
        new round's id."""
        async with self._changed:
            if self.policy.buffer is not None:
                self._adopting += 1
                try:
                    await self._changed.wait_for(lambda: self.current is None or (
                        not self.current.closing and self.current.accepted + self.current.pending == 0))
                finally:
                    self._adopting -= 1
            await self._changed.wait_for(lambda: self.current is None or not self.current.closing)
        self._opening = True  # async: uploads wait for the new round instead of finding none (410)
        try:
            return await self._open_on(version, params, deadline)
        finally:
            self._opening = False
            async with self._changed:
                self._changed.notify_all()

    async def _open_on(self, version: int, params: np.ndarray | None, deadline: float) -> int:
        empty = self.current
        if empty is not None and self.policy.buffer is not None and empty.accepted + empty.pending == 0:
            empty.closing = True
            await self._supersede(empty, version)
        elif self.current is not None:
            await self.close_round()
        now = time.time()
        if params is not None:
            digest = await self.write_record(f"model version {version}", self.models.write, version, params, int(now))
            await self.write_record(f"model version {version}'s row", self.store.add_model, version, digest, None, now)
            self.params = params
        elif self.version != version:
            self.params = await self._run(self.models.params, version)
        self.version = version
        self.metrics.model_version.set(version)
        round_id = self.store.last_round_id() + 1
        goal = self._goal()
        await self.write_record(f"round {round_id}'s row", self.store.insert_round, round_id, version, now, deadline,
                                goal)
        await self._install(self._new_open_round(round_id, now, deadline, goal))
        if self._timer is None or self._timer.done():
            self._timer = asyncio.create_task(self._clock(), name="round-clock")
        if self.policy.buffer is not None and params is not None:  # an async site adopting its parent's version
            await self._run(self._drop_old_versions, version)
        return round_id

    def _drop_old_versions(self, newest: int) -> None:
        """Async mode (worker thread), once ``newest`` is recorded: delete the releases no update may be based on
        any more (BufferPolicy.oldest_kept) and the strategy states of the versions before ``newest`` (only the
        newest one's is read, at a restart). A version every K updates would otherwise fill the disk with a model
        (and FedAdam's two moments) per K updates. A failure here costs disk space only: it is logged."""
        assert self.policy.buffer is not None
        try:
            self.models.drop_releases_before(self.policy.buffer.oldest_kept(newest))
            for path in self.models.directory.glob("v*.strategy.npz"):
                number = path.name[1:].split(".", 1)[0]
                if number.isdigit() and int(number) < newest:
                    path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("model version %d: older versions not deleted (%s)", newest, exc)

    def _finish_metrics(self, round_: OpenRound, participants: int, now: float) -> None:
        self.metrics.round_duration.observe(max(0.0, now - round_.opened_at))
        self.metrics.round_participants.observe(participants)
        self.metrics.enrolled_devices.set(self.registry.active_count())

    def _aggregate(
        self, round_: OpenRound, updates: UpdateSet, closed_at: float, participants: int, samples: int, note: str
    ) -> tuple[np.ndarray, bytes]:
        """Worker thread: run the strategy, count a noised round in the privacy ledger (with its model, before the
        version exists), write the signed new version and the strategy's state."""
        assert self.params is not None
        pending = None if self.privacy is None else self.privacy.pending
        if pending is not None and pending.round_id == round_.round_id:
            # a retried close: this round is counted already, and its counted model (and optimiser) is the one to
            # publish
            self.strategy.restore(pending.strategy_state)
            return pending.params, self._write_version(pending.version, pending.params, pending.strategy_state,
                                                       int(pending.closed_at))
        delta = self.strategy.aggregate(updates)
        params = self.strategy.apply(self.params, delta)
        if not np.isfinite(params).all():
            raise AggregationError("the aggregated model holds NaN or Inf; refusing to publish it")
        version = round_.model_version + 1
        state = self.strategy.saved_state()
        if self.privacy is not None:
            clip = None if round_.unclipped_norms is None else self.privacy.adapt_clip(round_.clip_norm,
                                                                                        round_.unclipped_norms)
            release = PendingRelease(round_.round_id, version, closed_at, participants, samples, note, params, state)
            with self.store.writes.writing(f"the privacy ledger's count of round {round_.round_id}"):
                self.privacy.record_round(round_.noise, clip, release)
        return params, self._write_version(version, params, state, int(closed_at))

    def _write_version(self, version: int, params: np.ndarray, state: dict[str, np.ndarray], created_at: int) -> bytes:
        """Worker thread: sign and write ``version`` (with the privacy spent up to it) and the strategy's state."""
        privacy = None if self.privacy is None else self.privacy.release_metadata()
        with self.store.writes.writing(f"model version {version}"):
            digest = self.models.write(version, params, created_at, privacy)
            if state:
                save_strategy_state(self._state_path(version), state)
        return digest

    # --------------------------------------------------------------------------------------------- status

    def _privacy_status(self) -> dict[str, Any]:
        assert self.privacy is not None
        config = self.privacy.config
        status: dict[str, Any] = {
            "mode": config.mode,
            "noise_multiplier": config.noise_multiplier,
            "delta": config.delta,
            "epsilon": self.privacy.spent(),
            "epsilon_budget": config.epsilon_budget,
            "rounds": len(self.privacy.rounds),
            "exhausted": not self.privacy.budget_allows_next_round(),
            "accounting": ACCOUNTING[config.mode],
            "adaptive_clip": None,
        }
        if config.adaptive is not None:
            status["accounting"] += ("; adaptive clipping: each round also composes the noised count of devices "
                                     "within the clip norm (Andrew et al. 2021)")
            status["adaptive_clip"] = {
                "target_quantile": config.adaptive.target_quantile,
                "learning_rate": config.adaptive.learning_rate,
                "count_stddev": config.adaptive.count_stddev_for(config.noise_multiplier),
                "model_noise_multiplier": config.model_noise_multiplier,
                "clip_norm": self._clip_norm(),
                "history": self.privacy.clip_history[-100:],
            }
        return status

    def _stalled(self, oldest: tuple[float, str] | None) -> bool:
        """Whether the oldest write under way (``WritesUnderWay.oldest``) has waited past ``--store-timeout``."""
        return oldest is not None and oldest[0] > self.policy.store_timeout

    def disk_status(self) -> dict[str, Any]:
        """The oldest write under way in the state directory (``disk`` of /v1/status, /healthz and /readyz): a disk that
        stopped answering shows here, named, while everything else is answered from memory and what is committed."""
        oldest = self.store.writes.oldest()
        return {"stalled": self._stalled(oldest),
                "oldest_write": None if oldest is None else oldest[1],
                "oldest_write_seconds": 0.0 if oldest is None else round(oldest[0], 3)}

    def round_device_page(self, round_id: int, which: str, page: int, per_page: int) -> dict[str, Any]:
        """What ``GET /v1/status/rounds/{round}/{which}`` answers: one page of the round's ``devices`` or
        ``lost_devices`` in the order /v1/status lists them (so its lists are the first ids of page 1); a page past
        the last is empty (and not read: its offset can be past SQLite's 64-bit integers). The page is read in SQL
        with its total, in one snapshot: a round of any size costs one page, and the total counts the ids paged.

        Raises :class:`UnknownRound` for a round this aggregator never opened."""
        if self.store.get_round(round_id) is None:
            raise UnknownRound(f"round {round_id} is not in this aggregator's history "
                               f"(newest: {self.store.last_round_id()})")
        count, read = {
            "devices": (self.store.count_round_devices, self.store.round_devices),
            "lost_devices": (self.store.count_round_lost_devices, self.store.round_lost_devices),
            "left_out_devices": (self.store.count_round_left_out_devices, self.store.round_left_out_devices),
        }[which]
        offset = (page - 1) * per_page
        with self.store.snapshot():
            total = count(round_id)
            ids = read(round_id, per_page, offset) if offset < total else []
        return {"round": round_id, "page": page, "per_page": per_page, "total": total,
                "pages": max(1, math.ceil(total / per_page)), which: ids}

    def status(self, history: int = 20) -> dict[str, Any]:
        """What ``GET /v1/status`` reports."""
        r = self.current
        rounds = []
        for row in self.store.recent_rounds(history):
            rounds.append(
                {
                    "round": row.round_id,
                    "model_version": row.model_version,
                    "status": row.status,
                    "opened_at": row.opened_at,
                    "deadline": row.deadline,
                    "closed_at": row.closed_at,
                    "goal": row.goal,
                    "participants": (r.accepted if r and r.round_id == row.round_id else row.participants),
                    "samples": (r.samples if r and r.round_id == row.round_id else row.samples),
                    **self.store.round_device_lists(row.round_id, STATUS_ROUND_DEVICES),
                    "metrics": row.metrics,
                    "note": row.note,
                    "secure": None if self.secure is None else self.secure.round_status(row.round_id),
                }
            )
        devices = self.store.devices()
        sites = self.store.site_ids()
        return {
            "aggregator_id": wire.key_id(self.key.verify_key),
            "model": {
                "name": self.models.package.info.name,
                "package_digest": self.models.package_digest.hex(),
                "version": self.version,
                "digest": (self.store.model_digest(self.version) or b"").hex(),
                "parameters": self.models.layout.size,
            },
            "strategy": self.strategy.name,
            "privacy": None if self.privacy is None else self._privacy_status(),
            "secure_aggregation": None if self.secure is None else self.secure.describe(),
            "async": None if self.policy.buffer is None or self.activity is None
            else {**self.policy.buffer.describe(), **self.activity.describe()},
            "policy": {
                "min_clients": self.policy.min_clients,
                "goal_clients": self.policy.goal_clients,
                "round_timeout": self.policy.round_timeout,
                "max_rounds": self.policy.max_rounds,
                "max_update_norm": self.policy.max_update_norm,
                "max_samples": self.policy.max_samples,
                "store_timeout": self.policy.store_timeout,
            },
            "disk": self.disk_status(),
            "current_round": None
            if r is None
            else {
                "round": r.round_id,
                "model_version": r.model_version,
                "deadline": r.deadline,
                "goal": r.goal,
                "accepted": r.accepted,
                "closing": r.closing,
                "max_update_norm": r.norm_bound,
                "max_update_norm_source": r.norm_bound_source,
                "max_samples": self.policy.max_samples,
                "clip_norm": r.clip_norm,
            },
            "rounds": rounds,
            "devices": {
                "enrolled": sum(1 for d in devices if d.revoked_at is None),
                "revoked": sum(1 for d in devices if d.revoked_at is not None),
                "sites": sum(1 for d in devices if d.revoked_at is None and d.device_id in sites),
            },
        }

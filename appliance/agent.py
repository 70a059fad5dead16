"""The fl-agent loop: wait for a round, train on local data within the budget, queue a signed update, deliver.

Data goes one way: camera -> frame buffer -> trainer (child cgroup) -> update -> outbox -> aggregator.
Three tasks run side by side on one event loop: the round loop, the outbox delivery loop and (with real
cameras) the camera manager; the systemd watchdog is pinged from the same loop, so a wedged loop is
restarted by systemd. So the writes that fsync something as large as a model (the package, the release held, an
update queued in the outbox) and the round's state run in worker threads: on an SD card one fsync can take seconds,
which on the loop would stall the heartbeat, delivery and the watchdog (and systemd would kill the agent).

A full or read-only data partition (appliance/storage_errors.py) does not end the agent: a round that cannot store
its package or its update is given up with one log line and ``fl_agent_rounds_skipped_total{reason}``, a state file,
a model release or an outbox removal that cannot be written is logged and counted (``fl_agent_storage_errors_total``)
while the agent goes on (with the state and the release in memory), and the next round tries again; the heartbeat
goes on meanwhile.

Restart safety: the last round for which an update was queued is stored in ``<state>/agent-state.json``
after the update is in the outbox, so a restart neither trains a round twice nor forgets an update. The same
file keeps the time of the last receipt (``fl_agent_last_round_timestamp_seconds`` across restarts). The model
version held is stored as the aggregator signed it (``<state>/model-release.cose``, appliance/held_release.py)
and verified at start, so a restart asks for the next version as a delta from it.

Time: deadlines are judged and updates stamped in the aggregator's time as learnt from each signed task
(:mod:`appliance.clock`), never by the device clock alone, which on a board without a real-time clock may be
years off until time sync succeeds. When the two differ by more than a minute, the status and the log say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from appliance import __version__, systemd, wire
from appliance.budget import (
    Budget,
    CgroupSetupError,
    PressureGate,
    TrainerFailed,
    TrainerKilled,
    TrainerSandbox,
    next_batch_size_after_oom,
    read_budget,
    read_usage,
)
from appliance.client import (
    AggregatorClient,
    AggregatorUnavailable,
    NotPublished,
    ReceiptRefused,
    Rejection,
    StaleReport,
)
from appliance.clock import AggregatorClock
from appliance.config import Config
from appliance.durable import atomic_write, sweep_interrupted_writes
from appliance.errors import ProtocolError
from appliance.fleet_report import ThrottleMeter, build_heartbeat, next_delay, restamped
from appliance.framebuffer import CAMERA_FRAME_SHAPE, FrameBuffer, frames_held, record_size
from appliance.heartbeat_stamps import HeartbeatStamps
from appliance.held_release import load_release, store_release
from appliance.identity import DeviceIdentity, load_aggregator_key, load_or_create_device_key
from appliance.metrics import AgentMetrics, Reading
from appliance.modelpkg import ModelPackage, PackageError, decode_package, load_package
from appliance.outbox import Backoff, Outbox, PermanentRejection
from appliance.package_fit import check_fits
from appliance.protocol.heartbeat import Heartbeat, encode_heartbeat
from appliance.refusal_backoff import RefusalBackoff
from appliance.secagg_client import SecureRound, Transport, flat_update, take_part
from appliance.storage_errors import StorageFailure, storage_reason, storing
from appliance.training_job import FRAMES_DIR, TrainJob, run_train_job

log = logging.getLogger("fl_agent")

T = TypeVar("T")

STATE_FILE = "agent-state.json"
MODELS_DIR = "models"
FRAME_POLL_SECONDS = 5.0
# The status and the log say the device clock is off when it differs from the aggregator's by more than this.
CLOCK_OFF_SECONDS = 60.0
# The first heartbeat waits at most this long for the round loop's first answer, which teaches the aggregator's time.
FIRST_REPORT_WAIT_SECONDS = 30.0
# Packages refused for their content are remembered, by digest, up to this many (see Agent._ensure_package).
REFUSED_PACKAGES_KEPT = 16
# Two polls for a task that bring no round to take start at least this far apart: an aggregator's long-poll waits, but
# one that answers at once (a proxy answering 204, an aggregator serving a round the agent has taken) is not polled
# in a tight loop.
POLL_MIN_SECONDS = 1.0


class ModelRefused(Exception):
    """The package or the release a task names was refused (a bad signature, a digest mismatch, values past the
    bounds, a package unfit for the device...): the aggregator answered, and what it sent is at fault. Retried as a
    failed poll is, but the status names the refusal, not the network."""


class ModelDownloadFailed(Exception):
    """The package or the release a task names could not be downloaded (a connection cut mid-way, a timeout, a 5xx,
    a 404): a network or aggregator fault, not a refusal. Like a refusal it is retried with a backoff of the task's
    own (:mod:`appliance.refusal_backoff`): each retry downloads the model again from its start."""

    def __init__(self, cause: AggregatorUnavailable):
        super().__init__(str(cause))
        self.cause = cause


def retry_status(exc: Exception, delay: float) -> str:
    """The status while the round loop waits ``delay`` seconds after ``exc``: "aggregator unreachable" only for a
    failed connection or answer (:class:`AggregatorUnavailable`); a model or a task the agent refused, or a model
    version or package the aggregator has not published, is named, so that an operator looks at the model or the
    aggregator's store, not at the network."""
    if isinstance(exc, ModelRefused):
        what = f"refused the model from the aggregator: {exc}"
    elif isinstance(exc, ProtocolError):
        what = f"refused the task from the aggregator: {exc}"
    elif isinstance(exc, NotPublished):
        what = f"the aggregator has no {exc.what}"
    else:
        what = "aggregator unreachable"
    return f"{what}; retry in {delay:.0f} s"


def trainer_storage_failure(exc: BaseException, state_dir: Path) -> StorageFailure | None:
    """A :class:`StorageFailure` when the trainer failed because the data partition failed it a read (EIO from a
    dying SD card, reading the model package or the frames), else None: the card's failure, not the model's, counted
    ``io-error`` rather than ``trainer-failed``. The trainer writes nothing there, so ENOSPC, EDQUOT or EROFS in it
    come from elsewhere (a full tmpfs, a kernel limit) and stay ``trainer-failed``, as does a trainer cgroup that
    could not be set up, whatever its errno."""
    if not isinstance(exc, TrainerFailed) or isinstance(exc, CgroupSetupError) or exc.child_errno != errno.EIO:
        return None
    error = OSError(errno.EIO, f"{os.strerror(errno.EIO)} ({exc})")
    return StorageFailure("the model package and the frames", state_dir, error, "io-error", doing="train on")


def clip_update(delta: dict[str, np.ndarray], max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale ``delta`` so its global L2 norm is at most ``max_norm`` (0: no clipping). Returns (delta, norm)."""
    norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in delta.values()))
    if max_norm > 0 and norm > max_norm:
        scale = np.float32(max_norm / norm)
        return {k: v * scale for k, v in delta.items()}, norm
    return delta, norm


async def finished_in_thread(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` run in a worker thread, as :func:`asyncio.to_thread`, but waited for to its end even when the
    caller is cancelled meanwhile (the cancellation is raised after it). A thread cannot be stopped: without the
    wait, a round cancelled because the agent stops would go on writing the outbox and the state after
    :meth:`Agent.run` had returned, behind the back of whatever stopped it (a test reading the state, the next
    agent started on the same state directory)."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({work})
        failure = work.exception()
        if failure is not None:
            log.error("stopping: %s failed: %s", getattr(func, "__name__", func), failure)
        raise


def read_state(path: Path) -> dict[str, int | float]:
    """The agent's saved state (``last_round``, ``acknowledged_at``), each field only when it is what
    :meth:`Agent._save_state` writes: a damaged file (not JSON, not an object, a field of another type or out of
    range) is named in a warning and its fields are left out, so the agent starts from round 0 rather than failing
    at every start (systemd would restart it forever)."""
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning("%s is not valid JSON; starting from round 0", path)
        return {}
    if not isinstance(state, dict):
        log.warning("%s holds a JSON %s, not an object; starting from round 0", path, type(state).__name__)
        return {}
    kept: dict[str, int | float] = {}
    if "last_round" in state:
        last_round = state["last_round"]
        if type(last_round) is int and 0 <= last_round <= wire.MAX_ID:
            kept["last_round"] = last_round
        else:
            log.warning("%s: last_round %.40r is not a round id; starting from round 0", path, last_round)
    if "acknowledged_at" in state:
        acknowledged_at = state["acknowledged_at"]
        if type(acknowledged_at) in (int, float) and math.isfinite(acknowledged_at) and acknowledged_at >= 0:
            kept["acknowledged_at"] = acknowledged_at
        else:
            log.warning("%s: acknowledged_at %.40r is not a time; the next receipt sets it", path, acknowledged_at)
    return kept


class Agent:
    def __init__(self, config: Config, *, budget: Budget | None = None, clock: AggregatorClock | None = None):
        self.config = config
        self.clock = clock or AggregatorClock()
        self.heartbeat_stamps = HeartbeatStamps(self.clock)  # only orders heartbeats; never moves self.clock
        self._clock_warned_offset: float | None = None
        self.state_dir = config.state_path
        # What writes cut short by a power cut left (the half of a model package): before anything reads these.
        swept = sweep_interrupted_writes(self.state_dir, self.state_dir / MODELS_DIR,
                                         self.state_dir / "outbox" / "rejected")
        if swept:
            log.warning("%s: %s", self.state_dir, swept.describe())
        self.metrics = AgentMetrics()
        self.identity: DeviceIdentity = load_or_create_device_key(self.state_dir)
        self.aggregator_key = load_aggregator_key(self.state_dir)
        self.budget = budget or read_budget()
        self.outbox = Outbox(
            self.state_dir / "outbox", max_messages=config.outbox.max_messages, max_bytes=config.outbox.max_bytes
        )
        memory_max = config.training.memory_max_bytes or (
            self.budget.memory_max * 3 // 4 if self.budget.memory_max else None
        )
        # The fork server imports the trainer (numpy, onnxruntime) once; each round forks a ready child, which
        # matters on a small CPU where those imports take seconds.
        self.sandbox = TrainerSandbox(
            self.budget, memory_max, start_method="forkserver", preload=["appliance.training_job", "appliance.trainer"]
        )
        self.pressure = PressureGate(
            threshold=config.training.pressure_pause_avg10,
            path=self.budget.base / "memory.pressure" if self.budget.base else None,
        )
        self.threads = min(config.training.max_threads or self.budget.threads, self.budget.threads)
        self._state_lock = threading.Lock()  # see _save_state
        state = self._load_state()
        self.last_round = state.get("last_round", 0)
        self.acknowledged_at = state.get("acknowledged_at", 0)  # the last receipt's time (aggregator clock); 0: none
        # Updates found in the outbox at start: one may have been acknowledged already (see delivery_loop).
        self._queued_before_start = frozenset(entry.key for entry in self.outbox.pending())
        # The release stored at the last change of version (appliance/held_release.py): a restart fetches the next
        # one as the steps from it, and the heartbeat names it from the start.
        held = load_release(self.state_dir, self.aggregator_key, self.state_dir / MODELS_DIR)
        self._package: ModelPackage | None = held.package if held else None
        self._refused_packages: dict[bytes, PackageError] = {}  # digest -> why (see _ensure_package)
        self.refusal_backoff = RefusalBackoff()  # how long a task whose model was refused is left (round_loop)
        self._release: wire.ModelRelease | None = held.release if held else None
        if held:
            self.metrics.model_version.set(held.release.version)
        self._outbox_changed = asyncio.Event()
        self._open_round_asked = False  # the aggregator answered the question for its open round (_next_task)
        self._first_poll_done = asyncio.Event()  # the round loop's first poll ended, answered or not
        self.oom_retries = 0  # how many times the last training run was killed for memory and retried smaller
        self._throttle = ThrottleMeter()
        self.status = "starting"
        self._register_module_metrics()

    # -- state ----------------------------------------------------------------------------------------

    def _load_state(self) -> dict:
        return read_state(self.state_dir / STATE_FILE)

    def _save_state(self) -> None:
        """Write the state as it is now. Called from the loop (a receipt) and from a worker thread (a round taken):
        one at a time, each taking its values once it holds the lock, so an older ``last_round`` never replaces a
        newer one on disk."""
        with self._state_lock:
            state = {"last_round": self.last_round, "acknowledged_at": self.acknowledged_at}
            atomic_write(self.state_dir / STATE_FILE, json.dumps(state).encode())

    def _saved_state(self) -> StorageFailure | None:
        """:meth:`_save_state`; a write the data partition refuses is returned, not raised: the values stay in
        memory and the next save (a round, a receipt) writes them."""
        try:
            with storing("the agent's state", self.state_dir):
                self._save_state()
        except StorageFailure as failure:
            return failure
        return None

    def _note_unsaved(self, failure: StorageFailure, event: str) -> None:
        self.metrics.count_storage_failure(failure.reason, round_given_up=False)
        log.error("%s, but %s; it is saved with the next round or receipt", event, failure)

    def _register_module_metrics(self) -> None:
        m = self.metrics
        m.budget_cpus.set(self.budget.cpu_quota or 0)
        m.budget_memory.set(self.budget.memory_max or 0)
        m.budget_advisory.set(1 if self.budget.advisory else 0)
        m.trainer_threads.set(self.threads)
        m.last_round_timestamp.set(self.acknowledged_at)
        if self.config.data.source != "cameras":
            m.report_no_cameras()
        m.clock_offset.set_function(self.clock.offset)
        counters = self.outbox.counters
        m.modules.add(
            Reading("fl_agent_outbox_updates", "Updates waiting in the outbox", "gauge", lambda: self.outbox.depth)
        )
        m.modules.add(
            Reading("fl_agent_outbox_bytes", "Bytes waiting in the outbox", "gauge", lambda: self.outbox.pending_bytes)
        )
        m.modules.add(
            Reading(
                "fl_agent_updates_delivered",
                "Updates the aggregator acknowledged",
                "counter",
                lambda: counters.delivered_total,
            )
        )
        m.modules.add(
            Reading(
                "fl_agent_updates_rejected",
                "Updates the aggregator refused, by reason",
                "counter",
                lambda: dict(counters.rejected_total),
            )
        )
        m.modules.add(
            Reading(
                "fl_agent_updates_dropped",
                "Updates dropped from a full outbox",
                "counter",
                lambda: counters.dropped_total,
            )
        )
        m.modules.add(
            Reading(
                "fl_agent_delivery_failures",
                "Failed delivery attempts, by reason",
                "counter",
                lambda: dict(counters.delivery_failures_total),
            )
        )

        if self.budget.base is not None:
            self._register_cgroup_metrics(self.budget.base)

    def _register_cgroup_metrics(self, base: Path) -> None:
        """Usage of the delegated cgroup, read at scrape time (only where a cgroup is delegated)."""
        add = self.metrics.modules.add
        add(
            Reading(
                "fl_agent_cgroup_memory_bytes",
                "memory.current of the agent's cgroup (agent + trainer)",
                "gauge",
                lambda: read_usage(base).memory_current or 0,
            )
        )
        add(
            Reading(
                "fl_agent_cgroup_cpu_seconds",
                "CPU time used by the agent's cgroup",
                "counter",
                lambda: (read_usage(base).cpu_usage_usec or 0) / 1e6,
            )
        )
        add(
            Reading(
                "fl_agent_cgroup_cpu_throttled_seconds",
                "Time the agent's cgroup was throttled by cpu.max",
                "counter",
                lambda: (read_usage(base).cpu_throttled_usec or 0) / 1e6,
            )
        )
        add(
            Reading(
                "fl_agent_memory_pressure_some_ratio",
                "Memory PSI 'some' avg10 of the agent's cgroup (0-1)",
                "gauge",
                lambda: (read_usage(base).memory_pressure_some_avg10 or 0) / 100,
            )
        )
        add(
            Reading(
                "fl_agent_trainer_memory_peak_bytes",
                "memory.peak of the trainer cgroup",
                "gauge",
                lambda: read_usage(base).trainer_memory_peak or 0,
            )
        )

    # -- model ----------------------------------------------------------------------------------------

    async def _ensure_package(self, client: AggregatorClient, digest: bytes) -> ModelPackage:
        """The package ``digest`` names: the one held, the one stored, or downloaded. A package refused for its
        content (a NaN learning rate, say) is refused again without a download while tasks name it: its digest names
        that content, and each retry of the round would otherwise download up to 256 MiB again."""
        if self._package is not None and self._package.digest == digest:
            return self._package
        refused = self._refused_packages.get(digest)
        if refused is not None:
            raise PackageError(refused.reason, f"{refused.detail} (refused before, not downloaded again)")
        path = self.state_dir / MODELS_DIR / f"{digest.hex()}.flpkg"
        with storing("the model package", path.parent):  # a damaged copy is removed: a write, on a card gone read-only
            package = await finished_in_thread(self._stored_package, path, digest)
        if package is None:
            blob = await client.package_bytes(digest)
            try:
                with storing("the model package", path.parent):
                    package = await finished_in_thread(self._store_package, path, digest, blob)
            except PackageError as exc:
                if exc.digest == digest:
                    while len(self._refused_packages) >= REFUSED_PACKAGES_KEPT:
                        del self._refused_packages[next(iter(self._refused_packages))]
                    self._refused_packages[digest] = exc
                raise
        self._package = package
        return package

    def _stored_package(self, path: Path, digest: bytes) -> ModelPackage | None:
        """The package kept at ``path``; None when there is none, or when the file does not verify as ``digest``
        (damaged on flash): then it is removed with one log line and downloaded again, not counted as a refusal."""
        if not path.exists():
            return None
        try:
            package = load_package(path, self.aggregator_key)
        except PackageError as exc:
            problem = f"{exc.reason}: {exc.detail}"
        else:
            if package.digest == digest:
                return package
            problem = f"it holds package {package.digest.hex()}"
        log.warning("stored model package %s ignored and removed (%s); downloading it again", path, problem)
        path.unlink(missing_ok=True)
        return None

    async def _check_package_after_failure(self, package: ModelPackage) -> None:
        """The trainer reads the package from flash each round: a file damaged after the agent loaded it fails every
        round from then on. After a failed training its file is checked again; a damaged one is removed (one log line,
        :meth:`_stored_package`) and forgotten, so the next round downloads it again instead of failing too."""
        path = self.state_dir / MODELS_DIR / f"{package.digest.hex()}.flpkg"
        try:
            intact = await finished_in_thread(self._stored_package, path, package.digest)
        except OSError as exc:  # unreadable, or not removable: the next round's check names it and counts it
            log.warning("the stored model package %s could not be checked after the failed training: %s", path, exc)
            intact = None
        if intact is None and self._package is package:
            self._package = None

    def _store_package(self, path: Path, digest: bytes, blob: bytes | memoryview) -> ModelPackage:
        """Verify a downloaded package, then keep it at ``path`` durably (fsynced before its rename, the directory
        after it): a power cut leaves the whole package or none, never a short file under its final name (what the
        write it cut short left is removed at the next start, Agent.__init__)."""
        package = decode_package(blob, self.aggregator_key, origin=f"package {digest.hex()} from the aggregator")
        if package.digest != digest:
            raise ProtocolError("wrong-package", f"package digest {package.digest.hex()} is not {digest.hex()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, blob)
        return package

    async def _ensure_release(self, client: AggregatorClient, task: wire.Task) -> wire.ModelRelease:
        # The digests decide, not the version number: a stored release may be a version of that number from before
        # the aggregator's store was reset, or of another package.
        held = self._release
        if held is not None and (held.version, held.digest, held.package_digest) == (
            task.model_version, task.model_digest, task.package_digest
        ):
            return held
        package = self._package
        assert package is not None
        # The release held is the base a delta may start from (docs/protocol.md 6.5): the steps are applied and
        # the result checked against the signed digest before it replaces the release held.
        base = self._release if self._release is not None and self._release.package_digest == package.digest else None
        release, answer = await client.model_answer(task.model_version, package.param_specs, base)
        if release.digest != task.model_digest or release.package_digest != task.package_digest:
            raise ProtocolError("wrong-model", f"release {release.version} does not match the task's digests")
        if release.version != task.model_version:  # the heartbeat reports the version held
            raise ProtocolError("wrong-model", f"release {release.version} answers the task's version "
                                               f"{task.model_version}")
        self._release = release
        self.metrics.model_version.set(release.version)
        refused = await finished_in_thread(store_release, self.state_dir, answer, release, self.aggregator_key)
        if refused is not None:  # logged; the round goes on with the release in memory
            self.metrics.count_storage_failure(refused, round_given_up=False)
        return release

    # -- one round ------------------------------------------------------------------------------------

    def _frames_available(self, detector: bool) -> int:
        """Frames the package can train on: a detector only those stored with pseudo-boxes."""
        frames = FrameBuffer(self.state_dir / FRAMES_DIR)
        return frames.frames_with_boxes() if detector else len(frames)

    async def _wait_for_frames(self, task: wire.Task, detector: bool) -> bool:
        """Wait, while the round is open, until the frame buffer holds a batch (a freshly booted camera
        needs its labeller's warm-up first). Leaves a margin before the deadline to train and upload."""
        margin = 60.0
        while self._frames_available(detector) < task.batch_size:
            remaining = task.deadline - margin - self.clock.now()
            if remaining <= 0:
                return False
            self.set_status(f"round {task.round_id}: waiting for labelled frames")
            await asyncio.sleep(min(FRAME_POLL_SECONDS, remaining))
        return True

    def _batch_out_of_reach(self, task: wire.Task) -> str | None:
        """Why the frame buffer can never give the task's batch, or None: a batch of more frames than the buffer
        holds, counted in bytes as well as frames (of what the camera recorder writes: 1x32x32 with box slots,
        whatever the model), or than a round trains on (the trainer reads the newest ``samples_per_round`` frames)."""
        cams, batch = self.config.cameras, task.batch_size
        held = frames_held(cams.buffer_max_frames, cams.buffer_max_bytes)
        if batch > held:
            return (f"the task asks for batches of {batch} frames, more than the frame buffer holds ({held} frames of "
                    f"{record_size(CAMERA_FRAME_SHAPE, boxes=True)} bytes: [cameras] buffer_max_frames = "
                    f"{cams.buffer_max_frames}, buffer_max_bytes = {cams.buffer_max_bytes})")
        if batch > self.config.data.samples_per_round:
            return (f"the task asks for batches of {batch} frames, more than a round trains on ([data] "
                    f"samples_per_round = {self.config.data.samples_per_round})")
        return None

    async def _frames_ready(self, task: wire.Task, package: ModelPackage) -> bool:
        """Whether the frame buffer holds a batch before the round's deadline; when not, or when the card fails to
        read the buffer (a failing card: the round is given up, not the agent), the round is skipped, counted and
        logged. A batch the buffer can never give (:meth:`_batch_out_of_reach`) is not waited for (until a deadline
        that may be weeks away, with no other round taken meanwhile), nor left to fail in the trainer: the round is
        skipped at once."""
        out_of_reach = self._batch_out_of_reach(task)
        if out_of_reach is not None:
            self.metrics.rounds_skipped.labels("no-data").inc()
            log.warning("round %d: %s; skipping", task.round_id, out_of_reach)
            return False
        detector = bool(package.detection)
        try:
            if await self._wait_for_frames(task, detector):
                return True
        except OSError as exc:
            reason = storage_reason(exc)
            if reason is None:
                raise
            self.metrics.count_storage_failure(reason, round_given_up=True)
            log.error("round %d: cannot read the frame buffer in %s: %s; skipping the round", task.round_id,
                      self.state_dir / FRAMES_DIR, exc.strerror or exc)
            return False
        self.metrics.rounds_skipped.labels("no-data").inc()
        log.info("round %d: too few labelled frames before its deadline; skipping", task.round_id)
        return False

    async def _train(self, task: wire.Task, package: ModelPackage, release: wire.ModelRelease) -> wire.Update | None:
        data = self.config.data
        if data.source == "cameras" and not await self._frames_ready(task, package):
            return None
        waited = await self.pressure.wait_async()
        if waited:
            self.metrics.pressure_pause.inc(waited)
        batch_size = task.batch_size
        loop = asyncio.get_running_loop()
        self.oom_retries = 0
        while True:
            job = TrainJob(
                package_path=str(self.state_dir / MODELS_DIR / f"{package.digest.hex()}.flpkg"),
                aggregator_key=bytes(self.aggregator_key),
                params=release.tensors,  # read-only views, pickled to the trainer, which trains on its own copy
                source=data.source,
                state_dir=str(self.state_dir),
                samples=data.samples_per_round,
                synthetic_camera=data.synthetic_camera,
                seed=data.seed * 1_000_003 + task.round_id,
                epochs=task.epochs,
                batch_size=batch_size,
                learning_rate=task.learning_rate,
                prox_mu=task.prox_mu,
                threads=self.threads,
            )
            timeout = max(60.0, task.deadline - self.clock.now() + 60)
            try:
                with self.metrics.training_seconds.time():
                    run = functools.partial(self.sandbox.run, run_train_job, job, timeout=timeout)
                    result = await loop.run_in_executor(None, run)
                break
            except TrainerKilled as exc:
                self.metrics.trainer_kills.labels("oom" if exc.oom else "signal").inc()
                smaller = next_batch_size_after_oom(batch_size) if exc.oom else None
                if smaller is None:
                    log.error("round %d: trainer killed (%s); giving up this round", task.round_id, exc)
                    self.metrics.rounds_skipped.labels("trainer-killed").inc()
                    return None
                log.warning("round %d: trainer killed for memory; retrying with batch %d", task.round_id, smaller)
                batch_size = smaller
                self.oom_retries += 1
            except (TrainerFailed, TimeoutError) as exc:
                await self._check_package_after_failure(package)
                failure = trainer_storage_failure(exc, self.state_dir)
                if failure is not None:  # the card, not the model: given up as any round the card refuses (_round)
                    raise failure from exc
                log.error("round %d: training failed: %s", task.round_id, exc)
                self.metrics.rounds_skipped.labels("trainer-failed").inc()
                return None
        delta, norm = clip_update(result.delta, task.clip_norm)
        metrics = {k: float(v) for k, v in result.metrics.items()}
        metrics["update_norm"] = norm
        self.metrics.samples.inc(result.num_samples * task.epochs)
        if "loss_after" in metrics:
            self.metrics.train_loss.set(metrics["loss_after"])
        return wire.Update(
            device_id=self.identity.device_id,
            round_id=task.round_id,
            model_version=task.model_version,
            base_digest=task.model_digest,
            num_samples=result.num_samples,
            tensors=delta,
            metrics=metrics,
            encoding=task.encoding,
            created_at=int(self.clock.now()),
        )

    async def _round(self, client: AggregatorClient, task: wire.Task) -> None:
        """Take part in the round of ``task``. A round that cannot store what it needs is given up: one log line,
        counted, and the agent waits for the next round (which tries again)."""
        try:
            await self._take_part(client, task)
        except StorageFailure as failure:
            self.last_round = max(self.last_round, task.round_id)
            self.metrics.count_storage_failure(failure.reason, round_given_up=True)
            log.error("round %d: %s; skipping the round", task.round_id, failure)
            self.set_status(f"round {task.round_id} skipped: {failure}; waiting for round > {self.last_round}")

    async def _take_part(self, client: AggregatorClient, task: wire.Task) -> None:
        self.metrics.round.set(task.round_id)
        if task.deadline < self.clock.now():
            self.metrics.rounds_skipped.labels("deadline-passed").inc()
            self.last_round = task.round_id
            return
        try:
            package = await self._ensure_package(client, task.package_digest)
            check_fits(package, self.config.data.source)  # before the release: a package that cannot train here
            release = await self._ensure_release(client, task)
        except AggregatorUnavailable as exc:
            log.error("round %d: the model download failed: %s", task.round_id, exc)
            raise ModelDownloadFailed(exc) from exc
        except (ProtocolError, PackageError) as exc:
            self.metrics.models_refused.labels(exc.reason).inc()
            log.error("round %d: refused the model from the aggregator: %s", task.round_id, exc)
            raise ModelRefused(str(exc)) from exc
        self.metrics.rounds_joined.inc()
        self.set_status(f"training round {task.round_id} on model v{task.model_version}")
        if task.secure_aggregation:
            await self._secure_round(client, task, package, release)
            return
        update = await self._train(task, package, release)
        if update is None:
            unsaved = await finished_in_thread(self._record_round, task.round_id, None)
            if unsaved is not None:
                self._note_unsaved(unsaved, f"round {task.round_id}: skipped")
        else:
            body = wire.encode_update(update, self.identity.signing_key)
            unsaved = await finished_in_thread(self._record_round, task.round_id, body)
            if unsaved is not None:  # the update is queued all the same; a restart before the next save retrains
                self._note_unsaved(unsaved, f"round {task.round_id}: update queued")
            self.metrics.rounds.inc()
            self.metrics.update_bytes.inc(len(body))
            self._outbox_changed.set()
            log.info(
                "round %d: update queued (%d samples, %d bytes, loss %.4f -> %.4f)",
                task.round_id,
                update.num_samples,
                len(body),
                update.metrics.get("loss_before", math.nan),
                update.metrics.get("loss_after", math.nan),
            )
        self.set_status(f"waiting for round > {self.last_round}")

    def _record_round(self, round_id: int, update: bytes | None) -> StorageFailure | None:
        """Queue the round's update (when it has one), then save the round as taken, in that order: a restart
        neither forgets the update nor trains the round twice. Runs in a worker thread (see the module docstring)
        that finishes both even when the agent is stopped meanwhile, and the round waits for it
        (:func:`finished_in_thread`). An update the outbox cannot store raises :class:`StorageFailure` (nothing
        of it is left, the round is not recorded); a state that cannot be saved is returned (the round is taken
        in memory)."""
        if update is not None:
            with storing("the update", self.outbox.directory):
                self.outbox.put(update)
        self.last_round = round_id
        return self._saved_state()

    async def _secure_round(
        self, client: AggregatorClient, task: wire.Task, package: ModelPackage, release: wire.ModelRelease
    ) -> None:
        """A secure-aggregation round (appliance/secagg_client.py). Its secrets live in memory only, so the round
        is marked as taken before it starts: an agent that restarts mid-round has dropped out of it. So a round that
        cannot be saved as taken is not started."""
        unsaved = await finished_in_thread(self._record_round, task.round_id, None)
        if unsaved is not None:
            raise unsaved

        async def queue(body: bytes) -> None:  # the masked input goes out like an update: durably, via the outbox
            with storing("the masked input", self.outbox.directory):
                await finished_in_thread(self.outbox.put, body)
            self.metrics.rounds.inc()
            self.metrics.update_bytes.inc(len(body))
            self._outbox_changed.set()

        secure = SecureRound(Transport(client.base_url, client.session, self.aggregator_key), task,
                             self.identity.device_id, self.identity.signing_key, now=self.clock.now)
        outcome = await take_part(secure, flat_update(self._train(task, package, release), package.param_specs),
                                  queue)
        log.info("round %d: secure aggregation: %s", task.round_id, outcome)
        self.set_status(f"waiting for round > {self.last_round}")

    def set_status(self, text: str) -> None:
        note = self._clock_note()
        self.status = f"{text}; {note}" if note else text
        systemd.notify(f"STATUS={self.status}")

    def _clock_note(self) -> str:
        """How far the device clock is off the aggregator's, when it is off by more than CLOCK_OFF_SECONDS."""
        offset = self.clock.offset()
        if not abs(offset) > CLOCK_OFF_SECONDS:  # NaN (no task yet) included
            return ""
        days = f" ({abs(offset) / 86400:.1f} days)" if abs(offset) >= 86400 else ""
        return f"device clock {abs(offset):.0f} s{days} {'behind' if offset > 0 else 'ahead of'} the aggregator's"

    def _learn_time(self, task: wire.Task) -> None:
        """Learn the aggregator's time from a verified task; log when the device clock turns out to be off."""
        self.clock.observe(task.issued_at, task.deadline)
        offset = self.clock.offset()
        warned = self._clock_warned_offset
        if abs(offset) > CLOCK_OFF_SECONDS:
            if warned is None or abs(offset - warned) > CLOCK_OFF_SECONDS:
                log.warning(
                    "%s: deadlines are judged and updates stamped in the aggregator's time (is time sync working?)",
                    self._clock_note(),
                )
                self._clock_warned_offset = offset
        elif warned is not None:
            log.info("device clock agrees with the aggregator's again")
            self._clock_warned_offset = None

    # -- loops ----------------------------------------------------------------------------------------

    async def _next_task(self, client: AggregatorClient, skip_through: int = 0) -> wire.Task | None:
        """The task of the next round to take part in (a long-poll), or None; ``skip_through``: a round whose model
        was refused, left while its backoff runs, so that only a newer round answers the long-poll at once.

        Until the aggregator has answered once, the agent asks for the task of whatever round is open, whatever its
        id, without waiting: a board that restarts after taking part in the open round would otherwise see no task
        until the next round opens (an hour away, say, or never once the rounds are over), and until then stamp its
        heartbeats by its own clock, which on a board without a real-time clock may be years off, and which the
        fleet view refuses (``expired``): the device would show as silent all that time."""
        try:
            if not self._open_round_asked and not self.clock.known:
                task = await client.next_task(0, 0)
                self._open_round_asked = True
                return task
            after, wait = max(self.last_round, skip_through), self.config.aggregator.poll_wait_seconds
            if after > self.last_round:  # the poll ends with the refusal's wait, to take its round up again then
                wait = min(wait, math.ceil(self.refusal_backoff.wait_left()))
            return await client.next_task(after, wait)
        finally:
            self._first_poll_done.set()

    async def round_loop(self, client: AggregatorClient) -> None:
        """Poll for tasks and take part in their rounds. A failed poll is retried after a backoff (at most a
        minute). A task whose model was refused, or whose model download failed, is left for a backoff of its own
        (:mod:`appliance.refusal_backoff`, growing with each failure of the same task, at most five minutes) while the
        polls go on: each retry downloads the model again (the poll that brought the task has just reset the failed
        polls' count), but a newer task is taken at once."""
        backoff = Backoff(base=1.0, cap=60.0)
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                polled_at = loop.time()
                skip_through = self.refusal_backoff.skip_through()
                task = await self._next_task(client, skip_through)
                answered_after_failure, failures = failures > 0, 0
                if task is None and not skip_through and self.refusal_backoff.pending:
                    # No wait runs, yet no round is open: the refused round is over, and its status with it.
                    self.refusal_backoff.clear()
                    answered_after_failure = True
                if task is not None:
                    self._learn_time(task)
                    if task.round_id > self.last_round and not self.refusal_backoff.holds(task):
                        if await self._round_or_refusal(client, task):
                            continue
                        answered_after_failure = False  # the status names the refusal until its retry
                if answered_after_failure:  # no round to take: the status no longer names the last failure
                    self.set_status(f"waiting for round > {self.last_round}")
                await asyncio.sleep(polled_at + POLL_MIN_SECONDS - loop.time())  # no round to take
            except (AggregatorUnavailable, ProtocolError) as exc:
                self.metrics.aggregator_errors.labels("task").inc()
                delay = backoff.delay(failures)
                failures += 1
                log.warning("aggregator: %s; retrying in %.1f s", exc, delay)
                self.set_status(retry_status(exc, delay))
                await asyncio.sleep(delay)

    async def _round_or_refusal(self, client: AggregatorClient, task: wire.Task) -> bool:
        """Take part in ``task``'s round: True when it was taken (the refusal backoff starts over), False when its
        model was refused or could not be downloaded (counted, logged and named in the status with the wait before
        the task is taken up again)."""
        try:
            await self._round(client, task)
        except (ModelRefused, ModelDownloadFailed) as exc:
            self.metrics.aggregator_errors.labels("task").inc()
            delay = self.refusal_backoff.refused(task)
            log.warning("aggregator: %s; round %d taken up again in %.1f s unless a newer task comes", exc,
                        task.round_id, delay)
            self.set_status(retry_status(exc.cause if isinstance(exc, ModelDownloadFailed) else exc, delay))
            return False
        self.refusal_backoff.clear()
        return True

    def heartbeat(self) -> Heartbeat:
        """The device's state for the aggregator's fleet view (appliance/fleet_report.py)."""
        usage = read_usage(self.budget.base)
        cameras = self.metrics.registry.get_sample_value("fl_agent_cameras_present") or 0
        return build_heartbeat(
            device_id=self.identity.device_id, agent_version=__version__,
            model_version=self._release.version if self._release is not None else None, last_round=self.last_round,
            cameras=int(cameras), budget=self.budget, usage=usage,
            cpu_throttled=self._throttle.permille(usage.cpu_throttled_usec), oom_retries=self.oom_retries,
            outbox=self.outbox.depth, outbox_bytes=self.outbox.pending_bytes, sent_at=self.heartbeat_stamps.stamp(),
            storage_errors=self.metrics.storage_errors_total(),
        )

    async def heartbeat_loop(self, client: AggregatorClient) -> None:
        """Report to the fleet view at start and every few minutes; a refused or lost report is logged and counted
        (``fl_agent_aggregator_errors_total{operation="heartbeat"}``), never retried: the next one says the same,
        newer. The first waits (a moment) for the round loop's first answer, so that it is stamped in the
        aggregator's time (:meth:`_next_task`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first_poll_done.wait(), FIRST_REPORT_WAIT_SECONDS)
        while True:
            try:
                await self._report(client)
            except (AggregatorUnavailable, Rejection) as exc:
                if isinstance(exc, Rejection) and exc.reason == "expired":  # outside the aggregator's window
                    self.heartbeat_stamps.after_expired()
                self.metrics.aggregator_errors.labels("heartbeat").inc()
                log.warning("heartbeat not taken: %s", exc)
            await asyncio.sleep(next_delay())

    async def _report(self, client: AggregatorClient) -> None:
        """Send one heartbeat. Refused as not newer than the report the fleet view holds (a board restarted mid-round
        after reporting in it: appliance/heartbeat_stamps.py), it goes once more, stamped after that report."""
        heartbeat = self.heartbeat()
        try:
            await client.send_heartbeat(encode_heartbeat(heartbeat, self.identity.signing_key))
        except StaleReport as exc:
            if exc.held_sent_at is None or not self.heartbeat_stamps.after_stale(exc.held_sent_at):
                raise
            log.info("the fleet view holds a report of this device stamped %d, after this one (%d): heartbeats are "
                     "stamped after it", exc.held_sent_at, heartbeat.sent_at)
            again = restamped(heartbeat, self.heartbeat_stamps.stamp())
            await client.send_heartbeat(encode_heartbeat(again, self.identity.signing_key))

    async def delivery_loop(self, client: AggregatorClient) -> None:
        async def send(body: bytes) -> wire.Receipt:
            try:
                return await client.send_update(body)
            except Rejection as exc:
                log.error("update refused by the aggregator: %s", exc)
                raise PermanentRejection(exc.reason, exc.detail) from exc
            except ReceiptRefused as exc:  # no proof that the update was stored: keep it, send it again
                self.metrics.receipts_refused.labels("wrong-update" if exc.names_another_update else "unverified").inc()
                log.error("aggregator: %s; the update stays in the outbox", exc)
                raise AggregatorUnavailable(str(exc)) from exc  # a failed delivery like any other, for the outbox

        async def on_receipt(key: str, receipt: wire.Receipt) -> None:
            if key in self._queued_before_start and receipt.accepted_at <= self.acknowledged_at:
                # Queued before this start, and no newer than the receipt saved: acknowledged before a restart but
                # left in the outbox (the agent stopped between the receipt and the removal, or the removal failed),
                # sent again and answered with its original receipt. It was counted then (the outbox delivers oldest
                # first, one at a time, so its receipt came no later than the one saved), and the time of the last
                # round must not go back.
                log.info("round %d: update %s acknowledged before, sent again after a restart; removed now",
                         receipt.round_id, key[:16])
                return
            self.metrics.rounds_completed.inc()
            self.acknowledged_at = receipt.accepted_at
            self.metrics.last_round_timestamp.set(receipt.accepted_at)
            log.info("round %d: update %s acknowledged", receipt.round_id, key[:16])
            unsaved = await finished_in_thread(self._saved_state)  # off the loop, as every durable write
            if unsaved is not None:
                self._note_unsaved(unsaved, f"round {receipt.round_id}: receipt taken")

        backoff = Backoff(base=1.0, cap=120.0)
        refused = 0  # storage errors in a row
        while True:
            self._outbox_changed.clear()
            try:
                await self.outbox.deliver(send, backoff=backoff, on_receipt=on_receipt, in_thread=finished_in_thread)
            except OSError as exc:  # the outbox's own writes (a removal, a rejected update moved aside)
                reason = storage_reason(exc)
                if reason is None:
                    raise
                self.metrics.count_storage_failure(reason, round_given_up=False)
                delay = backoff.delay(refused)
                refused += 1
                log.error(
                    "outbox %s: %s; delivery goes on in %.0f s (an acknowledged update left on disk is sent again "
                    "after a restart, and the aggregator answers it with its receipt)",
                    self.outbox.directory, exc.strerror or exc, delay,
                )
                await asyncio.sleep(delay)
                continue
            refused = 0
            await self._outbox_changed.wait()

    async def run(self, extra_tasks: list[Coroutine[Any, Any, None]] | None = None) -> None:
        """Run until cancelled. Sends READY=1 once identity, outbox and metrics are up."""
        if self.config.metrics.listen:
            self.metrics.serve(self.config.metrics.listen, self.config.metrics.web_config)
        log.info(
            "fl-agent %s: device %s, aggregator %s, budget: %s",
            __version__,
            self.identity.device_id,
            self.config.aggregator.url,
            self.budget.reason,
        )
        async with AggregatorClient(
            self.config.aggregator.url,
            self.aggregator_key,
            self.config.aggregator.request_timeout_seconds,
            ca_file=self.config.aggregator.ca_file,
        ) as client:
            systemd.notify("READY=1")
            self.set_status(f"waiting for round > {self.last_round}")
            tasks = [
                asyncio.create_task(self.round_loop(client), name="rounds"),
                asyncio.create_task(self.delivery_loop(client), name="delivery"),
                asyncio.create_task(self.heartbeat_loop(client), name="heartbeat"),
                asyncio.create_task(systemd.watchdog_loop(), name="watchdog"),
                *[asyncio.create_task(t) for t in extra_tasks or []],
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # a loop that ended raised: let it end the agent (systemd restarts it)
            finally:
                systemd.notify("STOPPING=1")
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*tasks, return_exceptions=True)
                self.sandbox.close()

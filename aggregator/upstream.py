"""Site mode: an aggregator that is itself a device of a parent aggregator (a tree, site -> city).

Toward its parent, a site behaves exactly like a device with its own Ed25519 key (its aggregator key, enrolled
at the parent like a device's): it long-polls the parent's ``/v1/task``, fetches the parent's model release
(verified against the pinned ``--upstream-key``) and opens its own round on that model version for its own
devices, re-signed with the site key (the release digest is the SHA-256 of the tensor section, so it is the
same at the parent and the site). When the site's round closes with its quorum, it sends ONE signed update to
the parent: the sample-weighted mean delta of its devices, the sum of their samples and the weighted mean of
their metrics. The parent's FedAvg over site updates is then FedAvg over all the devices. A site without its
quorum sends nothing, which the parent sees as one dropout. When the parent publishes the next version, the
next parent task brings it down, and the site opens its next round on it.

An async site (``--mode async``) under an async parent does not wait for that: right after a forward it opens its
next buffer on the same version, so its devices' updates keep counting (their staleness is measured against the
versions the parent publishes, as for any async update). That buffer answers the same parent round, and its
forward counts in the parent's next buffer at the site's staleness there. The parent counts one update per site
per buffer and refuses a second one as ``duplicate``: the site then waits for the parent's next task and sends the
same bytes again. Every forward is written to ``<state>/upstream/round-<site round>.forward`` before it is sent, so
a site killed after sending and before recording resends the identical update, which the parent answers with the
original receipt: a forward counts once.

Robust rules (median, trimmed mean, Krum) and server optimisers (FedAdam/FedYogi) do not compose over
partial sums, so a site must run plain FedAvg; the root of the tree may run any strategy.

With ``--secure-aggregation`` a site runs secure rounds among its own devices (aggregator/secagg_round.py) and
forwards only their sum: the site never sees one device's update, and the parent sees one update per site.
A parent's secure round is not joined: a site is one sender of a plain sum, not a device with a mask key.

Time: toward its parent a site is a device, so it judges the parent's deadlines and stamps its forwards in the
parent's time as learnt from the parent's signed tasks (appliance/clock.py, as the agent does), never by its own clock
alone, which on a board without a real-time clock may be years off until time sync succeeds. Its own rounds, and the
tasks it signs for its devices, are in its own time: a site round lasts what is left of the parent's round (less a
margin), counted from the site's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from nacl.signing import SigningKey, VerifyKey

from aggregator.models import ModelStore
from aggregator.rounds import ForwardError, OpenRound, RoundEngine
from aggregator.store import Store
from appliance import wire
from appliance.base_url import base_url_problem
from appliance.client import AggregatorClient, AggregatorUnavailable, Rejection
from appliance.clock import AggregatorClock
from appliance.durable import atomic_write
from appliance.errors import ProtocolError
from appliance.identity import IdentityError, read_key_file

log = logging.getLogger(__name__)

TASKS_DIR = "upstream"  # <state>/upstream/round-<site round>.task: the parent task each site round answers


class UpstreamError(ValueError):
    """Bad site-mode configuration; the message names the option and the problem."""


@dataclass(frozen=True)
class UpstreamConfig:
    """Where the parent aggregator is and the key its tasks and releases must be signed with."""

    url: str
    key: VerifyKey
    ca_file: str = ""  # https: the PEM the parent's certificate is verified against (a CA, or the certificate)
    poll_seconds: float = 30.0  # long-poll wait per /v1/task request
    retry_seconds: float = 2.0  # first back-off after a network error (doubles up to 30 s)

    def __post_init__(self) -> None:
        check_upstream_url(self.url)


def check_upstream_url(url: str) -> str:
    """``--upstream``'s scheme, ``http`` or ``https``; UpstreamError naming what is wrong with a URL the site could
    not poll, which it would otherwise retry for ever. A path is kept (a parent behind a reverse proxy's prefix)."""
    problem = base_url_problem(url)
    if problem:
        raise UpstreamError(f"--upstream must be an http:// or https:// URL, got {url!r} ({problem})")
    return urlsplit(url).scheme


def parse_upstream_key(text: str) -> VerifyKey:
    """``--upstream-key``: 64 hex characters, or a file holding them (such as the parent's aggregator.pub)."""
    candidate = text.strip()
    if len(candidate) == 64:
        try:
            return VerifyKey(bytes.fromhex(candidate))
        except ValueError:
            pass
    try:
        return VerifyKey(read_key_file(Path(text)))
    except IdentityError as exc:
        raise UpstreamError(f"--upstream-key is neither 64 hex characters nor a readable key file: {exc}") from None


def check_site_strategy(strategy: str, options: dict[str, object]) -> None:
    """Refuse rules whose result is not a function of the per-site weighted means (only plain FedAvg is)."""
    if strategy != "fedavg":
        raise UpstreamError(
            f"--upstream needs --strategy fedavg: a site forwards a partial weighted mean, and {strategy} does not "
            "compose over partial sums (run robust rules and server optimisers at the root of the tree)"
        )
    if options.get("server_lr", 1.0) != 1.0:
        raise UpstreamError("--server-lr does not apply with --upstream: the root of the tree applies it")


@dataclass(frozen=True)
class ParentRound:
    """The parent task a site round answers, recorded in ``<state>/upstream/`` so it survives a restart."""

    round_id: int
    model_version: int
    model_digest: bytes
    deadline: int
    encoding: str = "float32"  # the tensor encoding the parent's task asks for (it refuses any other)


class UpstreamLink:
    """The site's device side toward its parent: follows the parent's tasks and forwards closed rounds."""

    def __init__(self, config: UpstreamConfig, engine: RoundEngine, store: Store, models: ModelStore,
                 key: SigningKey, state_dir: Path):
        self.config = config
        self.engine = engine
        self.store = store
        self.models = models
        self.key = key
        self.tasks_dir = Path(state_dir) / TASKS_DIR
        self.tasks_dir.mkdir(exist_ok=True)
        self._client: AggregatorClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._newest_parent = self._resume_after()  # the newest parent round whose task this site has seen
        self._parent_moved = asyncio.Condition()
        self.parent_clock = AggregatorClock(wall=time.time)  # the parent's time, learnt from its tasks
        self._parent_mode_read = False  # whether engine.reopen_after_forward says the parent's mode yet
        engine.forward = self.forward
        engine.forward_written = lambda site_round: self._forward_path(site_round).exists()

    @property
    def device_id(self) -> str:
        return wire.key_id(self.key.verify_key)

    # ------------------------------------------------------------------------------------- parent tasks

    def _task_path(self, site_round: int) -> Path:
        return self.tasks_dir / f"round-{site_round:08d}.task"

    def _forward_path(self, site_round: int) -> Path:
        return self.tasks_dir / f"round-{site_round:08d}.forward"

    def _answered(self, site_round: int) -> tuple[int, ParentRound] | None:
        """The parent task ``site_round`` answers, and the site round it was recorded for: its own, or (an async
        buffer opened right after a forward, on the same version) the newest one recorded before it."""
        recorded = sorted((int(path.stem[len("round-"):]) for path in self.tasks_dir.glob("round-*.task")
                           if path.stem[len("round-"):].isdigit()), reverse=True)
        for owner in recorded:
            if owner <= site_round and (parent := self._parent_round(owner)) is not None:
                return owner, parent
        return None

    def _parent_round(self, site_round: int) -> ParentRound | None:
        """What the parent task recorded for ``site_round`` asked for (None when not recorded)."""
        try:
            record = json.loads(self._task_path(site_round).read_text())
            return ParentRound(int(record["round"]), int(record["model_version"]),
                               bytes.fromhex(record["model_digest"]), int(record["deadline"]),
                               str(record.get("encoding", "float32")))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _resume_after(self) -> int:
        """The last parent round a site round answered (after a restart), so that no parent round is answered
        twice: a parent round still open after the site forwarded to it would otherwise get a second site round,
        whose forward the parent refuses as a duplicate, and that round's acknowledged updates would be lost."""
        answered = (self._parent_round(int(path.stem[len("round-"):]))
                    for path in self.tasks_dir.glob("round-*.task") if path.stem[len("round-"):].isdigit())
        return max((parent.round_id for parent in answered if parent is not None), default=0)

    async def start(self) -> None:
        self._client = AggregatorClient(self.config.url, self.config.key,
                                        timeout_seconds=self.config.poll_seconds + 60, ca_file=self.config.ca_file)
        await self._client.__aenter__()
        self._task = asyncio.create_task(self._follow(), name="upstream")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.__aexit__(None, None, None)

    async def _follow(self) -> None:
        assert self._client is not None
        after = self._resume_after()
        if self.engine.policy.buffer is not None:  # a site restarted between a forward and the parent's next task
            await self._read_parent_mode()
        backoff = self.config.retry_seconds
        while True:
            taking = None  # the parent round taken before the task being taken now
            try:
                task = await self._client.next_task(after, self.config.poll_seconds)
                if task is not None:
                    self.parent_clock.observe(task.issued_at, task.deadline)
                    taking, after = after, task.round_id
                    async with self._parent_moved:
                        self._newest_parent = max(self._newest_parent, after)
                        self._parent_moved.notify_all()
                    await self._take(task)
                backoff = self.config.retry_seconds
                continue
            except (AggregatorUnavailable, ProtocolError) as exc:
                log.warning("upstream %s: %s; retrying in %.0f s", self.config.url, exc, backoff)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following upstream round %d failed; retrying in %.0f s", after, backoff)
            if taking is not None:
                # Taking the task failed (its model's download cut short, a disk error ending the site's round
                # before): it is taken again at the next poll. Skipped, it left the site without a round on the
                # parent's version until the parent's next task, which an async parent, waiting for the site's
                # updates, would never send.
                after = taking
            # Backing off however it failed: a task taken again after a failure that lasts (a full disk refusing the
            # model) would otherwise download its model from the parent every retry_seconds.
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _take(self, task: wire.Task) -> None:
        """Open a site round answering the parent's ``task`` (adopting its model version when new here)."""
        assert self._client is not None
        if task.package_digest != self.models.package_digest:
            log.error(
                "upstream round %d trains package %s but this site serves %s: start the site with the same model "
                "package (re-signed with the site key); not joining", task.round_id, task.package_digest.hex()[:16],
                self.models.package_digest.hex()[:16],
            )
            return
        if task.secure_aggregation:
            log.error(
                "upstream round %d is a secure-aggregation round, which a site cannot join (it forwards one plain "
                "sum of its devices); run secure aggregation on the sites and plain FedAvg at the root", task.round_id,
            )
            return
        left = task.deadline - self.parent_clock.now()  # the parent round's time left, in the parent's time
        margin = max(1.0, 0.1 * left)  # leave the forward time to reach the parent
        seconds = min(self.engine.policy.round_timeout, left - margin)
        if seconds <= 0:
            log.warning("upstream round %d closes too soon to collect anything; skipping it", task.round_id)
            return
        deadline = time.time() + seconds  # the site round's, in the site's time (the tasks its devices get)
        if self.engine.policy.buffer is not None:
            await self._read_parent_mode()
        params = None
        if self.store.model_digest(task.model_version) != task.model_digest:
            release = await self._client.model_release(task.model_version, self.models.layout.specs)
            if release.digest != task.model_digest or release.version != task.model_version:
                raise ProtocolError("wrong-model", f"upstream release {release.version} does not match its task")
            if release.package_digest != self.models.package_digest:
                raise ProtocolError("wrong-model", "upstream release names another model package")
            params = self.models.layout.flatten(release.tensors)
        site_round = await self.engine.open_for_upstream(task.model_version, params, deadline)
        record = {"round": task.round_id, "model_version": task.model_version, "model_digest": task.model_digest.hex(),
                  "deadline": task.deadline, "encoding": task.encoding}
        await self.engine.write_record(f"site round {site_round}'s upstream task", atomic_write,
                                       self._task_path(site_round), json.dumps(record).encode())
        log.info("upstream round %d (model version %d): site round %d open until %.0f", task.round_id,
                 task.model_version, site_round, deadline)

    # ------------------------------------------------------------------------------------------ forwarding

    async def _parent_is_async(self) -> bool | None:
        """Whether the parent runs async buffers (its ``GET /v1/status``): only such a parent takes an update based
        on a version older than its round's, which a buffer opened right after a forward sends. None: not read."""
        assert self._client is not None
        try:
            async with self._client.session.get(self._client.base_url + "/v1/status", params={"rounds": "1"}) as r:
                if r.status == 200:
                    return (await r.json()).get("async") is not None
                problem = f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            problem = str(exc)
        log.warning("upstream %s: status not read (%s); reading it again before the next forward", self.config.url,
                    problem)
        return None

    async def _read_parent_mode(self) -> None:
        """Async site: whether its next buffer opens right after a forward (engine.reopen_after_forward). A mode not
        read (the parent unreachable, as when it restarts with the site) counts as sync until the forward, which
        reads it again: taken as known, the site would open no buffer after that forward until the parent's next
        version, refusing its devices' updates meanwhile (410 round-closed, which the agent does not retry)."""
        is_async = await self._parent_is_async()
        self.engine.reopen_after_forward = bool(is_async)
        self._parent_mode_read = is_async is not None

    async def _forward_body(self, site_round: int, update: wire.Update) -> bytes:
        """The signed update for ``site_round``: the one written before an earlier attempt, else a new one, written
        (fsync) before it is sent so that a resend after a crash is byte-identical. Written on the round engine's
        records thread: a disk that stops answering holds the forward, not the site's event loop."""
        path = self._forward_path(site_round)
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes()
        body = wire.encode_update(update, self.key)
        await self.engine.write_record(f"site round {site_round}'s forward", atomic_write, path, body)
        return body

    async def _parent_now(self) -> float:
        """The parent's time now. Until a parent task has taught it, the parent is asked for its open round's task
        without waiting (``after=0``), as an agent does at start: a site restarted mid-round sees no parent task until
        the parent's next round, which waits for this round's forward, and its own clock may be years off."""
        if not self.parent_clock.known:
            assert self._client is not None
            with contextlib.suppress(AggregatorUnavailable, ProtocolError):
                task = await self._client.next_task(0, 0)
                if task is not None:
                    self.parent_clock.observe(task.issued_at, task.deadline)
        return self.parent_clock.now()

    async def forward(self, round_: OpenRound, delta: np.ndarray, samples: int, metrics: dict[str, float]) -> str:
        """Send a closed site round upstream as one signed update; returns the note for the round's record."""
        answered = self._answered(round_.round_id)
        if answered is None:
            raise ForwardError(f"site round {round_.round_id} answers no recorded upstream round; nothing forwarded")
        owner, parent = answered
        if parent.model_version != round_.model_version:
            raise ForwardError(f"site round {round_.round_id} trained version {round_.model_version}, upstream round "
                               f"{parent.round_id} version {parent.model_version}")
        update = wire.Update(
            device_id=self.device_id, round_id=parent.round_id, model_version=parent.model_version,
            base_digest=parent.model_digest, num_samples=samples,
            tensors=self.models.layout.unflatten(delta), metrics=metrics, encoding=parent.encoding,
            created_at=int(await self._parent_now()),
        )
        body = await self._forward_body(round_.round_id, update)
        assert self._client is not None
        backoff = self.config.retry_seconds

        def time_left() -> float:  # a buffer opened after a forward outlives its parent round
            return max(parent.deadline - self.parent_clock.now(), round_.deadline - time.time())

        resigned = False
        while True:
            seen = self._newest_parent
            try:
                receipt = await self._client.send_update(body)
                break
            except Rejection as exc:
                if exc.reason == "duplicate" and self.engine.policy.buffer is None:
                    return f"already forwarded to upstream round {parent.round_id}"  # signed anew by an older site
                if exc.reason == "duplicate":  # the parent's buffer already holds this site's previous forward
                    log.info("upstream buffer holds site round %d's predecessor; forwarding after the next upstream "
                             "task", round_.round_id)
                    async with self._parent_moved:
                        await self._parent_moved.wait_for(lambda seen=seen: self._newest_parent > seen)
                    continue
                if exc.reason == "expired" and not resigned:  # never counted (a counted copy gets its receipt)
                    # Sign it anew, created now: the refused copy may have been written before a long outage.
                    resigned = True
                    update = replace(update, created_at=int(await self._parent_now()))
                    self._forward_path(round_.round_id).unlink()
                    body = await self._forward_body(round_.round_id, update)
                    continue
                hint = " (even signed just now: check the site's and the parent's clocks)" if resigned and (
                    exc.reason == "expired") else ""
                raise ForwardError(
                    f"upstream refused the site's update for round {parent.round_id}: {exc}{hint}") from None
            except AggregatorUnavailable as exc:
                if backoff >= time_left():
                    detail = f"upstream unreachable until round {parent.round_id}'s deadline: {exc}"
                    raise ForwardError(detail) from None
                log.warning("forwarding to upstream round %d: %s; retrying in %.0f s", parent.round_id, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        if self.engine.policy.buffer is not None and not self._parent_mode_read:
            # A buffer resumed with its forward written (closing at once) forwards before _follow has read the
            # parent's mode; the engine decides from it whether the next buffer opens now.
            await self._read_parent_mode()
        with contextlib.suppress(OSError):
            for old in self.tasks_dir.glob("round-*"):
                if (old.suffix == ".task" and old.name < self._task_path(owner).name) or (
                        old.suffix == ".forward" and old.name < self._forward_path(round_.round_id).name):
                    old.unlink()
        return (f"forwarded to upstream round {receipt.round_id}: {len(round_.devices)} updates, {samples} samples"
                f" (receipt at {receipt.accepted_at})")

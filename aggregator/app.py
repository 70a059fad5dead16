"""The aggregator's HTTP API (docs/api.md): app factory, routes, and the middleware that turns every refusal
into a ``application/problem+json`` 4xx with a stable ``reason`` — never a traceback.

Handlers stay thin: they parse the request, call the round engine or the verification functions (on worker
threads for anything that touches a whole update) and answer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import hdrs, web
from nacl.signing import SigningKey
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from aggregator import statuspage
from aggregator.disk_writes import within
from aggregator.fleet import (
    FILTERS,
    FLUSH_SECONDS,
    MAX_PER_PAGE,
    SORT_KEYS,
    Enrolled,
    Fleet,
    Forward,
    ReceiptRounds,
    ReportRefused,
)
from aggregator.metrics import AggregatorMetrics
from aggregator.models import ModelStore, ServedPackage
from aggregator.privacy import (
    DPConfig,
    PrivacyError,
    PrivacyLedger,
    check_mode,
    check_private_strategy,
    make_private,
)
from aggregator.record_checks import RecordCheck
from aggregator.registry import Registry
from aggregator.rounds import (
    ROUND_DEVICE_LISTS,
    BufferFull,
    RoundEngine,
    RoundPolicy,
    TrainingPlan,
    Unavailable,
    UnknownRound,
)
from aggregator.secagg_round import SecAggConfig, SecAggMetrics, SecureRounds, StoreStalled, check_secure_strategy
from aggregator.store import Store
from aggregator.strategies import STRATEGIES, make_strategy
from aggregator.strategies.chunks import DEFAULT_CHUNK_BYTES
from aggregator.threadnames import name_this_thread
from aggregator.uploads import (
    BodyReader,
    BodyTimeout,
    ClientGone,
    DeviceBusy,
    Oversize,
    ReadDeadline,
    Truncated,
    UploadSlots,
)
from aggregator.upstream import TASKS_DIR, UpstreamConfig, UpstreamLink, check_site_strategy
from aggregator.verify import UpdateHeader, delta_of, envelope_in, header_of
from appliance import strict_json, wire
from appliance.durable import sweep_interrupted_writes
from appliance.errors import ProtocolError
from appliance.protocol.downlink import DOWNLINK_ENCODINGS
from appliance.protocol.heartbeat import MAX_HEARTBEAT_BYTES, decode_heartbeat
from appliance.protocol.messages import MAX_ROUND_ID

log = logging.getLogger(__name__)

COSE_CONTENT_TYPE = "application/cose"
PROBLEM_CONTENT_TYPE = "application/problem+json"
MAX_WAIT_SECONDS = 60.0
# Room for the signed envelope (at most 64 KiB) and the CBOR framing of the tensor section.
ENVELOPE_ALLOWANCE = 256 * 1024

# How the HTTP server runs the app (``web.run_app`` in ``fl-aggregator serve``, and the tests' server):
# - a client that goes away mid-body does not cancel its handler, which counts it (``client-gone``) and frees
#   its upload slot itself;
# - bodies are never decompressed by the server: a Content-Encoding is refused with 415 before a byte is read.
SERVER_OPTIONS: dict[str, Any] = {"handler_cancellation": False, "auto_decompress": False}

# HTTP status per refusal reason; anything not listed is a 400.
STATUS_FOR_REASON = {
    "unknown-key": 403,
    "revoked": 403,
    "bad-signature": 403,
    "kid-mismatch": 403,
    "duplicate": 409,
    "wrong-round": 409,
    "wrong-model": 409,
    "round-closed": 410,
    "too-stale": 410,
    "body-timeout": 408,
    "device-busy": 429,
    "too-large": 413,
    "body-too-large": 413,
    "tensor-too-large": 413,
    "unsupported-media-type": 415,
    "wrong-tensors": 422,
    "wrong-shape": 422,
    "not-finite": 422,
    "norm-too-large": 422,
    "too-many-samples": 422,
    "expired": 422,
    "wrong-encoding": 422,
    # secure aggregation (docs/protocol.md section 12.7)
    "wrong-phase": 409,
    "not-secure": 409,
    "not-in-roster": 403,
    "wrong-length": 422,
    "bad-shares": 422,
    # heartbeats (docs/protocol.md section 13)
    "length-required": 411,
    "stale-report": 409,
    "too-frequent": 429,
}


@dataclass(frozen=True)
class AggregatorConfig:
    """Everything :func:`make_app` needs. ``key`` is the aggregator's Ed25519 signing key."""

    state_dir: Path
    package: ServedPackage
    key: SigningKey
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    plan: TrainingPlan = field(default_factory=TrainingPlan)
    max_body_bytes: int | None = None  # default: a float32 update of the model plus the envelope allowance
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    workers: int | None = None  # verification threads; default: number of CPUs
    # Uploads whose bodies are read and checked at once, at most one per device; the others wait with only their
    # signed envelope read (TCP holds the rest back), so memory does not grow with the clients sending at once.
    max_active_uploads: int = 16
    # A body must arrive within floor + size / min_rate seconds, or its upload is dropped (408 body-timeout).
    upload_deadline: ReadDeadline = field(default_factory=ReadDeadline)
    # Site mode (aggregator/upstream.py): follow this parent aggregator's rounds and forward partial sums to it.
    upstream: UpstreamConfig | None = None
    # Central differential privacy of the published models (aggregator/privacy.py); None: off.
    privacy: DPConfig | None = None
    # Secure aggregation (aggregator/secagg_round.py): every round is secure; None: off.
    secure_aggregation: SecAggConfig | None = None
    # How versions are published for devices that hold an earlier one (appliance/protocol/downlink.py): "full"
    # (exact parameters, full models only), or rounded to a float16, int8 or sparse step that is served as a delta.
    downlink: str = "full"

    def __post_init__(self) -> None:
        if self.max_active_uploads < 1:  # a slot that never frees: every upload would wait for ever
            raise ValueError(f"max_active_uploads must be at least 1, got {self.max_active_uploads}")
        if self.downlink not in DOWNLINK_ENCODINGS:
            raise ValueError(f"unknown downlink {self.downlink!r}; expected one of {', '.join(DOWNLINK_ENCODINGS)}")
        if self.upstream is not None:
            check_site_strategy(self.strategy, self.strategy_options)
            if self.downlink != "full":
                raise ValueError("--downlink is for the root aggregator: a site republishes its parent's versions "
                                 "bit for bit, so its devices get full models")
        if self.privacy is not None:
            check_private_strategy(self.strategy, self.plan.clip_norm, self.upstream is not None)
            check_mode(self.privacy, self.secure_aggregation is not None)
        if self.secure_aggregation is not None:
            central_dp = self.privacy is not None and self.privacy.mode == "central"
            check_secure_strategy(STRATEGIES[self.strategy], self.plan.clip_norm, central_dp)


@dataclass
class Services:
    """What the handlers use, built in the app's cleanup context."""

    config: AggregatorConfig
    metrics: AggregatorMetrics
    store: Store
    registry: Registry
    models: ModelStore
    engine: RoundEngine
    executor: ThreadPoolExecutor
    limits: wire.Limits
    max_body: int
    uploads: UploadSlots
    fleet: Fleet
    # Status, page and fleet views (no key needed; a listing judges every device) run on a thread of their own, so
    # that no amount of status traffic can take the threads that verify uploads.
    views: ThreadPoolExecutor


SERVICES = web.AppKey("services", Services)
# The body reader of an upload, for :func:`_close_after_socket_read`.
UPLOAD_BODY = web.RequestKey("upload_body", BodyReader)
CONFIG = web.AppKey("config", AggregatorConfig)
METRICS = web.AppKey("metrics", AggregatorMetrics)
# What a stop left behind: the writes that had not returned (a disk that stopped answering), whose threads may never
# end (``fl-aggregator serve`` then exits without waiting for them).
WRITES_LEFT_BEHIND = web.AppKey("writes_left_behind", list)


class Problem(Exception):
    """A refusal: HTTP ``status``, a stable machine-readable ``reason`` and a human ``detail``."""

    def __init__(
        self, status: int, reason: str, detail: str = "", headers: dict[str, str] | None = None, close: bool = False,
        extensions: dict[str, Any] | None = None,
    ):
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}
        self.close = close  # the rest of the body will not be read: close the connection after answering
        self.extensions = extensions or {}  # members of the problem+json beside the standard ones (RFC 9457)


def problem_response(status: int, reason: str, detail: str, headers: dict[str, str] | None = None,
                     extensions: dict[str, Any] | None = None) -> web.Response:
    body = {"type": f"urn:fl-edge:problem:{reason}", "title": reason, "status": status, "reason": reason,
            "detail": detail, **(extensions or {})}
    return web.Response(status=status, text=strict_json.dumps(body), content_type=PROBLEM_CONTENT_TYPE,
                        headers=headers)


_HTTP_REASONS = {404: "not-found", 405: "method-not-allowed", 413: "body-too-large", 400: "bad-request"}


@web.middleware
async def problems(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Every refusal becomes problem+json and is counted; nothing ever answers with a traceback."""
    metrics = request.app[METRICS]
    is_upload = request.method == "POST" and (request.path == "/v1/updates" or request.path.startswith("/v1/secagg/"))
    close = False
    extensions: dict[str, Any] = {}
    try:
        return await handler(request)
    except Problem as exc:
        status, reason, detail, headers, close = exc.status, exc.reason, exc.detail, exc.headers, exc.close
        extensions = exc.extensions
    except ProtocolError as exc:
        status, reason, detail, headers = STATUS_FOR_REASON.get(exc.reason, 400), exc.reason, exc.detail, {}
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, headers = exc.status, {}
        reason = _HTTP_REASONS.get(exc.status, f"http-{exc.status}")
        detail = exc.text or exc.reason
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return problem_response(500, "internal", "the aggregator failed on this request; see its log")
    if status < 500:
        counter = metrics.updates_rejected if is_upload else metrics.requests_rejected
        counter.labels(reason).inc()
    elif status == 503 and is_upload:
        metrics.updates_unavailable.labels(reason).inc()
    response = problem_response(status, reason, detail, headers, extensions)
    if close:
        response.force_close()
    return response


# ------------------------------------------------------------------------------------------------ handlers


async def get_task(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    wait = _number(request, "wait", 0.0)
    after = _integer(request, "after", 0, low=0)
    task = await s.engine.wait_for_task(after, min(max(wait, 0.0), MAX_WAIT_SECONDS))
    if task is None:
        return web.Response(status=204)
    return web.Response(body=task, content_type=COSE_CONTENT_TYPE)


def _spool_unavailable(detail: str, close: bool = False) -> Problem:
    """503 ``spool-unavailable``: what a device was sent could not be stored now (a disk error, or a disk that stopped
    answering); nothing was acknowledged, and the device sends it again after Retry-After."""
    return Problem(503, "spool-unavailable", detail, {"Retry-After": "30"}, close=close)


def _number(request: web.Request, name: str, default: float) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise Problem(400, "bad-parameter", f"query parameter {name!r} must be a number, got {raw!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise Problem(400, "bad-parameter", f"query parameter {name!r} must be finite")
    return value


def _integer(request: web.Request, name: str, default: int, low: int, high: int | None = None) -> int:
    """Query parameter ``name`` as an integer of at least ``low`` (and at most ``high``), else 400 naming both.

    Decimal digits are read as an integer, exactly: read as a float, a value past 2^53 was rounded to a neighbour (a
    device's ``after=9007199254740993`` asked for the round after 9007199254740992, and was given its own again). A
    number written otherwise (``2.0``, ``1e3``) is taken when it is integral."""
    raw = request.query.get(name)
    try:
        value: int | float = default if raw is None else int(raw)
    except ValueError:  # not digits, or past Python's 4,300 digits: read as a number, which must be integral
        value = _number(request, name, default)
    if value < low or (high is not None and value > high) or value != int(value):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        shown = f"{value:.15g}" if isinstance(value, float) else f"{value}"
        shown = shown if len(shown) <= 40 else f"{shown[:20]}... ({len(shown)} digits)"
        raise Problem(400, "bad-parameter", f"query parameter '{name}' must be an integer {bound}, got {shown}")
    return int(value)


_BASE_FORM = ("?base=B&base_digest=D: B the version the device holds, in decimal digits (at most 18), D its digest, "
              "64 hexadecimal characters")


def _base_query(request: web.Request) -> tuple[int, bytes] | None:
    """The (version, digest) a device names with ``?base=V&base_digest=HEX``: the model it holds.

    ``latest`` is no base: a device names the version it holds, and ``latest`` already names the version asked for
    (in the path). Each value's form is checked before the pair, so a bad value is named even when alone."""
    base, digest = request.query.get("base"), request.query.get("base_digest")
    if base is None and digest is None:
        return None
    if base is not None and not (base.isascii() and base.isdigit() and len(base) <= 18):
        raise Problem(400, "bad-parameter", f"query parameter 'base' must be a version number, got {base[:40]!r} "
                                            f"({_BASE_FORM}; 'latest' goes in the path, /v1/models/latest)")
    if digest is not None and not (len(digest) == 64 and all(c in "0123456789abcdef" for c in digest.lower())):
        raise Problem(400, "bad-parameter", f"query parameter 'base_digest' must be 64 hexadecimal characters "
                                            f"(the SHA-256 of the base model's tensor section; {_BASE_FORM})")
    if base is None or digest is None:
        raise Problem(400, "bad-parameter", f"query parameters 'base' and 'base_digest' go together ({_BASE_FORM})")
    return int(base), bytes.fromhex(digest)


def _count_model_download(request: web.Request, answer: str, body: bytes | None = None) -> None:
    """Count a GET of a model by its answer (aggregator/metrics.py MODEL_DOWNLOAD_ANSWERS) and the bytes of the
    body sent (None: a 404, no model). A HEAD sends no body and is no download."""
    if request.method == "GET":
        request.app[SERVICES].metrics.model_download(answer, body)


async def get_model(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    which = request.match_info["version"]
    base = _base_query(request)
    if which == "latest":
        version = s.engine.version
    else:
        try:
            version = int(which)
        except ValueError:
            detail = f"model version must be an integer or 'latest', got {which!r}"
            raise Problem(400, "bad-parameter", detail) from None
    if version < 0 or version > s.engine.version:
        _count_model_download(request, "not_found")
        raise Problem(404, "unknown-version", f"model version {version} is not published (newest: {s.engine.version})")
    loop = asyncio.get_running_loop()
    answer = "full"
    if base is not None:
        if base[0] >= version:
            raise Problem(400, "bad-parameter", f"base version {base[0]} is not older than version {version}")
        delta, no_delta = await loop.run_in_executor(s.executor, s.models.delta, base[0], base[1], version)
        if delta is not None:
            _count_model_download(request, "delta", delta)
            headers = {"X-Model-Version": str(version), "X-Model-Base": str(base[0])}
            return web.Response(body=delta, content_type=wire.CONTENT_TYPE, headers=headers)
        answer = f"full_{no_delta}"
    data = await loop.run_in_executor(s.executor, s.models.release_bytes, version)
    if data is None:
        _count_model_download(request, "not_found")
        raise Problem(404, "unknown-version", f"model version {version} is no longer stored")
    _count_model_download(request, answer, data)
    return web.Response(body=data, content_type=wire.CONTENT_TYPE, headers={"X-Model-Version": str(version)})


async def get_package(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    return web.Response(body=s.config.package.raw, content_type="application/octet-stream")


async def get_package_by_digest(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    wanted = request.match_info["digest"].lower()
    if wanted != s.models.package_digest.hex():
        raise Problem(404, "unknown-package", f"no package with digest {wanted}")
    return web.Response(body=s.config.package.raw, content_type="application/octet-stream")


async def post_update(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    if request.content_type != wire.CONTENT_TYPE:
        raise Problem(415, "unsupported-media-type", f"uploads are {wire.CONTENT_TYPE}, got {request.content_type!r}")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        # Updates are already compact (int8/float16 encodings) and a compressed body could expand past every
        # limit before it is checked, so the API takes them as sent.
        detail = f"uploads are not compressed; Content-Encoding {encoding!r} is not accepted"
        raise Problem(415, "unsupported-content-encoding", detail, close=True)
    if request.content_length is not None and request.content_length > s.max_body:
        raise Problem(413, "body-too-large", f"{request.content_length} bytes exceeds the limit of {s.max_body}")
    reader = BodyReader(
        request.content, request.content_length, s.max_body, s.config.upload_deadline, s.uploads.buffers,
        request.transport,
    )
    request[UPLOAD_BODY] = reader
    try:
        head = await reader.read_prefix(wire.ENVELOPE_PREFIX_BYTES)
        try:
            verified = wire.verify(head, s.registry.signer_key, s.limits)  # who sent it, before any slot
            signer = verified.kid
        except ProtocolError as exc:
            raise Problem(STATUS_FOR_REASON.get(exc.reason, 400), exc.reason, exc.detail, close=True) from None
        # An identical resend is known by its envelope alone (its signed digest pins the rest): it gets the original
        # receipt without a slot, and aiohttp drains the rest of the body unread.
        try:
            receipt = await s.engine.known_receipt(verified.digest)
        except Unavailable as exc:
            raise _spool_unavailable(str(exc), close=True) from None
        if receipt is not None:
            _refuse_if_stored_late(s, signer, verified.digest)
            s.metrics.updates_duplicate_resend.inc()
            return web.Response(body=receipt, content_type=COSE_CONTENT_TYPE)
        stall = s.engine.disk_stall()
        if stall is not None and verified.payload.get("type") != "secagg-masked":
            # Refused before its body is read: queued behind the hung write, it would only hold its memory and slot
            # until answered the same. (A secure round's phases bound their own waits on the disk.)
            raise _spool_unavailable(stall, close=True)
        try:
            async with s.uploads.slot(signer):
                body = await reader.read_rest()
                if verified.payload.get("type") == "secagg-masked":  # a masked input, durable like an update
                    return await _receive_masked(body, s, signer, verified.payload, verified.digest)
                answer = await _receive_update(body, s, envelope_in(body, head, verified))
            reader.recycle()  # answered: its worker thread is done with the body
            return answer
        except DeviceBusy as exc:
            raise Problem(429, "device-busy", str(exc), {"Retry-After": "5"}, close=True) from None
    except BodyTimeout as exc:
        raise Problem(408, "body-timeout", str(exc), close=True) from None
    except Oversize as exc:
        raise Problem(413, "body-too-large", str(exc), close=True) from None
    except Truncated as exc:
        raise Problem(400, "truncated", str(exc), close=True) from None
    except ClientGone as exc:
        # Nobody is left to answer: one counted event (client-gone), logged at debug level only, no traceback.
        log.debug("upload from %s dropped mid-body: %s", request.remote, exc)
        raise Problem(400, "client-gone", f"the client closed the connection mid-body ({exc})", close=True) from None
    finally:
        s.metrics.received_bytes.inc(reader.received)


async def _receive_update(body: memoryview, s: Services, envelope: wire.Verified) -> web.Response:
    engine = s.engine
    checked = await asyncio.get_running_loop().run_in_executor(s.executor, _check_upload, s, body, envelope)
    try:
        if checked.receipt is None:
            checked.receipt = await engine.known_receipt(checked.digest)  # an identical copy may be in flight
        if checked.receipt is not None:
            s.metrics.updates_duplicate_resend.inc()
            return web.Response(body=checked.receipt, content_type=COSE_CONTENT_TYPE)
        if checked.error is not None:
            raise checked.error
        s.metrics.verify_seconds.observe(checked.seconds)
        s.metrics.update_norm_ratio.observe(checked.norm_ratio)
        if checked.header is None or checked.update is None or checked.delta is None:
            raise RuntimeError("upload check returned neither an error nor an update")
        receipt = await engine.commit(checked.header, checked.digest, checked.delta, checked.update.metrics,
                                      checked.check)
        s.uploads.buffers.give(checked.delta)  # spooled and accumulated: the buffer can hold the next delta
    except ProtocolError as refusal:
        # A copy of these exact bytes may have been acknowledged while this one was being checked.
        try:
            receipt = await engine.known_receipt(checked.digest)
        except Unavailable:  # that copy is still being written: the refusal stands
            receipt = None
        if receipt is None:
            raise refusal from None
        s.metrics.updates_duplicate_resend.inc()
    except Unavailable as exc:
        raise _spool_unavailable(str(exc)) from None
    except BufferFull as exc:
        raise Problem(503, "buffer-full", str(exc), {"Retry-After": "30"}) from None
    return web.Response(body=receipt, content_type=COSE_CONTENT_TYPE)


@dataclass
class _Checked:
    digest: bytes
    receipt: bytes | None = None
    error: ProtocolError | BufferFull | None = None
    header: UpdateHeader | None = None
    update: wire.Update | None = None
    delta: np.ndarray | None = None
    check: RecordCheck | None = None  # what the delta's spool record must match at a resume
    norm_ratio: float = 0.0  # the delta's L2 norm over the round's bound
    seconds: float = 0.0


def _check_upload(s: Services, body: memoryview, envelope: wire.Verified) -> _Checked:
    """Worker thread: everything about one upload that touches all its bytes, in one hand-off.

    The idempotency lookup comes first (a resend of an acknowledged update gets its original receipt), then
    whether the signer may still upload (its signature was checked on the envelope), the round admission
    (re-checked on the event loop at commit), decoding and the norm bound.
    """
    started = time.perf_counter()
    checked = _Checked(digest=envelope.digest)
    try:
        checked.receipt = s.engine.stored_receipt(checked.digest)
        if checked.receipt is not None:
            return checked
        if s.registry.key_for(envelope.kid) is None:  # revoked raises
            raise ProtocolError("unknown-key", f"no enrolled key for kid {envelope.kid!r}")
        checked.header = header_of(envelope, s.config.plan.encoding)
        round_ = s.engine.admit(checked.header, checked.digest)
        checked.update, checked.delta, norm = delta_of(envelope, s.models.layout, s.limits, s.uploads.buffers)
        bound = round_.norm_bound
        if not norm <= bound:
            raise ProtocolError(
                "norm-too-large",
                f"update L2 norm {norm:.6g} exceeds the round's bound {bound:.6g} ({round_.norm_bound_source})",
            )
        checked.norm_ratio = norm / bound
        checked.check = s.engine.tensor_section.check(envelope, checked.update.encoding)  # signed digest, or None
    except (ProtocolError, BufferFull) as exc:
        checked.error = exc
    checked.seconds = time.perf_counter() - started
    return checked


def _refuse_if_stored_late(s: Services, signer: str, digest: bytes) -> None:
    """A secure round's masked input stored after the masked phase ended (a stalled disk) has a receipt in its record
    that was never given: a resend is told the round closed without it, not acknowledged now."""
    if s.engine.secure is not None and s.engine.secure.stored_late(signer, digest):
        raise ProtocolError("round-closed", "this masked input was stored after the masked phase ended, so the sum "
                            "leaves it out: it was never acknowledged")


async def _receive_masked(
    body: memoryview, s: Services, signer: str, payload: dict[str, Any], digest: bytes
) -> web.Response:
    receipt = s.store.receipt_for(digest) or await s.engine.known_receipt(digest)
    if receipt is not None:
        _refuse_if_stored_late(s, signer, digest)
    if receipt is None:
        try:
            receipt = await _secure(s).masked(body, digest, signer, payload)
        except (OSError, sqlite3.Error, StoreStalled) as exc:
            raise _spool_unavailable(f"the masked input could not be stored: {exc}") from None
    else:
        s.metrics.updates_duplicate_resend.inc()
    return web.Response(body=receipt, content_type=COSE_CONTENT_TYPE)


# -------------------------------------------------------------------------------------- secure aggregation

SECAGG_MAX_BODY = 16 * 1024 * 1024  # a share bundle or an unmask answer of 4,096 devices is under 1 MiB


def _secure(s: Services) -> SecureRounds:
    if s.engine.secure is None:
        raise ProtocolError("not-secure", "this aggregator runs no secure aggregation (serve --secure-aggregation)")
    return s.engine.secure


def post_secagg(phase: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of ``POST /v1/secagg/{phase}``: one signed device message, small, answered with JSON."""

    async def handler(request: web.Request) -> web.Response:
        s = request.app[SERVICES]
        if request.content_type != wire.CONTENT_TYPE:
            raise ProtocolError("unsupported-media-type", f"messages are {wire.CONTENT_TYPE}")
        if request.content_length is not None and request.content_length > SECAGG_MAX_BODY:
            raise ProtocolError("body-too-large", f"{request.content_length} bytes exceeds {SECAGG_MAX_BODY}")
        secure = _secure(s)
        receive = {"advertise": secure.advertise, "shares": secure.shares, "unmask": secure.unmask}[phase]
        size = SECAGG_MAX_BODY if request.content_length is None else request.content_length
        seconds = s.config.upload_deadline.seconds(size)  # as an upload's body: 408 past it
        try:
            body = await asyncio.wait_for(request.read(), seconds)
        except TimeoutError:
            raise Problem(408, "body-timeout", f"the message's body did not arrive within {seconds:.0f} s",
                          close=True) from None
        try:
            return web.json_response(await receive(body))
        except (OSError, sqlite3.Error, StoreStalled) as exc:
            raise _spool_unavailable(f"the {phase} message could not be stored: {exc}") from None

    return handler


def _round_id(request: web.Request) -> int:
    """The ``{round}`` of a path (secure aggregation, a round's devices): decimal ASCII digits of a round id (at most
    2^63 - 1)."""
    raw = request.match_info["round"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and int(raw) <= MAX_ROUND_ID):
        raise Problem(400, "bad-parameter", f"the round must be an integer in [0, {MAX_ROUND_ID}], got {raw[:40]!r}")
    return int(raw)


def _published(body: bytes | None) -> web.Response:
    return web.Response(status=204) if body is None else web.Response(body=body, content_type=wire.CONTENT_TYPE)


async def get_secagg_roster(request: web.Request) -> web.Response:
    wait = min(max(_number(request, "wait", 0.0), 0.0), MAX_WAIT_SECONDS)
    return _published(await _secure(request.app[SERVICES]).roster(_round_id(request), wait))


async def get_secagg_shares(request: web.Request) -> web.Response:
    wait = min(max(_number(request, "wait", 0.0), 0.0), MAX_WAIT_SECONDS)
    secure = _secure(request.app[SERVICES])
    return _published(await secure.routed(_round_id(request), request.match_info["device"], wait))


async def get_secagg_unmask(request: web.Request) -> web.Response:
    wait = min(max(_number(request, "wait", 0.0), 0.0), MAX_WAIT_SECONDS)
    return _published(await _secure(request.app[SERVICES]).unmask_request(_round_id(request), wait))


async def post_heartbeat(request: web.Request) -> web.Response:
    """A device's fleet report (docs/protocol.md section 13): small, signed, checked, kept as its latest."""
    s = request.app[SERVICES]
    if request.content_type != COSE_CONTENT_TYPE:
        detail = f"heartbeats are {COSE_CONTENT_TYPE}, got {request.content_type!r}"
        raise Problem(415, "unsupported-media-type", detail)
    if request.content_length is None:
        raise Problem(411, "length-required", f"a heartbeat needs a Content-Length (at most {MAX_HEARTBEAT_BYTES})",
                      close=True)
    if request.content_length > MAX_HEARTBEAT_BYTES:
        raise Problem(413, "body-too-large", f"{request.content_length} bytes exceeds the heartbeat limit of "
                                             f"{MAX_HEARTBEAT_BYTES}", close=True)
    seconds = s.config.upload_deadline.seconds(request.content_length)  # as an upload's body: 408 past it
    try:
        body = await asyncio.wait_for(request.read(), seconds)
    except TimeoutError:
        raise Problem(408, "body-timeout", f"the heartbeat's {request.content_length} bytes did not arrive within "
                                           f"{seconds:.0f} s", close=True) from None
    report = decode_heartbeat(body, s.registry.key_for)
    try:
        s.fleet.accept(report, time.time())
    except ReportRefused as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        extensions = {"held_sent_at": exc.held_sent_at} if exc.held_sent_at is not None else None
        raise Problem(exc.status, exc.reason, exc.detail, headers, extensions=extensions) from None
    s.metrics.fleet_reports.inc()
    return web.Response(status=204)


def _fleet_query(request: web.Request) -> dict[str, Any]:
    """``page``, ``per_page``, ``sort`` and ``state`` of a device listing, checked."""
    page, per_page = _integer(request, "page", 1, low=1), _integer(request, "per_page", 50, low=1, high=MAX_PER_PAGE)
    sort, state = request.query.get("sort", "last_seen"), request.query.get("state", "all")
    if sort.lstrip("-") not in SORT_KEYS or sort.startswith("--"):
        raise Problem(400, "bad-parameter", f"query parameter 'sort' must be one of {', '.join(SORT_KEYS)} "
                                            f"(with a leading '-' for descending), got {sort[:40]!r}")
    if state not in FILTERS:
        raise Problem(400, "bad-parameter", f"query parameter 'state' must be one of {', '.join(FILTERS)}, "
                                            f"got {state[:40]!r}")
    return {"page": page, "per_page": per_page, "sort": sort, "state": state}


async def _fleet_listing(s: Services, query: dict[str, Any]) -> dict[str, Any]:
    listing = functools.partial(s.fleet.listing, s.engine.version, time.time(), **query)
    return await asyncio.get_running_loop().run_in_executor(s.views, listing)


async def get_fleet(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    return web.json_response(await _fleet_listing(s, _fleet_query(request)), dumps=strict_json.dumps_as_found)


#: Most rounds ``GET /v1/status?rounds=N`` lists. Each lists at most STATUS_ROUND_DEVICES of its devices (and of its
#: lost ones), with their totals; ``GET /v1/status/rounds/{round}/devices`` pages through a round's whole list.
MAX_STATUS_ROUNDS = 100


async def get_status(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    history = _integer(request, "rounds", 20, low=1, high=MAX_STATUS_ROUNDS)
    loop = asyncio.get_running_loop()
    status = await loop.run_in_executor(s.views, s.engine.status, history)
    status["fleet"] = await loop.run_in_executor(s.views, s.fleet.counts, s.engine.version, time.time())
    status["downlink"] = s.metrics.downlink(s.config.downlink)
    return web.json_response(status, dumps=strict_json.dumps_as_found)


def get_round_devices(which: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of ``GET /v1/status/rounds/{round}/{which}``: one page of the round's ``devices``,
    ``lost_devices`` or ``left_out_devices`` (ids only; ``page`` and ``per_page`` as in the fleet listing), read on
    the views thread."""

    async def handler(request: web.Request) -> web.Response:
        s = request.app[SERVICES]
        round_id = _round_id(request)
        page = _integer(request, "page", 1, low=1)
        per_page = _integer(request, "per_page", 50, low=1, high=MAX_PER_PAGE)
        listing = functools.partial(s.engine.round_device_page, round_id, which, page, per_page)
        try:
            return web.json_response(await asyncio.get_running_loop().run_in_executor(s.views, listing),
                                     dumps=strict_json.dumps)
        except UnknownRound as exc:
            raise Problem(404, "unknown-round", str(exc)) from None

    return handler


async def get_page(request: web.Request) -> web.Response:
    s = request.app[SERVICES]
    query = _fleet_query(request)
    status = await asyncio.get_running_loop().run_in_executor(s.views, s.engine.status, 20)
    status["downlink"] = s.metrics.downlink(s.config.downlink)
    fleet = await _fleet_listing(s, query)
    return web.Response(text=statuspage.render(status, fleet), content_type="text/html")


def _health(s: Services) -> dict[str, Any]:
    """What /healthz and /readyz answer: ``disk-stalled`` while the oldest write under way on the state directory has
    waited past --store-timeout (uploads are refused), else ``saturated`` while every upload slot is taken (new
    uploads queue), else ``ok``; with the load and the disk's oldest write."""
    r = s.engine.current
    uploads = s.uploads
    disk = s.engine.disk_status()
    return {
        "status": "disk-stalled" if disk["stalled"] else "saturated" if uploads.saturated else "ok",
        "model_version": s.engine.version,
        "round": r.round_id if r else None,
        "uploads": {"active": uploads.active, "limit": uploads.limit, "waiting": uploads.waiting},
        "disk": disk,
    }


async def get_health(request: web.Request) -> web.Response:
    """Liveness: HTTP 200 whenever the event loop answers, a stalled disk included. A restart cannot make a disk answer
    (the process stuck in its write may not even die, and the next one would hang on it at start-up), and it loses
    nothing acknowledged either way; a liveness probe that killed the pod for it would only restart it in a loop."""
    return web.json_response(_health(request.app[SERVICES]), dumps=strict_json.dumps)


async def get_ready(request: web.Request) -> web.Response:
    """Readiness: the body of /healthz, HTTP 503 while the disk is stalled (every upload would be refused 503
    ``spool-unavailable``), so that a load balancer or a Kubernetes Service sends no uploads here until it answers."""
    health = _health(request.app[SERVICES])
    return web.json_response(health, status=503 if health["disk"]["stalled"] else 200, dumps=strict_json.dumps)


async def get_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    s = request.app.get(SERVICES)
    if s is not None:
        counts = await asyncio.get_running_loop().run_in_executor(s.views, s.fleet.counts, s.engine.version,
                                                                  time.time())
        metrics.set_fleet(counts)
    data = generate_latest(metrics.registry)
    response = web.Response(body=data)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def _close_after_socket_read(request: web.Request, response: web.StreamResponse) -> None:
    """An upload whose body was read straight off the socket (aggregator/uploads.py) is answered with
    ``Connection: close``: aiohttp's parser did not see that body end, so it cannot read a next request."""
    reader = request.get(UPLOAD_BODY)
    if reader is not None and reader.took_socket:
        response.force_close()
        response.headers[hdrs.CONNECTION] = "close"  # this hook runs after aiohttp has set the response's headers


# ---------------------------------------------------------------------------------------------- factory


def default_max_body(parameters: int) -> int:
    return 4 * parameters + ENVELOPE_ALLOWANCE


def _fleet_roster(store: Store) -> list[Enrolled]:
    """The fleet view's enrolled, unrevoked keys, the site aggregators' marked (``enroll --site``)."""
    sites = store.site_ids()
    return [Enrolled(d.device_id, d.name, d.device_id in sites) for d in store.devices() if d.revoked_at is None]


def _site_forwards(store: Store, receipts: ReceiptRounds) -> dict[str, Forward]:
    """Each site's newest accepted forward: its receipt (this aggregator's, checked once per receipt by
    ``receipts``) names the round the site answered, and that round's model version is the forward's base (in async
    mode the buffer it counts in may be a later one). A receipt that no longer verifies (this aggregator's key was
    changed since) falls back to the round the forward was taken into: the fleet views, /v1/status and /metrics must
    not fail over it."""
    forwards = {}
    for site, (accepted_at, taken_into, receipt) in store.site_last_updates().items():
        answered = receipts.answered(site, receipt)
        if answered is None:
            answered = taken_into
        row = store.get_round(answered)
        forwards[site] = Forward(accepted_at, answered, None if row is None else row.model_version)
    return forwards


def _sweep_interrupted_writes(state_dir: Path) -> None:
    """Remove what writes a kill or a power cut interrupted left in the state (a model version's temp file: a model's
    size, one per crash). An ``fl-aggregator`` command writing into the state meanwhile keeps its own
    (durable.sweep_interrupted_writes)."""
    state = Path(state_dir)
    swept = sweep_interrupted_writes(state, state / "models", state / TASKS_DIR)
    if swept:
        log.warning("%s: %s", state, swept.describe())


async def _services(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    _sweep_interrupted_writes(config.state_dir)
    store = Store(config.state_dir)
    workers = config.workers or max(2, os.cpu_count() or 2)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify", initializer=name_this_thread)
    secure: SecureRounds | None = None
    fleet: Fleet | None = None
    try:
        fleet = Fleet(store.db_path, lambda: _fleet_roster(store),
                      functools.partial(_site_forwards, store, ReceiptRounds(config.key.verify_key)),
                      config.policy.round_timeout)
        models = ModelStore(Path(config.state_dir) / "models", config.package, config.key, config.downlink)
        registry = Registry(store)
        max_body = config.max_body_bytes or default_max_body(models.layout.size)
        limits = wire.Limits(max_bytes=max_body, max_tensor_elements=models.layout.size)
        strategy = make_strategy(config.strategy, **config.strategy_options)
        ledger = None
        if config.privacy is not None:
            try:
                config.privacy.check_population(registry.active_count())
                ledger = PrivacyLedger(Path(config.state_dir), config.privacy)
            except PrivacyError as exc:
                raise RuntimeError(str(exc)) from None
            if config.privacy.mode == "central":  # distributed: the devices add the noise (secagg_round.py)
                make_private(strategy, config.plan.clip_norm, config.privacy)
        engine = RoundEngine(
            store, registry, models, strategy, config.policy, config.plan, config.key, metrics, executor,
            config.chunk_bytes, ledger,
        )
        if config.secure_aggregation is not None:
            secure = SecureRounds(config.secure_aggregation, engine, store, registry, config.key,
                                  SecAggMetrics(metrics.registry), limits)
            engine.secure = secure
        link = None
        if config.upstream is not None:
            link = UpstreamLink(config.upstream, engine, store, models, config.key, Path(config.state_dir))
        await engine.start()
        if link is not None:
            await link.start()
    except BaseException:
        if secure is not None:
            await secure.close(time.monotonic() + config.policy.store_timeout)
        if fleet is not None:
            fleet.close()
        store.close()
        executor.shutdown(wait=False)
        raise
    uploads = UploadSlots(config.max_active_uploads)
    metrics.uploads_active.set_function(lambda: uploads.active)
    metrics.uploads_waiting.set_function(lambda: uploads.waiting)
    views = ThreadPoolExecutor(max_workers=1, thread_name_prefix="views", initializer=name_this_thread)
    app[SERVICES] = Services(config, metrics, store, registry, models, engine, executor, limits, max_body, uploads,
                             fleet, views)
    metrics.disk_wait.set_function(store.writes.waited_seconds)
    flusher = asyncio.create_task(_flush_fleet(fleet, executor, store), name="fleet-flush")
    try:
        yield
    finally:
        await _stop(app, flusher, link)


async def _stop(app: web.Application, flusher: asyncio.Task[None], link: UpstreamLink | None) -> None:
    """Stop (SIGTERM): write the fleet's last reports, stop the rounds and close the state, waiting for the writes
    under way at most --store-timeout in all. A write that has not returned by then (a disk that stopped answering)
    is left behind, named in the log and in ``app[WRITES_LEFT_BEHIND]`` (``serve`` then exits without waiting for its
    thread): nothing it holds was acknowledged, and the next start resumes from what is committed."""
    s = app[SERVICES]
    stop_by = time.monotonic() + s.config.policy.store_timeout
    flusher.cancel()
    await asyncio.gather(flusher, return_exceptions=True)
    loop = asyncio.get_running_loop()
    if await within(stop_by, loop.run_in_executor(s.executor, _write_reports, s.fleet, s.store, s.fleet.take_dirty())):
        s.fleet.close()  # (else its connection is still writing)
    if link is not None:
        await link.stop()
    await s.engine.stop(stop_by)
    if s.engine.secure is not None:
        await s.engine.secure.stop()
        await s.engine.secure.close(stop_by)
    s.views.shutdown(wait=True)
    await asyncio.to_thread(s.store.close, max(0.0, stop_by - time.monotonic()))
    left = s.store.writes.under_way()
    s.executor.shutdown(wait=not left)
    if left:
        log.error("stopping with %d write%s to %s that did not return within --store-timeout (%g s; the disk stopped "
                  "answering): %s. None of them was acknowledged; the next start resumes from what is committed",
                  len(left), "s" if len(left) != 1 else "", s.config.state_dir, s.config.policy.store_timeout,
                  "; ".join(f"{what} (waiting for {seconds:.0f} s)" for seconds, what in left))
        app[WRITES_LEFT_BEHIND].extend(what for _, what in left)


def _write_reports(fleet: Fleet, store: Store, rows: list[tuple[str, Any]]) -> None:
    """Worker thread: write the fleet's reports ``rows``, as a write under way on the disk (``store.writes``)."""
    with store.writes.writing("the fleet's device reports"):
        fleet.write(rows)


async def _flush_fleet(fleet: Fleet, executor: ThreadPoolExecutor, store: Store) -> None:
    """Write the fleet's new reports every FLUSH_SECONDS, in one transaction each time (aggregator/fleet.py), one
    flush at a time (a disk that stops answering holds one verification thread, and shows in ``store.writes``)."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        rows = fleet.take_dirty()
        if rows:
            try:
                await asyncio.get_running_loop().run_in_executor(executor, _write_reports, fleet, store, rows)
            except Exception:
                log.exception("could not write %d device reports; they stay in memory until the next", len(rows))
                fleet.mark_dirty(row[0] for row in rows)


def make_app(config: AggregatorConfig) -> web.Application:
    """The aggregator as an aiohttp application; state opens on startup and closes on cleanup."""
    parameters = sum(spec.size for spec in config.package.info.param_specs)
    max_body = config.max_body_bytes or default_max_body(parameters)
    app = web.Application(middlewares=[problems], client_max_size=max_body)
    app[CONFIG] = config
    app[METRICS] = AggregatorMetrics()
    app[WRITES_LEFT_BEHIND] = []
    app.cleanup_ctx.append(_services)
    app.on_response_prepare.append(_close_after_socket_read)
    app.router.add_get("/v1/task", get_task)
    app.router.add_get("/v1/models/{version}", get_model)
    app.router.add_get("/v1/package", get_package)
    app.router.add_get("/v1/packages/{digest}", get_package_by_digest)
    app.router.add_post("/v1/updates", post_update)
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/status/devices", get_fleet)
    for which in ROUND_DEVICE_LISTS:
        app.router.add_get(f"/v1/status/rounds/{{round}}/{which}", get_round_devices(which))
    app.router.add_post("/v1/heartbeat", post_heartbeat)
    app.router.add_get("/healthz", get_health)
    app.router.add_get("/readyz", get_ready)
    app.router.add_get("/", get_page)
    app.router.add_get("/metrics", get_metrics)
    for phase in ("advertise", "shares", "unmask"):
        app.router.add_post(f"/v1/secagg/{phase}", post_secagg(phase))
    app.router.add_get("/v1/secagg/{round}/roster", get_secagg_roster)
    app.router.add_get("/v1/secagg/{round}/shares/{device}", get_secagg_shares)
    app.router.add_get("/v1/secagg/{round}/unmask", get_secagg_unmask)
    return app

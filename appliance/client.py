"""The agent's side of the aggregator's HTTP API (docs/api.md).

Everything the aggregator sends is verified against the pinned aggregator key before it is used: a task,
a model release, the model package and every receipt. A response that fails verification is treated like
a network error (retried later), never acted on.
"""

from __future__ import annotations

import json
import logging
import ssl

import aiohttp
import numpy as np
from nacl.signing import VerifyKey

from appliance import wire
from appliance.errors import ProtocolError
from appliance.modelpkg import MAX_PACKAGE_BYTES
from appliance.protocol import downlink
from appliance.protocol.heartbeat import FIELD_RANGES

log = logging.getLogger(__name__)

UPDATE_CONTENT_TYPE = wire.CONTENT_TYPE
# What aiohttp may buffer from the socket before it stops reading (twice this): its default of 64 KiB splits a
# model release (4 MB at 1M parameters) into many small chunks, each a turn of the event loop.
READ_BUFFER_BYTES = 1 << 20
# What the agent reads of an answer to a POST: a receipt or a problem+json is a few hundred bytes. An answer past this
# (a hostile aggregator or a broken proxy may send gigabytes) is a failed request, retried later, not read into memory.
MAX_ANSWER_BYTES = 64 * 1024
# How much of a refusal's reason and detail the agent keeps (they go into its log and a rejected update's note).
MAX_REASON_CHARS = 64
MAX_DETAIL_CHARS = 500


class AggregatorUnavailable(Exception):
    """The aggregator could not be reached or answered with a server error: try again later."""


class NotPublished(AggregatorUnavailable):
    """The aggregator answered that it has no such model version or package (404, or 204 with no body). Retried as
    a failed request is (a publication may be late, or being retried), but named: the aggregator answers, so the
    network is not at fault."""

    def __init__(self, what: str, answer: str = ""):
        super().__init__(f"the aggregator has no {what}" + (f" ({answer})" if answer else ""))
        self.what = what


class ReceiptRefused(AggregatorUnavailable):
    """The aggregator answered an upload with a receipt that does not prove this update was stored: one that
    does not verify against the pinned key, or (``names_another_update``) a verified one for another update.
    The update is not delivered."""

    def __init__(self, detail: str, *, names_another_update: bool = False):
        super().__init__(f"receipt refused: {detail}")
        self.names_another_update = names_another_update


class Rejection(Exception):
    """The aggregator refused an update for good (4xx): resending the same bytes cannot succeed."""

    def __init__(self, status: int, reason: str, detail: str):
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


class StaleReport(Rejection):
    """A heartbeat refused as not newer than the report the fleet view holds (409 ``stale-report``);
    ``held_sent_at`` that report's ``sent_at`` when the answer names it (None otherwise)."""

    def __init__(self, status: int, reason: str, detail: str, held_sent_at: int | None):
        super().__init__(status, reason, detail)
        self.held_sent_at = held_sent_at


def _problem(answer: bytes) -> tuple[dict | None, str]:
    """The JSON object of a problem+json answer, or (None, what is wrong with it). An aggregator or a proxy on the
    path may answer anything: not UTF-8, not JSON, JSON nested past what the reader recurses into, an integer past
    Python's 4,300 digits, a list or a number instead of an object. Each is a malformed answer, never an exception."""
    try:
        problem = json.loads(answer)
    except RecursionError:
        return None, "JSON nested too deeply to read"
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except ValueError as exc:  # JSONDecodeError, or an integer past the int-string conversion limit
        return None, f"not JSON ({str(exc)[:80]})"
    if not isinstance(problem, dict):
        return None, f"JSON {type(problem).__name__}, not an object"
    return problem, ""


def _text(value: object, limit: int) -> str | None:
    """``value`` as one log-safe line of at most ``limit`` characters (control characters shown as '?': a hostile
    answer cannot forge log lines, nor the first line of a rejected update's note); None when it is not text."""
    if not isinstance(value, str):
        return None
    line = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return line + "..." if len(value) > limit else line


def held_sent_at(answer: bytes) -> int | None:
    """The ``held_sent_at`` of a ``stale-report`` problem+json: an integer in a heartbeat's ``sent_at`` range, or
    None when the answer has none (an older aggregator), one of another type or range, or is not a problem+json."""
    problem, _ = _problem(answer)
    value = None if problem is None else problem.get("held_sent_at")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= FIELD_RANGES["sent_at"]:
        return None
    return value


def is_refusal(status: int) -> bool:
    """A 4xx that says the message will never be taken (408 and 429 only say: not now, retry)."""
    return 400 <= status < 500 and status not in (408, 429)


def problem_reason(answer: bytes) -> tuple[str, str]:
    """(reason, detail) of an aggregator's problem+json answer, each one printable line (at most
    :data:`MAX_REASON_CHARS` and :data:`MAX_DETAIL_CHARS`; "unknown" for a reason that is not text); ("unknown",
    what is wrong with it and how it starts) when the answer is not a problem+json object."""
    problem, malformed = _problem(answer)
    if problem is None:
        start = _text(bytes(answer[:MAX_REASON_CHARS]).decode(errors="replace"), MAX_REASON_CHARS)
        return "unknown", f"malformed problem+json answer ({malformed}): {start}"
    detail = _text(problem.get("detail", ""), MAX_DETAIL_CHARS)
    return (_text(problem.get("reason"), MAX_REASON_CHARS) or "unknown",
            "(its detail is not text)" if detail is None else detail)


async def read_body(response: aiohttp.ClientResponse, limit: int) -> memoryview:
    """The whole body of ``response``, read-only, refused (``too-large``) before a byte of it is read when it
    announces more than ``limit`` bytes, and as soon as more than ``limit`` arrive when it announces no length
    (or a compressed one).

    With a Content-Length, each chunk is copied once, as it comes off the socket, into one buffer of that length:
    a download holds the body once, plus at most what aiohttp buffers before it stops reading the socket (twice
    ``READ_BUFFER_BYTES``), where ``response.read()`` holds its chunks in a list and then joins them into fresh
    memory (twice the body at its peak: 8.0 MB for a model of 1M parameters, 4.8 MB here; bench/model_download.py). The
    decoders return numpy views of this buffer, read-only as views of a ``bytes`` would be. Fewer bytes than
    announced raise aiohttp's ClientPayloadError (a network error).
    """
    # A compressed body's Content-Length counts the compressed bytes; aiohttp hands on the decompressed ones.
    size = None if response.headers.get("Content-Encoding", "identity") != "identity" else response.content_length
    if size is not None and size > limit:
        raise ProtocolError("too-large", f"the answer announces {size} bytes; the limit is {limit}")
    if size is None:
        chunks, received = [], 0
        async for chunk in response.content.iter_any():
            received += len(chunk)
            if received > limit:
                raise ProtocolError("too-large", f"the answer runs past the limit of {limit} bytes")
            chunks.append(chunk)
        return memoryview(b"".join(chunks))
    body = np.empty(size, dtype=np.uint8)  # not zeroed: every byte is written below, or the answer is refused
    filled = 0
    while chunk := (await response.content.readchunk())[0]:
        end = filled + len(chunk)
        if end > size:
            raise aiohttp.ClientPayloadError(f"the answer runs past its Content-Length of {size} bytes")
        body[filled:end] = np.frombuffer(chunk, dtype=np.uint8)
        filled = end
    if filled != size:
        raise aiohttp.ClientPayloadError(f"the answer ended after {filled} of its {size} bytes")
    return memoryview(body).toreadonly()


def pinned_tls_context(ca_file: str) -> ssl.SSLContext:
    """Certificate verification against ``ca_file`` alone (a CA, or the aggregator's own certificate: partial
    chains are accepted so a pinned leaf is a trust anchor), with the host name checked as usual."""
    context = ssl.create_default_context(cafile=ca_file)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


class AggregatorClient:
    """One long-lived HTTP session to the aggregator; over https with ``ca_file`` pinned when given."""

    def __init__(self, base_url: str, aggregator_key: VerifyKey, timeout_seconds: float = 120.0,
                 ca_file: str = ""):
        self.base_url = base_url.rstrip("/")
        self.aggregator_key = aggregator_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds, sock_connect=10)
        self._tls = pinned_tls_context(ca_file) if ca_file else None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AggregatorClient:
        connector = aiohttp.TCPConnector(ssl=self._tls) if self._tls is not None else None
        self._session = aiohttp.ClientSession(timeout=self._timeout, raise_for_status=False, connector=connector,
                                              read_bufsize=READ_BUFFER_BYTES)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("AggregatorClient used outside 'async with'")
        return self._session

    async def _get(
        self,
        path: str,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
        limit: int = wire.DEFAULT_LIMITS.max_bytes,
        missing: str | None = None,
    ) -> memoryview | None:
        """The body of a 200 answer (at most ``limit`` bytes, see :func:`read_body`); None for 204. ``missing``
        names what the path asks for ("model version 3"): a 404 for it is :class:`NotPublished`."""
        kwargs = {"timeout": aiohttp.ClientTimeout(total=timeout)} if timeout else {}
        try:
            async with self.session.get(self.base_url + path, params=params, **kwargs) as response:
                if response.status == 204:
                    return None
                if response.status != 200:
                    answer = await response.content.read(200)
                    if response.status == 404 and missing is not None:
                        raise NotPublished(missing, f"HTTP 404: {answer!r}")
                    raise AggregatorUnavailable(f"GET {path}: HTTP {response.status}: {answer!r}")
                return await read_body(response, limit)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AggregatorUnavailable(f"GET {path}: {exc!r}") from exc

    async def _post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """POST ``body``; the HTTP status and the answer, whatever the status (the caller reads it). An answer of more
        than :data:`MAX_ANSWER_BYTES` is :class:`AggregatorUnavailable`: not read whole, and the message is kept."""
        try:
            async with self.session.post(self.base_url + path, data=body, headers={"Content-Type": content_type}) as r:
                try:
                    answer = await read_body(r, MAX_ANSWER_BYTES)
                except ProtocolError as exc:
                    raise AggregatorUnavailable(f"POST {path}: HTTP {r.status}: {exc}") from exc
                return r.status, bytes(answer)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AggregatorUnavailable(f"POST {path}: {exc!r}") from exc

    async def next_task(self, after_round: int, wait_seconds: float) -> wire.Task | None:
        """Long-poll for a round newer than ``after_round``; None when none opened within the wait."""
        body = await self._get(
            "/v1/task",
            {"after": str(after_round), "wait": str(int(wait_seconds))},
            timeout=wait_seconds + 30,
        )
        if body is None:
            return None
        return wire.decode_task(body, self.aggregator_key)

    async def model_release(
        self, version: int, specs: list[wire.ParamSpec], base: wire.ModelRelease | None = None
    ) -> wire.ModelRelease:
        """Model ``version``, verified against the pinned key. With ``base`` (an earlier release this device
        holds) the aggregator may answer with the steps from it (docs/protocol.md 6.5), which are applied here and
        refused unless the result has the digest the aggregator signed."""
        return (await self.model_answer(version, specs, base))[0]

    async def model_answer(
        self, version: int, specs: list[wire.ParamSpec], base: wire.ModelRelease | None = None
    ) -> tuple[wire.ModelRelease, memoryview]:
        """:meth:`model_release`, and the signed answer it came in (a ModelRelease or a ModelDelta), which the
        agent stores (appliance/held_release.py)."""
        query = None
        if base is not None and base.version < version:
            query = {"base": str(base.version), "base_digest": base.digest.hex()}
        body = await self._get(f"/v1/models/{version}", query, missing=f"model version {version}")
        if body is None:
            raise NotPublished(f"model version {version}")
        return downlink.decode_model_answer(body, self.aggregator_key, specs, base if query else None), body

    async def package_bytes(self, digest: bytes) -> memoryview:
        body = await self._get(f"/v1/packages/{digest.hex()}", limit=MAX_PACKAGE_BYTES,
                               missing=f"package {digest.hex()}")
        if body is None:
            raise NotPublished(f"package {digest.hex()}")
        return body

    async def send_heartbeat(self, body: bytes) -> None:
        """Post a signed Heartbeat (docs/protocol.md section 13). Raises :class:`Rejection` for any 4xx (429
        included: the next heartbeat goes out on schedule anyway; its subclass :class:`StaleReport` for
        ``stale-report``) and :class:`AggregatorUnavailable` otherwise."""
        status, answer = await self._post("/v1/heartbeat", body, "application/cose")
        if status == 204:
            return
        if 400 <= status < 500:
            reason, detail = problem_reason(answer)
            if reason == "stale-report":
                raise StaleReport(status, reason, detail, held_sent_at(answer))
            raise Rejection(status, reason, detail)
        raise AggregatorUnavailable(f"POST /v1/heartbeat: HTTP {status}")

    async def send_update(self, body: bytes) -> wire.Receipt:
        """Upload one signed update; returns the verified receipt.

        Raises :class:`Rejection` for a permanent refusal and :class:`AggregatorUnavailable` for anything
        worth retrying: network, 5xx, 429, and (its subclass :class:`ReceiptRefused`) a receipt that does not
        verify or names another update.
        """
        status, answer = await self._post("/v1/updates", body, UPDATE_CONTENT_TYPE)
        if status == 200:
            try:
                receipt = wire.decode_receipt(answer, self.aggregator_key)
            except ProtocolError as exc:
                raise ReceiptRefused(f"it does not verify ({exc})") from exc
            if receipt.update_digest != wire.update_digest(body):
                named = receipt.update_digest.hex()[:16]
                raise ReceiptRefused(f"it names update {named}..., not this one", names_another_update=True)
            return receipt
        if is_refusal(status):
            raise Rejection(status, *problem_reason(answer))
        raise AggregatorUnavailable(f"POST /v1/updates: HTTP {status}")

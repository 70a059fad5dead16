"""How an upload's bytes come off the socket without letting a few slow or hostile clients block the rest.

An upload is read in two steps (docs/api.md, "Uploads under load"):

1. The signed envelope at the start of the body (at most ``wire.ENVELOPE_PREFIX_BYTES``) is read *without* an
   upload slot and verified: a stranger, a revoked device or a socket that stalls after its headers costs a few
   kilobytes and a deadline, and never holds a slot.
2. The signer then takes one of the upload slots, which bound the memory of bodies being read at once, and the
   rest of the body is read into one buffer. A device holds at most one slot: a second concurrent upload from
   the same device is answered 429, so one enrolled device cannot take every slot either.

Every read has a deadline relative to its size (a floor plus the bytes at a minimum rate), so a stalled body
frees its slot; a client that goes away mid-body is counted, not logged with a traceback.

Once the slot is held, the rest of a large body of known length (at least :data:`LEND_SOCKET_FROM_BYTES` still
to read) comes off the socket straight into its buffer: the connection's transport is lent to a
:class:`_BodyReceiver` (an ``asyncio.BufferedProtocol``), so the kernel copies each byte once, into place, in
pieces as large as the socket holds. Through aiohttp each byte is copied three times (the kernel into a bytes
object, its HTTP parser into a slice of that, the slice into the body), with Python work per piece. aiohttp still
parses the request line and headers and writes the answer; as its parser did not see the body end, the answer
closes the connection (``Connection: close``), and the client's next request opens a new one. A smaller body, a
TLS connection or a chunked body is read through aiohttp: pieces as they came off the socket (``readchunk``),
copied into the body's buffer.

Body buffers are not zeroed first (a zero-filled 4 MB bytearray costs about as much as the copy itself) and are
reused (:class:`Buffers`): fresh memory is zeroed by the kernel when it is first touched, which costs as much
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass

import numpy as np
from aiohttp import StreamReader

from aggregator.store import SPOOL_ALIGNMENT


class BodyTimeout(Exception):
    """The client did not send the body within its deadline."""


class ClientGone(Exception):
    """The client closed the connection before sending the whole body."""


class Oversize(Exception):
    """The body is longer than its Content-Length or than the limit."""


class Truncated(Exception):
    """The body ended before its Content-Length."""


@dataclass(frozen=True)
class ReadDeadline:
    """The time a body of ``size`` bytes may take: ``floor`` seconds plus the bytes at ``min_rate`` bytes/s."""

    floor: float = 30.0
    min_rate: float = 16 * 1024

    def __post_init__(self) -> None:
        if not (self.floor > 0 and self.min_rate > 0):  # NaN too: a timer at NaN fires at once
            raise ValueError(f"the upload timeout floor and minimum rate must be positive, got floor {self.floor} "
                             f"and minimum rate {self.min_rate}")

    def seconds(self, size: int) -> float:
        return self.floor + size / self.min_rate


_BUFFER_GRAIN = 64 * 1024

#: The least of a body still to read for which its connection's socket is lent to a :class:`_BodyReceiver`: the
#: answer then closes the connection, and the client's next one costs the server its set-up. Measured with
#: bench/upload_receive.py (event loop CPU per upload, lent socket against aiohttp, the new connection included):
#: 1.9 against 3.5 ms for 4 MB bodies, 1.17 against 1.80 ms for 2 MB, even at 1 MB (0.74, 0.73) and 0.5 MB.
LEND_SOCKET_FROM_BYTES = 1024 * 1024


class Buffers:
    """Large buffers (upload bodies, decoded deltas) kept for the next upload instead of being freed.

    A freed 4 MB numpy buffer goes back to the kernel, and the next one is new memory that the kernel zeroes on
    first touch (measured: ~0.5 ms of page faults per 1M-parameter upload, for its body and its delta). At most
    ``keep`` buffers are kept, so what stays allocated is bounded by what concurrent uploads needed anyway.

    A buffer is handed out once by :meth:`take` and must be given back (:meth:`give`) only when nothing uses it
    any more: a caller that cannot be sure (an upload abandoned midway, whose worker thread may still read it)
    simply drops it. Thread-safe.
    """

    def __init__(self, keep: int):
        self.keep = keep
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @property
    def kept(self) -> int:
        """How many buffers wait for a :meth:`take`."""
        return len(self._free)

    def take(self, nbytes: int) -> np.ndarray:
        """An uninitialised uint8 array of ``nbytes`` at an address aligned for the spool's direct I/O."""
        # Rounded up, so that bodies a few bytes apart and the deltas of the same model share buffers.
        needed = -(-nbytes // _BUFFER_GRAIN) * _BUFFER_GRAIN + SPOOL_ALIGNMENT
        raw = None
        with self._lock:
            for i, candidate in enumerate(self._free):
                if needed <= candidate.size <= 2 * needed:
                    raw = self._free.pop(i)
                    break
        if raw is None:
            raw = np.empty(needed, dtype=np.uint8)
        start = -raw.ctypes.data % SPOOL_ALIGNMENT
        return raw[start : start + nbytes]

    def give(self, array: np.ndarray) -> None:
        """Keep the buffer behind ``array`` (from :meth:`take`, or any view of it) for a later :meth:`take`."""
        raw = array.base if array.base is not None else array
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1:
            raise ValueError("not a buffer handed out by Buffers.take")
        with self._lock:
            if len(self._free) < self.keep and all(kept is not raw for kept in self._free):
                self._free.append(raw)


class _BodyReceiver(asyncio.BufferedProtocol):
    """The protocol a connection's transport is lent to while the rest of a body is read: the kernel writes each
    piece straight into ``view`` (never past its end, so not one byte of a next request is taken), and the
    reading stops once it is full. Whatever concerns the connection (its loss, write flow control) still goes to
    ``http``, the aiohttp protocol that owns it."""

    def __init__(self, transport: asyncio.Transport, http: asyncio.BaseProtocol, view: memoryview, filled: int):
        self.transport = transport
        self.http = http
        self.view = view
        self.filled = filled
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        if self.filled == len(self.view):
            self.transport.pause_reading()
            if not self.done.done():
                self.done.set_result(None)

    def eof_received(self) -> None:
        """The client shut its side mid-body: the transport closes, :meth:`connection_lost` says so."""

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ClientGone(str(exc) if exc else "Connection lost"))
        self.http.connection_lost(exc)

    def pause_writing(self) -> None:
        self.http.pause_writing()

    def resume_writing(self) -> None:
        self.http.resume_writing()


class BodyReader:
    """Reads one request body in two parts (the envelope prefix, then the rest).

    With a Content-Length the body's buffer is allocated only when the rest is read (after a slot is held), so
    an unslotted reader holds at most the prefix (in ``buffer``). Without one (chunked) ``buffer`` grows up to
    ``limit`` and is the body.

    Given the connection's ``transport`` (plain TCP), the rest of a body of known length is read from the socket
    straight into its buffer (:class:`_BodyReceiver`); :attr:`took_socket` then says that aiohttp's parser did not
    see the body's end, so the connection must close after the answer.
    """

    def __init__(
        self,
        stream: StreamReader,
        content_length: int | None,
        limit: int,
        deadline: ReadDeadline,
        buffers: Buffers,
        transport: asyncio.BaseTransport | None = None,
    ):
        self.stream = stream
        self.transport = transport
        self.took_socket = False
        self.expected = content_length
        self.limit = limit
        self.deadline = deadline
        self.buffers = buffers
        self.buffer = bytearray()
        self.ended = False
        self.received = 0  # bytes read off the socket so far
        self._body: np.ndarray | None = None  # the body's buffer, from ``buffers``

    async def read_prefix(self, size: int) -> bytes:
        """At least the first ``size`` bytes of the body (fewer only if the body is shorter)."""
        want = size if self.expected is None else min(size, self.expected)
        await self._timed(self._fill(want), want)
        return bytes(self.buffer)

    async def read_rest(self) -> memoryview:
        """The whole body."""
        if self.expected is None:
            await self._timed(self._fill(self.limit + 1), self.limit)
            if len(self.buffer) > self.limit:
                raise Oversize(f"body exceeds the limit of {self.limit} bytes")
            return memoryview(self.buffer)
        self._body = self.buffers.take(self.expected)
        whole = memoryview(self._body)
        prefix = len(self.buffer)
        whole[:prefix] = self.buffer
        self.buffer = bytearray()
        filled = self._take_buffered(whole, prefix)
        if self.expected - filled >= LEND_SOCKET_FROM_BYTES and self._socket_lendable():
            await self._timed(self._receive(whole, filled), self.expected - prefix)
        else:
            await self._timed(self._fill_exact(whole, filled), self.expected - prefix)
        return whole

    def recycle(self) -> None:
        """Give the body's buffer back for another upload: call it once the upload is answered and nothing reads
        the body any more (not after an error, when a worker thread may still be reading it)."""
        if self._body is not None:
            self.buffers.give(self._body)
            self._body = None

    async def _timed(self, reading: Awaitable[None], size: int) -> None:
        try:
            async with asyncio.timeout(self.deadline.seconds(size)):
                await reading
        except TimeoutError:
            raise BodyTimeout(
                f"the body was not sent within {self.deadline.seconds(size):.0f} s "
                f"({self.deadline.floor:.0f} s + {size} bytes at {self.deadline.min_rate:.0f} bytes/s)"
            ) from None
        except ConnectionError as exc:  # aiohttp's "Connection lost" mid-body
            raise ClientGone(str(exc) or type(exc).__name__) from None

    async def _chunk(self) -> bytes:
        """The next piece of the body as it came off the socket; empty at its end."""
        while True:
            data, end_of_http_chunk = await self.stream.readchunk()
            if data or not end_of_http_chunk:  # (b"", True) only marks where a chunk of a chunked body ended
                return data

    async def _fill(self, want: int) -> None:
        """Append chunks to the growing buffer until it holds ``want`` bytes or the body ends."""
        while len(self.buffer) < want and not self.ended:
            chunk = await self._chunk()
            if not chunk:
                self.ended = True
                break
            self.buffer += chunk
            self.received += len(chunk)
            if self.expected is not None and len(self.buffer) > self.expected:
                raise Oversize("body is longer than its Content-Length")
        if self.ended and self.expected is not None and len(self.buffer) < self.expected:
            raise Truncated(f"body ended after {len(self.buffer)} of {self.expected} bytes")

    def _take_buffered(self, view: memoryview, filled: int) -> int:
        """Copy what aiohttp holds of the body already into ``view`` (no waiting); returns the bytes now in it."""
        assert self.expected is not None
        try:
            while filled < self.expected and (piece := self.stream.read_nowait(self.expected - filled)):
                view[filled : filled + len(piece)] = piece
                filled += len(piece)
                self.received += len(piece)
        except ConnectionError as exc:
            raise ClientGone(str(exc) or type(exc).__name__) from None
        return filled

    def _socket_lendable(self) -> bool:
        """The connection is plain TCP whose transport can be lent to a :class:`_BodyReceiver`."""
        transport = self.transport
        return (
            isinstance(transport, asyncio.Transport)
            and not transport.is_closing()
            and transport.get_extra_info("sslcontext") is None
            and transport.get_extra_info("socket") is not None
        )

    async def _receive(self, view: memoryview, filled: int) -> None:
        """Read the rest of the body from the socket straight into ``view`` (:class:`_BodyReceiver`), then give the
        transport back to aiohttp with reading paused and its view of the body ended."""
        transport = self.transport
        assert isinstance(transport, asyncio.Transport)
        http = transport.get_protocol()
        receiver = _BodyReceiver(transport, http, view, filled)
        self.took_socket = True
        transport.set_protocol(receiver)
        try:
            transport.resume_reading()  # aiohttp may have paused it while its own buffer was full
            await receiver.done
        finally:
            self.received += receiver.filled - filled
            transport.pause_reading()
            transport.set_protocol(http)
            self.stream.feed_eof()  # aiohttp then does not wait for the body's end before it closes the connection

    async def _fill_exact(self, view: memoryview, filled: int) -> None:
        """Copy the remaining chunks straight into the preallocated ``view`` (one copy of each byte)."""
        assert self.expected is not None
        while filled < self.expected:
            chunk = await self._chunk()
            if not chunk:
                raise Truncated(f"body ended after {filled} of {self.expected} bytes")
            end = filled + len(chunk)
            if end > self.expected:
                raise Oversize("body is longer than its Content-Length")
            view[filled:end] = chunk
            filled = end
            self.received += len(chunk)


class DeviceBusy(Exception):
    """The device already has an upload being received."""


class UploadSlots:
    """At most ``limit`` bodies read at once, and at most one upload per device (reading or waiting)."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("max_active_uploads must be at least 1")
        self.limit = limit
        # A body and a delta per upload slot (a delta is spooled and accumulated before its upload frees the slot).
        self.buffers = Buffers(keep=2 * limit)
        self._slots = asyncio.Semaphore(limit)
        self._devices: set[str] = set()
        self.active = 0
        self.waiting = 0

    @property
    def saturated(self) -> bool:
        """Every slot is taken: a new upload would have to wait."""
        return self.active >= self.limit

    @contextlib.asynccontextmanager
    async def slot(self, device_id: str) -> AsyncIterator[None]:
        """Hold one slot for ``device_id``'s upload; :class:`DeviceBusy` if it already has one."""
        if device_id in self._devices:
            raise DeviceBusy(f"device {device_id} already has an upload in progress; retry once it is answered")
        self._devices.add(device_id)
        try:
            self.waiting += 1
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
            self.active += 1
            try:
                yield
            finally:
                self.active -= 1
                self._slots.release()
        finally:
            self._devices.discard(device_id)

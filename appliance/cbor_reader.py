"""A strict, bounded CBOR reader for untrusted input.

cbor2 writes every message we send. Reading is done here instead because what arrives over the network is
hostile until verified: this reader enforces the protocol's limits (nesting depth, container lengths, item
count, allowed tags) *while* it decodes, so a tiny message that declares a 4-billion-element array costs
nothing, and it returns byte strings as ``memoryview`` slices of the input, so tensor data is never copied
before it reaches numpy. Every failure is a :class:`~appliance.wire.ProtocolError` with a stable reason.

Supported: unsigned/negative integers, byte and text strings, arrays, maps, tags (from an allow-list),
false/true/null, and half/single/double floats. Indefinite lengths are refused: the protocol uses
deterministic encoding (RFC 8949 section 4.2), which never has them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from appliance.errors import ProtocolError


@dataclass(frozen=True)
class Limits:
    """Bounds applied before and while decoding one message."""

    max_bytes: int = 64 * 1024 * 1024
    max_depth: int = 8
    max_container_len: int = 4096
    max_items: int = 100_000
    max_tensor_elements: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class Tagged:
    """A tagged item whose tag is on the allow-list."""

    tag: int
    value: Any


_HALF = struct.Struct(">e")
_SINGLE = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")


class Reader:
    """Decodes one CBOR item at a time from ``data`` starting at ``pos``."""

    def __init__(self, data: bytes | bytearray | memoryview, limits: Limits, allowed_tags: frozenset[int]):
        self.buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        self.pos = 0
        self.limits = limits
        self.allowed_tags = allowed_tags
        self.items = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.buf)

    def read_item(self) -> Any:
        """Decode the next complete item."""
        return self._item(0)

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ProtocolError("truncated", f"message ends inside an item at byte {self.pos}")

    def _argument(self, info: int) -> int:
        if info < 24:
            return info
        if info == 31:
            raise ProtocolError("indefinite-length", f"indefinite-length item at byte {self.pos - 1}")
        if info > 27:
            raise ProtocolError("malformed", f"reserved additional information {info} at byte {self.pos - 1}")
        size = 1 << (info - 24)
        self._need(size)
        value = int.from_bytes(self.buf[self.pos : self.pos + size], "big")
        self.pos += size
        return value

    def _item(self, depth: int) -> Any:
        # The hot path of every message we read: the checks are those of _need and _argument, inlined.
        if depth > self.limits.max_depth:
            raise ProtocolError("too-deep", f"nesting deeper than {self.limits.max_depth}")
        self.items += 1
        if self.items > self.limits.max_items:
            raise ProtocolError("too-many-items", f"more than {self.limits.max_items} items")
        buf, pos = self.buf, self.pos
        if pos >= len(buf):
            raise ProtocolError("truncated", f"message ends inside an item at byte {pos}")
        initial = buf[pos]
        self.pos = pos + 1
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            return self._simple(info)
        arg = info if info < 24 else self._argument(info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major in (2, 3):
            start = self.pos
            end = start + arg
            if end > len(buf):
                raise ProtocolError("truncated", f"message ends inside an item at byte {start}")
            self.pos = end
            if major == 2:
                return buf[start:end]
            try:
                return str(buf[start:end], "utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolError("malformed", f"text string is not UTF-8: {exc.reason}") from None
        if major in (4, 5):
            if arg > self.limits.max_container_len:
                raise ProtocolError("too-long", f"container of {arg} entries exceeds {self.limits.max_container_len}")
            inner = depth + 1
            if major == 4:
                return [self._item(inner) for _ in range(arg)]
            result: dict[Any, Any] = {}
            for _ in range(arg):
                key = self._item(inner)
                # bool is an int in Python: without the explicit check, key true would read as key 1.
                if not isinstance(key, int | str) or isinstance(key, bool):
                    raise ProtocolError("malformed", "map keys must be integers or text strings")
                if key in result:
                    raise ProtocolError("malformed", f"duplicate map key {key!r}")
                result[key] = self._item(inner)
            return result
        # major 6: tag
        if arg not in self.allowed_tags:
            raise ProtocolError("unknown-tag", f"tag {arg} is not allowed here")
        return Tagged(arg, self._item(depth + 1))

    def _simple(self, info: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        for code, fmt in ((25, _HALF), (26, _SINGLE), (27, _DOUBLE)):
            if info == code:
                self._need(fmt.size)
                (value,) = fmt.unpack_from(self.buf, self.pos)
                self.pos += fmt.size
                return value
        if info == 31:
            raise ProtocolError("malformed", f"unexpected break at byte {self.pos - 1}")
        raise ProtocolError("malformed", f"unsupported simple value {info} at byte {self.pos - 1}")


def loads(data: bytes | bytearray | memoryview, limits: Limits, allowed_tags: frozenset[int] = frozenset()) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error."""
    if len(data) > limits.max_bytes:
        raise ProtocolError("too-large", f"{len(data)} bytes exceeds the limit of {limits.max_bytes}")
    reader = Reader(data, limits, allowed_tags)
    value = reader.read_item()
    if not reader.at_end():
        raise ProtocolError("trailing-bytes", f"{len(reader.buf) - reader.pos} bytes after the item")
    return value

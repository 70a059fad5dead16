"""How an acknowledged update's spooled record is checked again when its round resumes after a restart.

A record was fdatasynced before its receipt, yet a disk can still hand back other bytes than it was given (a bit
flip, an SD card's worn block, a sector of something else). Those bytes must not be averaged into the model, so
each record's ``updates`` row carries one check, taken when the update arrived, and :meth:`Store.recover_segment
<aggregator.store.Store.recover_segment>` takes an update whose record fails it out of the round.

Most records are checked against the SHA-256 their device signed, at no cost on arrival (that digest was checked
there anyway): the record is a function of the signed section that can be inverted exactly, so the section is
rebuilt from the record and the model's parameter specs and hashed again.

* ``float32-sha256``, ``float16-sha256``, ``int8-sha256``: an update whose tensor section was in deterministic
  encoding (what every agent sends), checked against its ``tensors_sha256``. A float32 record is the section's data;
  a float16 one is its values widened, and an int8 one each value times its tensor's scale, both rounded back to
  the values they came from and checked to widen or multiply to the record's exact bits (so no changed bit can
  round away). The int8 scales, a few bytes, are kept beside the digest. Whether a section is the deterministic one
  is a comparison of its few CBOR heads on arrival. (An int8 scale so small that it is 0 in float32, which the
  reader accepts, dequantises every value to zero: that record cannot give its data back and gets a CRC-32.)
* ``masked-sha256``: a secure round's masked input, whose record is the words of its section (``section_sha256``).
* ``crc32``: every other record, whose bytes no signed digest covers (an async buffer spools a stale update scaled
  by its staleness weight; a section in a valid but not deterministic encoding): CRC-32 of the record, computed by
  the spool writer as it writes it.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np

from appliance import wire

MASKED_SHA256 = "masked-sha256"
CRC32 = "crc32"
#: The check kind of an update's record, by the encoding of its tensor section.
SIGNED_TENSORS = {"float32": "float32-sha256", "float16": "float16-sha256", "int8": "int8-sha256"}
#: Every check kind this version can verify. A row may carry another one (written by a newer aggregator, or damaged):
#: :meth:`Store.recover_segment <aggregator.store.Store.recover_segment>` then refuses to resume its round.
CHECK_KINDS = frozenset({MASKED_SHA256, CRC32, *SIGNED_TENSORS.values()})

_DIGEST_BYTES = 32
_TAG_MULTI_DIM = b"\xd8\x28\x82"  # tag 40 over [dims, typed array]
_TYPED = {"float32": (b"\xd8\x55", 4), "float16": (b"\xd8\x54", 2), "int8": (b"\xd8\x48", 1)}  # tags 85, 84, 72
_TAG_UINT32_LE = b"\xd8\x46"  # tag 70: a masked input's words
_FLOAT_BYTES = {0xF9: 3, 0xFA: 5, 0xFB: 9}  # a CBOR half, single or double float, head included
_FLOAT32_ROUNDS_TO_ZERO = 2.0**-150  # half float32's smallest subnormal: a double this small is 0 in float32


@dataclass(frozen=True)
class RecordCheck:
    """What a spooled record must match at resume: ``kind`` (see above) and its value (a digest, for int8 the
    digest and then the CBOR encodings of the tensors' scales in section order)."""

    kind: str
    value: bytes


def crc32_check(record: Any) -> RecordCheck:
    """The ``crc32`` check of a record's bytes (anything with the buffer protocol, contiguous)."""
    return RecordCheck(CRC32, zlib.crc32(record).to_bytes(4, "big"))


class TensorSection:
    """A model's tensor section in deterministic encoding (docs/protocol.md section 5), known but for its data: a
    map in the encoded names' order, each name then ``40([dims, typed array])`` (int8: ``[that, scale]``). The
    record holds the tensors as float32 in the specs' order."""

    def __init__(self, specs: Sequence[wire.ParamSpec]):
        starts, offset = {}, 0
        for spec in specs:
            starts[spec.name] = offset
            offset += spec.size
        keyed = sorted((cbor2.dumps(spec.name, canonical=True), spec) for spec in specs)
        #: Per encoding, per tensor in section order: the bytes before its data, and its slice of the record
        #: (in float32 values).
        self.pieces: dict[str, list[tuple[bytes, int, int]]] = {}
        for encoding, (tag, itemsize) in _TYPED.items():
            pieces = []
            for index, (key, spec) in enumerate(keyed):
                head = wire.cbor_head(5, len(keyed)) if index == 0 else b""
                head += key + (b"\x82" if encoding == "int8" else b"")
                head += _TAG_MULTI_DIM + cbor2.dumps(list(spec.shape), canonical=True) + tag
                start = starts[spec.name]
                pieces.append((head + wire.cbor_head(2, itemsize * spec.size), start, start + spec.size))
            self.pieces[encoding] = pieces

    def check(self, verified: wire.Verified, encoding: str) -> RecordCheck | None:
        """The check of the record of an update decoded from ``verified`` (whose section has been checked against
        its signed digest): that digest (and the int8 scales) if the section is in deterministic encoding, else
        None (the spool takes a CRC). Microseconds: only the CBOR heads are compared."""
        section, (_, itemsize) = verified.rest, _TYPED[encoding]
        position, scales = 0, b""
        for head, start, stop in self.pieces[encoding]:
            if section[position : position + len(head)] != head:
                return None
            position += len(head) + itemsize * (stop - start)
            if encoding == "int8":
                width = _FLOAT_BYTES.get(section[position]) if position < len(section) else None
                if width is None:
                    return None
                if width == 9 and abs(struct.unpack_from(">d", section, position + 1)[0]) <= _FLOAT32_ROUNDS_TO_ZERO:
                    return None  # a scale of 0 in float32 dequantises to zeros: the int8 data cannot be rebuilt
                scales += bytes(section[position : position + width])
                position += width
        if position != len(section):
            return None
        return RecordCheck(SIGNED_TENSORS[encoding], bytes(verified.payload["tensors_sha256"]) + scales)

    def intact(self, check: RecordCheck, record: np.ndarray) -> bool:
        """Whether ``record`` (uint8) rebuilds the section whose digest ``check`` holds."""
        encoding = next(e for e, kind in SIGNED_TENSORS.items() if kind == check.kind)
        values = record.view("<f4")
        digest, scales = check.value[:_DIGEST_BYTES], check.value[_DIGEST_BYTES:]
        sha = hashlib.sha256()
        for head, start, stop in self.pieces[encoding]:
            sha.update(head)
            part = values[start:stop]
            if encoding == "float32":
                sha.update(part)
                continue
            scale = b""
            if encoding == "float16":
                with np.errstate(over="ignore"):  # past float16's range: inf, no match below
                    data = part.astype("<f2")
                widened = data.astype(np.float32)
            else:
                width = _FLOAT_BYTES.get(scales[0], 0) if scales else 0
                scale, scales = scales[:width], scales[width:]
                if not scale or len(scale) < width:  # a check value without (all of) its scales: damaged
                    return False
                factor = np.float32(cbor2.loads(scale))  # as wire's decoder dequantises
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    data = np.rint(part / factor).astype(np.int8)  # out of range or NaN: no match below
                widened = np.multiply(data, factor, dtype=np.float32)
            if not np.array_equal(widened.view(np.uint32), part.view(np.uint32)):
                return False  # not a value the signed data makes: a changed bit that rounding would hide
            sha.update(data)
            sha.update(scale)
        return sha.digest() == digest


def masked_check(
    body: memoryview, envelope: bytes, digest: bytes, payload: dict[str, Any], size: int
) -> RecordCheck | None:
    """The check of a masked input's record (``size`` bytes of words): its signed ``section_sha256`` if ``body``
    is exactly its signed ``envelope`` (the one whose SHA-256 is ``digest``) followed by ``70(words)`` in
    deterministic encoding, else None (the spool takes a CRC)."""
    head = _TAG_UINT32_LE + wire.cbor_head(2, size)
    section = memoryview(body)[len(envelope) :]
    if len(section) != len(head) + size or section[: len(head)] != head:
        return None
    if hashlib.sha256(envelope).digest() != digest:
        return None
    return RecordCheck(MASKED_SHA256, bytes(payload["section_sha256"]))


def record_intact(check: RecordCheck, record: np.ndarray, tensors: TensorSection | None) -> bool:
    """Whether a spooled ``record`` (a contiguous uint8 array) still matches its ``check``; ``tensors`` is the
    model's tensor section, which the checks of updates against their signed digests need."""
    if check.kind == CRC32:
        return crc32_check(record) == check
    if check.kind == MASKED_SHA256:
        sha = hashlib.sha256(_TAG_UINT32_LE + wire.cbor_head(2, len(record)))
        sha.update(record)
        return sha.digest() == check.value
    if check.kind in SIGNED_TENSORS.values():
        if tensors is None:
            raise ValueError(f"a {check.kind} record check needs the model's tensor section")
        return tensors.intact(check, record)
    raise ValueError(f"unknown spool record check {check.kind!r}")

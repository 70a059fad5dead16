"""Verification of one uploaded update, in two steps so a doomed upload costs little.

1. :func:`header_of` reads the signed metadata of a verified envelope (who, which round, which base model, when,
   in which encoding). An encoding other than the one the task asked for is refused here (``wrong-encoding``);
   the round engine decides from the rest whether the update can count at all (round open, right model, not a
   duplicate, not expired).
2. :func:`delta_of` hashes the tensor section against the signed digest and decodes it against the model's
   parameter specs (names, shapes, finite values) straight into one flat float32 delta, in a buffer the spool
   writes to disk without a copy, and returns it with its L2 norm.

The 64-byte signature is checked once per upload (:func:`wire.verify`, on the envelope at the start of the body),
and each byte of the tensors is hashed once and copied once. :func:`read_header` and :func:`decode_delta` do both
steps from a body, for callers that hold only the bytes. Both steps are meant to run on worker threads: hashlib
and numpy release the GIL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.models import Layout
from aggregator.store import spool_vector
from aggregator.uploads import Buffers
from appliance import wire
from appliance.errors import ProtocolError


@dataclass(frozen=True)
class UpdateHeader:
    """The signed metadata of an update."""

    device_id: str
    round_id: int
    model_version: int
    base_digest: bytes
    num_samples: int
    created_at: int


_MAX_SAMPLES = 2**31 - 1


def _int(payload: dict[str, Any], name: str, low: int = 0, high: int = wire.MAX_ID) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad-payload", f"field {name!r} missing or not an integer")
    if not low <= value <= high:
        raise ProtocolError("bad-payload", f"field {name!r} = {value} is outside [{low}, {high}]")
    return value


def read_header(
    body: bytes | memoryview, key_for_kid: wire.KeyLookup, limits: wire.Limits, task_encoding: str | None = None
) -> UpdateHeader:
    """Verify the envelope's signature and return the update's signed metadata (:func:`header_of`)."""
    return header_of(wire.verify(body, key_for_kid, limits), task_encoding)


def header_of(verified: wire.Verified, task_encoding: str | None = None) -> UpdateHeader:
    """The signed metadata of an update whose envelope :func:`wire.verify` has accepted.

    ``task_encoding`` is the tensor encoding the round's task asks for: an operator who chose int8 to save
    uplink gets int8 updates, not whatever a device prefers. The signed ``encoding`` is checked here, before
    the tensors are hashed; :func:`delta_of` then holds the tensor section to it (``bad-tensor``). None
    skips that check, for a caller that only needs to know who signed the update.
    """
    p = verified.payload
    if p.get("type") != "update":
        raise ProtocolError("wrong-type", f"expected an update message, got {p.get('type')!r}")
    device = p.get("device")
    if not isinstance(device, str):
        raise ProtocolError("bad-payload", "field 'device' missing or not text")
    if device != verified.kid:
        raise ProtocolError("kid-mismatch", f"update names device {device!r} but is signed by {verified.kid!r}")
    base = p.get("base_digest")
    if not isinstance(base, memoryview):
        raise ProtocolError("bad-payload", "field 'base_digest' missing or not bytes")
    encoding = p.get("encoding")
    if encoding not in wire.ENCODINGS:
        raise ProtocolError("bad-payload", f"field 'encoding' is {encoding!r}, not one of {', '.join(wire.ENCODINGS)}")
    if task_encoding is not None and encoding != task_encoding:
        raise ProtocolError(
            "wrong-encoding", f"the update's tensors are {encoding} but the task asks for {task_encoding}"
        )
    return UpdateHeader(
        device_id=device,
        round_id=_int(p, "round"),
        model_version=_int(p, "model_version"),
        base_digest=bytes(base),
        num_samples=_int(p, "num_samples", 1, _MAX_SAMPLES),
        created_at=_int(p, "created_at"),
    )


def decode_delta(
    body: bytes | memoryview, key_for_kid: wire.KeyLookup, layout: Layout, limits: wire.Limits
) -> tuple[wire.Update, np.ndarray, float]:
    """Verify a whole body and decode its delta (:func:`delta_of`)."""
    return delta_of(wire.verify(body, key_for_kid, limits), layout, limits)


def delta_of(
    verified: wire.Verified, layout: Layout, limits: wire.Limits, buffers: Buffers | None = None
) -> tuple[wire.Update, np.ndarray, float]:
    """The update of a verified envelope, its delta as one flat float32 vector in the layout's order, and the
    delta's L2 norm. The vector comes from ``buffers`` when given (the caller gives it back once it is spooled)."""
    flat = spool_vector(layout.size) if buffers is None else buffers.take(4 * layout.size).view(np.float32)
    update = wire.update_from(verified, layout.specs, limits, into=flat, finite=False)
    # One pass for the norm and the finiteness check: a NaN or an infinity makes the sum of squares NaN or inf.
    with np.errstate(over="ignore"):  # a float32 sum of squares past 3.4e38 is inf: over any bound, as it should be
        squares = float(np.dot(flat, flat))
    if not math.isfinite(squares):
        wire.check_finite(update.tensors)  # not-finite, naming the tensor; else finite values overflowed the sum
    return update, flat, math.sqrt(squares)


def envelope_in(body: memoryview, head: bytes, verified: wire.Verified) -> wire.Verified:
    """``verified`` (the envelope :func:`wire.verify` accepted at the start of ``head``) as the envelope of the
    whole ``body`` that begins with ``head``: the same signed bytes, now followed by the whole tensor section."""
    end = len(head) - len(verified.rest)
    if memoryview(body)[:end] != memoryview(head)[:end]:
        raise ValueError("the body does not begin with the envelope that was verified")
    return wire.Verified(verified.kid, verified.payload, memoryview(body)[end:], verified.digest)

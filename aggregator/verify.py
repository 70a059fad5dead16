"""Verification of one uploaded update, in two steps so a doomed upload costs little.

1. :func:`read_header` checks the 64-byte signature over the small signed payload and reads its fields (who,
   which round, which base model, when, in which encoding). An encoding other than the one the task asked
   for is refused here (``wrong-encoding``); the round engine decides from the rest whether the update can
   count at all (round open, right model, not a duplicate, not expired).
2. :func:`decode_delta` hashes the tensor section against the signed digest and decodes it against the model's
   parameter specs (names, shapes, finite values), returning one flat float32 delta and its L2 norm.

Both are CPU-bound and meant to run on worker threads: hashlib and numpy release the GIL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.models import Layout
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


_MAX_ID = 2**63 - 1  # what SQLite's INTEGER holds
_MAX_SAMPLES = 2**31 - 1


def _int(payload: dict[str, Any], name: str, low: int = 0, high: int = _MAX_ID) -> int:
    value = payload.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("bad-payload", f"field {name!r} missing or not an integer")
    if not low <= value <= high:
        raise ProtocolError("bad-payload", f"field {name!r} = {value} is outside [{low}, {high}]")
    return value


def read_header(
    body: bytes | memoryview, key_for_kid: wire.KeyLookup, limits: wire.Limits, task_encoding: str | None = None
) -> UpdateHeader:
    """Verify the envelope's signature and return the update's signed metadata.

    ``task_encoding`` is the tensor encoding the round's task asks for: an operator who chose int8 to save
    uplink gets int8 updates, not whatever a device prefers. The signed ``encoding`` is checked here, before
    the tensors are hashed; :func:`decode_delta` then holds the tensor section to it (``bad-tensor``). None
    skips that check, for a caller that only needs to know who signed the update.
    """
    verified = wire.verify(body, key_for_kid, limits)
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
    """The verified update, its delta as one flat float32 vector in the layout's order, and the delta's L2 norm."""
    update = wire.decode_update(body, key_for_kid, layout.specs, limits)
    flat = layout.flatten(update.tensors)
    with np.errstate(over="ignore"):  # a float32 sum of squares past 3.4e38 is inf: over any bound, as it should be
        norm = float(np.linalg.norm(flat))
    return update, flat, norm

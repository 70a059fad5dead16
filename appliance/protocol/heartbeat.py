"""The Heartbeat (docs/protocol.md section 13): a small signed report of a device's state for the fleet view.

A device sends one on its poll path (``POST /v1/heartbeat``) every few minutes, independent of rounds, so a device
that trains rarely (async mode) or not at all (no labelled frames, trainer killed) is still seen. It carries only
what an operator needs to tell a healthy device from a silent, behind or throttled one: agent version, the model
version held, the last round taken, cameras present, the budget (memory use and limit, CPU limit, the share of
time throttled by cpu.max), the OOM retries the last training needed, the outbox depth, and how often the data
partition failed the agent (a card filling up or dying shows in the fleet view, not only in the device's metrics).

A signature proves who sent it, not that it is sane: every field has a type and a range, the field set is exact,
and the whole message is at most :data:`MAX_HEARTBEAT_BYTES`, checked before anything is decoded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nacl.signing import SigningKey

from appliance import wire
from appliance.errors import ProtocolError

HEARTBEAT_TYPE = "heartbeat"
MAX_HEARTBEAT_BYTES = 1024  # a real one is about 300 bytes
HEARTBEAT_LIMITS = wire.Limits(max_bytes=MAX_HEARTBEAT_BYTES, max_depth=4, max_container_len=32, max_items=128)
MAX_AGENT_VERSION_CHARS = 32
_MAX_BYTES = 2**48  # 256 TiB: more memory or outbox than any device has
# field -> largest value; each an unsigned integer
FIELD_RANGES: dict[str, int] = {
    "last_round": wire.MAX_ID,
    "cameras": 64,
    "memory": _MAX_BYTES,
    "memory_max": _MAX_BYTES,
    "cpu_max": 1024 * 1000,
    "cpu_throttled": 1000,
    "oom_retries": 64,
    "outbox": 1_000_000,
    "outbox_bytes": _MAX_BYTES,
    "sent_at": 2**40,
}
MAX_STORAGE_ERRORS = 2**32
_REQUIRED = frozenset({"v", "type", "device", "agent", *FIELD_RANGES})
_OPTIONAL = frozenset({"model_version", "storage_errors"})


@dataclass(frozen=True)
class Heartbeat:
    """One device's state as it reports it. Sizes in bytes, ``cpu_max`` in thousandths of a CPU (0: no limit),
    ``cpu_throttled`` in thousandths of the time since the previous report, ``memory_max`` 0: no limit."""

    device_id: str
    agent_version: str
    model_version: int | None  # the model version held; None: none yet
    last_round: int  # the last round the device took part in (0: none)
    cameras: int
    memory: int
    memory_max: int
    cpu_max: int
    cpu_throttled: int
    oom_retries: int  # how many times the last training run was killed for memory and retried smaller
    outbox: int
    outbox_bytes: int
    sent_at: int = field(default_factory=lambda: int(time.time()))
    # Writes and reads the data partition refused (full, read-only, failing: appliance/storage_errors.py) since the
    # agent started; 0, and absent from the message, while there were none.
    storage_errors: int = 0


def encode_heartbeat(heartbeat: Heartbeat, key: SigningKey) -> bytes:
    """The signed message: a COSE_Sign1 alone, nothing after it."""
    payload: dict[str, Any] = {
        "v": wire.PROTOCOL_VERSION,
        "type": HEARTBEAT_TYPE,
        "device": heartbeat.device_id,
        "agent": heartbeat.agent_version,
        "last_round": heartbeat.last_round,
        "cameras": heartbeat.cameras,
        "memory": heartbeat.memory,
        "memory_max": heartbeat.memory_max,
        "cpu_max": heartbeat.cpu_max,
        "cpu_throttled": heartbeat.cpu_throttled,
        "oom_retries": heartbeat.oom_retries,
        "outbox": heartbeat.outbox,
        "outbox_bytes": heartbeat.outbox_bytes,
        "sent_at": heartbeat.sent_at,
    }
    if heartbeat.model_version is not None:
        payload["model_version"] = heartbeat.model_version
    if heartbeat.storage_errors:
        payload["storage_errors"] = heartbeat.storage_errors
    return wire.sign(payload, key, heartbeat.device_id)


def _uint(p: Mapping[str, Any], name: str, high: int) -> int:
    value = p[name]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ProtocolError("bad-payload", f"field {name!r} must be an integer in [0, {high}]")
    return value


def decode_heartbeat(message: bytes | memoryview, key_for_kid: wire.KeyLookup) -> Heartbeat:
    """Verify a heartbeat (signed by the device it names) and check every field's type and range."""
    if len(message) > MAX_HEARTBEAT_BYTES:
        raise ProtocolError("too-large", f"{len(message)} bytes exceeds the heartbeat limit of {MAX_HEARTBEAT_BYTES}")
    verified = wire.verify(message, key_for_kid, HEARTBEAT_LIMITS)
    p = verified.payload
    if p.get("type") != HEARTBEAT_TYPE:
        raise ProtocolError("wrong-type", f"expected a heartbeat message, got {p.get('type')!r}")
    if len(verified.rest):
        raise ProtocolError("trailing-bytes", "a heartbeat carries nothing after its envelope")
    missing, unknown = _REQUIRED - set(p), set(p) - _REQUIRED - _OPTIONAL
    if missing or unknown:
        raise ProtocolError("bad-payload", f"heartbeat fields: missing {sorted(missing)}, unknown "
                                           f"{sorted(map(str, unknown))}")
    device = p["device"]
    if not isinstance(device, str):
        raise ProtocolError("bad-payload", "field 'device' must be text: the id of the device that signs it")
    if device != verified.kid:
        raise ProtocolError("kid-mismatch", f"the heartbeat names device {device!r} but is signed by {verified.kid!r}")
    agent = p["agent"]
    if not (isinstance(agent, str) and 0 < len(agent) <= MAX_AGENT_VERSION_CHARS
            and all(" " < c <= "~" for c in agent)):
        raise ProtocolError("bad-payload", f"field 'agent' must be 1 to {MAX_AGENT_VERSION_CHARS} printable ASCII "
                                           "characters without spaces")
    values = {name: _uint(p, name, high) for name, high in FIELD_RANGES.items()}
    return Heartbeat(
        device_id=device,
        agent_version=agent,
        model_version=_uint(p, "model_version", wire.MAX_ID) if "model_version" in p else None,
        **values,
        storage_errors=_uint(p, "storage_errors", MAX_STORAGE_ERRORS) if "storage_errors" in p else 0,
    )

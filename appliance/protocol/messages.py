"""The secure-aggregation messages on the wire (docs/protocol.md section 12).

Each is a COSE_Sign1 envelope as in :mod:`appliance.wire` (Ed25519, deterministic CBOR, version 1), whose
payload names the message ``type``, the protocol ``phase`` it belongs to and the ``round``. All but the
advertisement carry their bulk in a **section** that follows the envelope, as an Update's tensors do: one CBOR
item whose SHA-256 the signed payload pins (``section_sha256``), so the envelope stays small (rosters and
share bundles grow with the number of devices; an envelope may not exceed 64 KiB). Every limit of
:class:`~appliance.cbor_reader.Limits` applies to the section too, before anything is decoded.

Device -> aggregator, signed by the device (``device`` must be the ``kid``):

- ``secagg-advertise`` (phase ``advertise``): the round's two public keys and the proof that the sender knows
  its cipher secret (:mod:`.key_possession`);
- ``secagg-shares`` (``share``): the commitments and one ciphertext per neighbour;
- ``secagg-masked`` (``masked``): the masked input, P + 1 little-endian uint32 (RFC 8746 tag 70), and the
  evidence against each neighbour whose shares were rejected; sent through the outbox to ``POST /v1/updates``
  like an Update;
- ``secagg-unmask`` (``unmask``): shares and pairwise seeds for the unmask request.

Aggregator -> devices, signed by the aggregator:

- ``secagg-roster`` (opens ``share``): who takes part, in order, with their keys and the round's parameters;
  its section's SHA-256 seeds the neighbour graph;
- ``secagg-routed`` (opens ``masked``): the dealings addressed to one device;
- ``secagg-unmask-request`` (opens ``unmask``): survivors and dropped devices.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np
from nacl.signing import SigningKey, VerifyKey

from appliance import cbor_reader, wire
from appliance.errors import ProtocolError
from appliance.protocol import dleq, key_possession, shamir
from appliance.protocol.secagg import (
    SHARE_CIPHERTEXT_BYTES,
    Accusation,
    Answer,
    Dealing,
    Keys,
    RoundSetup,
    RoutedShare,
)

PHASES = ("advertise", "share", "masked", "unmask")
PHASE_OF = {
    "secagg-advertise": "advertise",
    "secagg-shares": "share",
    "secagg-masked": "masked",
    "secagg-unmask": "unmask",
    "secagg-roster": "share",
    "secagg-routed": "masked",
    "secagg-unmask-request": "unmask",
}
TAG_UINT32_LE = 70
_MASKED_TAGS = frozenset({TAG_UINT32_LE})
_MAX_INDEX = 2**32 - 1
MAX_ROUND_ID = wire.MAX_ID  # what SQLite's INTEGER holds, as for an Update's round


# ------------------------------------------------------------------------------------------------ helpers


def _bstr_head(length: int) -> bytes:
    """The shortest CBOR head of a byte string of ``length`` bytes."""
    if length < 24:
        return bytes([0x40 | length])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if length < 1 << (8 * size):
            return bytes([0x40 | info]) + length.to_bytes(size, "big")
    raise ValueError("byte string too long")


def _seal(payload: dict[str, Any], section: bytes | None, key: SigningKey, kid: str) -> bytes:
    body = {"v": wire.PROTOCOL_VERSION, **payload}
    if section is None:
        return wire.sign(body, key, kid)
    body["section_sha256"] = hashlib.sha256(section).digest()
    return wire.sign(body, key, kid) + section


@dataclass(frozen=True)
class Opened:
    """A verified secure-aggregation message: its signer, payload and (checked) section bytes."""

    kid: str
    payload: dict[str, Any]
    section: memoryview


def open_message(
    message: bytes | memoryview, key_for_kid: wire.KeyLookup, kind: str, limits: wire.Limits = wire.DEFAULT_LIMITS
) -> Opened:
    """Verify the envelope, its type and phase, and the section's digest (nothing of the section is decoded)."""
    verified = wire.verify(message, key_for_kid, limits)
    p = verified.payload
    if p.get("type") != kind:
        raise ProtocolError("wrong-type", f"expected a {kind} message, got {p.get('type')!r}")
    if p.get("phase") != PHASE_OF[kind]:
        raise ProtocolError("wrong-phase", f"a {kind} message belongs to phase {PHASE_OF[kind]!r}, "
                                           f"not {p.get('phase')!r}")
    round_of(p)
    if kind == "secagg-advertise":
        if len(verified.rest):
            raise ProtocolError("trailing-bytes", f"a {kind} carries no section")
        return Opened(verified.kid, p, verified.rest)
    pinned = _bstr(p, "section_sha256", 32)
    if hashlib.sha256(verified.rest).digest() != pinned:
        raise ProtocolError("digest-mismatch", "the section does not match the signed digest")
    return Opened(verified.kid, p, verified.rest)


def round_of(payload: Mapping[str, Any]) -> int:
    """The signed ``round`` of a message's payload: an integer in [0, MAX_ROUND_ID], else ``bad-payload``."""
    return _uint(payload, "round", MAX_ROUND_ID)


def _device(opened: Opened) -> str:
    device = opened.payload.get("device")
    if not isinstance(device, str):
        raise ProtocolError("bad-payload", "field 'device' missing or not text")
    if device != opened.kid:
        raise ProtocolError("kid-mismatch", f"the message names device {device!r} but is signed by {opened.kid!r}")
    return device


def _uint(p: Mapping[str, Any], name: str, high: int = _MAX_INDEX) -> int:
    value = p.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ProtocolError("bad-payload", f"field {name!r} missing or not an integer in [0, {high}]")
    return value


def _bstr(p: Mapping[str, Any], name: str, length: int | None = None) -> bytes:
    value = p.get(name)
    if not isinstance(value, memoryview) or (length is not None and len(value) != length):
        size = f"of {length} bytes" if length is not None else ""
        raise ProtocolError("bad-payload", f"field {name!r} missing or not a byte string {size}".rstrip())
    return bytes(value)


def _section(opened: Opened, limits: wire.Limits, allowed_tags: frozenset[int] = frozenset()) -> Any:
    section_limits = wire.Limits(max_bytes=limits.max_bytes, max_depth=4, max_container_len=limits.max_container_len,
                                 max_items=limits.max_items)
    return cbor_reader.loads(opened.section, section_limits, allowed_tags)


def _section_map(opened: Opened, limits: wire.Limits, fields: tuple[str, ...]) -> dict[str, Any]:
    value = _section(opened, limits)
    if not isinstance(value, dict) or set(value) != set(fields):
        raise ProtocolError("bad-section", f"the section must be a map of exactly {', '.join(fields)}")
    return value


def _pairs(value: Any, name: str, width: int) -> list[tuple[int, bytes]]:
    """[[index, bstr of ``width`` bytes], ...] in strictly increasing index order."""
    if not isinstance(value, list):
        raise ProtocolError("bad-section", f"{name!r} must be an array")
    out: list[tuple[int, bytes]] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], memoryview)):
            raise ProtocolError("bad-section", f"{name!r} holds [index, byte string] pairs")
        index = _uint({"index": item[0]}, "index")
        if len(item[1]) != width:
            raise ProtocolError("wrong-length", f"{name!r}: entry {index} is {len(item[1])} bytes, not {width}")
        if out and index <= out[-1][0]:
            raise ProtocolError("bad-section", f"{name!r} must be in increasing index order, once each")
        out.append((index, bytes(item[1])))
    return out


def accusations_of(payload: Mapping[str, Any]) -> tuple[Accusation, ...]:
    """The ``rejected`` field of a masked input's signed payload: ``[[dealer, K (bstr 32), c ‖ s (bstr 64)], ...]``
    in strictly increasing dealer order (``bad-section``, or ``wrong-length`` for a point or proof of another size).
    Whether K and the proof are right is for the aggregator to judge (secagg.judge), not for the decoder."""
    value = payload.get("rejected")
    if not isinstance(value, list):
        raise ProtocolError("bad-section", "'rejected' must be an array of [dealer, channel point, proof]")
    out: list[Accusation] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 3 and all(isinstance(v, memoryview) for v in item[1:])):
            raise ProtocolError("bad-section", "'rejected' holds [dealer, channel point, proof] entries")
        dealer = _uint({"dealer": item[0]}, "dealer")
        if len(item[1]) != shamir.POINT_BYTES or len(item[2]) != dleq.PROOF_BYTES:
            raise ProtocolError("wrong-length", f"'rejected': the evidence against {dealer} is a "
                                f"{shamir.POINT_BYTES}-byte point and a {dleq.PROOF_BYTES}-byte proof")
        if out and dealer <= out[-1].dealer:
            raise ProtocolError("bad-section", "'rejected' must be in increasing dealer order, once each")
        out.append(Accusation(dealer, bytes(item[1]), bytes(item[2])))
    return tuple(out)


def _indices(value: Any, name: str) -> list[int]:
    if not isinstance(value, list):
        raise ProtocolError("bad-section", f"{name!r} must be an array of indices")
    out = [_uint({"index": v}, "index") for v in value]
    if any(b <= a for a, b in itertools.pairwise(out)):
        raise ProtocolError("bad-section", f"{name!r} must be in increasing order, once each")
    return out


def _points(value: Any, name: str) -> tuple[bytes, ...]:
    if not isinstance(value, memoryview) or not value or len(value) % shamir.POINT_BYTES:
        raise ProtocolError("wrong-length", f"{name!r} must be a whole number of {shamir.POINT_BYTES}-byte points")
    raw = bytes(value)
    return tuple(raw[i : i + shamir.POINT_BYTES] for i in range(0, len(raw), shamir.POINT_BYTES))


def _canonical(value: Any) -> bytes:
    return cbor2.dumps(value, canonical=True)


# -------------------------------------------------------------------------------------------- advertise


@dataclass(frozen=True)
class Advertise:
    round_id: int
    device_id: str
    keys: Keys
    cipher_proof: bytes  # c || s: the sender knows log_G of keys.cipher (key_possession; DeviceRound.cipher_key_proof)


def encode_advertise(message: Advertise, key: SigningKey) -> bytes:
    payload = {"type": "secagg-advertise", "phase": "advertise", "round": message.round_id,
               "device": message.device_id, "cipher_key": message.keys.cipher, "mask_key": message.keys.mask,
               "cipher_proof": message.cipher_proof}
    return _seal(payload, None, key, message.device_id)


def decode_advertise(body: bytes | memoryview, key_for_kid: wire.KeyLookup) -> Advertise:
    """The advertisement, ``bad-key`` unless its proof shows that the sender knows its cipher secret (so its key
    cannot be tied to another device's, which an accusation against it would then open: key_possession)."""
    opened = open_message(body, key_for_kid, "secagg-advertise")
    p = opened.payload
    device = _device(opened)
    keys = Keys(_bstr(p, "cipher_key", 32), _bstr(p, "mask_key", 32))
    proof = _bstr(p, "cipher_proof", key_possession.PROOF_BYTES)
    if not key_possession.verify(p["round"], device, keys.cipher, proof):
        raise ProtocolError("bad-key", "'cipher_proof' does not show that this device knows its cipher key's secret "
                            "(or the cipher key is not a point of the prime-order Ed25519 group)")
    return Advertise(p["round"], device, keys, proof)


# ----------------------------------------------------------------------------------------------- roster


@dataclass(frozen=True)
class Roster:
    """The aggregator's answer to the advertise phase; :meth:`setup` is what every device computes with."""

    round_id: int
    device_ids: tuple[str, ...]
    keys: tuple[Keys, ...]
    neighbours: int
    threshold: int
    levels: int
    max_samples: int
    clip_norm: float
    deadline: int  # the share phase ends then (aggregator time, Unix seconds)
    noise_sigma: float = 0.0  # distributed DP: the discrete Gaussian each device adds; 0: none (field omitted)

    def section(self) -> bytes:
        return _canonical({"devices": [[d, k.cipher, k.mask] for d, k in zip(self.device_ids, self.keys,
                                                                               strict=True)]})

    def setup(self) -> RoundSetup:
        """The round's arithmetic; the graph seed is the SHA-256 of the roster section."""
        return RoundSetup(self.round_id, self.keys, self.neighbours, self.threshold, self.levels, self.max_samples,
                          self.clip_norm, graph_seed=hashlib.sha256(self.section()).digest(),
                          noise_sigma=self.noise_sigma)

    def index_of(self, device_id: str) -> int:
        try:
            return self.device_ids.index(device_id)
        except ValueError:
            raise ProtocolError("not-in-roster", f"device {device_id} is not in round {self.round_id}'s roster") \
                from None


def encode_roster(roster: Roster, key: SigningKey) -> bytes:
    payload = {"type": "secagg-roster", "phase": "share", "round": roster.round_id, "neighbours": roster.neighbours,
               "threshold": roster.threshold, "levels": roster.levels, "max_samples": roster.max_samples,
               "clip_norm": float(roster.clip_norm), "deadline": roster.deadline}
    if roster.noise_sigma:
        payload["noise_sigma"] = float(roster.noise_sigma)
    return _seal(payload, roster.section(), key, wire.key_id(key.verify_key))


def decode_roster(message: bytes | memoryview, aggregator_key: VerifyKey,
                  limits: wire.Limits = wire.DEFAULT_LIMITS) -> Roster:
    opened = open_message(message, wire.pinned(aggregator_key), "secagg-roster", limits)
    p = opened.payload
    entries = _section_map(opened, limits, ("devices",))["devices"]
    if not isinstance(entries, list):
        raise ProtocolError("bad-section", "'devices' must be an array")
    ids, keys = [], []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and all(isinstance(k, memoryview) and len(k) == 32 for k in entry[1:])):
            raise ProtocolError("bad-section", "a roster entry is [device id, 32-byte key, 32-byte key]")
        ids.append(entry[0])
        keys.append(Keys(bytes(entry[1]), bytes(entry[2])))
    if ids != sorted(set(ids)):
        raise ProtocolError("bad-section", "roster devices must be in increasing id order, once each")
    clip = p.get("clip_norm")
    if not isinstance(clip, float) or not math.isfinite(clip):
        raise ProtocolError("bad-payload", "field 'clip_norm' missing or not a finite float")
    sigma = p.get("noise_sigma", 0.0)
    if "noise_sigma" in p and not (isinstance(sigma, float) and math.isfinite(sigma) and sigma > 0):
        raise ProtocolError("bad-payload", "field 'noise_sigma' must be a finite float > 0 when present")
    roster = Roster(p["round"], tuple(ids), tuple(keys), _uint(p, "neighbours"), _uint(p, "threshold"),
                    _uint(p, "levels"), _uint(p, "max_samples"), clip, _uint(p, "deadline", wire.MAX_ID), sigma)
    try:
        roster.setup()
    except ValueError as exc:
        raise ProtocolError("bad-roster", str(exc)) from None
    return roster


# ----------------------------------------------------------------------------------------------- shares


@dataclass(frozen=True)
class Shares:
    round_id: int
    device_id: str
    dealing: Dealing


def encode_shares(message: Shares, key: SigningKey) -> bytes:
    d = message.dealing
    section = _canonical({
        "self_commitments": b"".join(d.self_commitments),
        "key_commitments": b"".join(d.key_commitments),
        "shares": [[r, d.ciphertexts[r]] for r in sorted(d.ciphertexts)],
    })
    payload = {"type": "secagg-shares", "phase": "share", "round": message.round_id, "device": message.device_id}
    return _seal(payload, section, key, message.device_id)


def decode_shares(body: bytes | memoryview, key_for_kid: wire.KeyLookup,
                  limits: wire.Limits = wire.DEFAULT_LIMITS) -> Shares:
    opened = open_message(body, key_for_kid, "secagg-shares", limits)
    section = _section_map(opened, limits, ("self_commitments", "key_commitments", "shares"))
    dealing = Dealing(
        _points(section["self_commitments"], "self_commitments"),
        _points(section["key_commitments"], "key_commitments"),
        dict(_pairs(section["shares"], "shares", SHARE_CIPHERTEXT_BYTES)),
    )
    return Shares(opened.payload["round"], _device(opened), dealing)


# ----------------------------------------------------------------------------------------------- routed


@dataclass(frozen=True)
class Routed:
    round_id: int
    device_id: str  # the recipient
    index: int  # its place in the roster
    shares: tuple[RoutedShare, ...]
    deadline: int  # masked inputs are due then


def encode_routed(message: Routed, key: SigningKey) -> bytes:
    section = _canonical({"dealings": [
        [s.dealer, b"".join(s.self_commitments), b"".join(s.key_commitments), s.ciphertext]
        for s in sorted(message.shares, key=lambda s: s.dealer)
    ]})
    payload = {"type": "secagg-routed", "phase": "masked", "round": message.round_id, "device": message.device_id,
               "index": message.index, "deadline": message.deadline}
    return _seal(payload, section, key, wire.key_id(key.verify_key))


def decode_routed(message: bytes | memoryview, aggregator_key: VerifyKey,
                  limits: wire.Limits = wire.DEFAULT_LIMITS) -> Routed:
    opened = open_message(message, wire.pinned(aggregator_key), "secagg-routed", limits)
    p = opened.payload
    device = p.get("device")
    if not isinstance(device, str):
        raise ProtocolError("bad-payload", "field 'device' missing or not text")
    entries = _section_map(opened, limits, ("dealings",))["dealings"]
    if not isinstance(entries, list):
        raise ProtocolError("bad-section", "'dealings' must be an array")
    shares = []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[3], memoryview)):
            raise ProtocolError("bad-section", "a dealing is [dealer, commitments, commitments, ciphertext]")
        dealer = _uint({"dealer": entry[0]}, "dealer")
        if shares and dealer <= shares[-1].dealer:
            raise ProtocolError("bad-section", "dealings must be in increasing dealer order, once each")
        shares.append(RoutedShare(dealer, _points(entry[1], "self_commitments"),
                                  _points(entry[2], "key_commitments"), bytes(entry[3])))
    return Routed(p["round"], device, _uint(p, "index"), tuple(shares), _uint(p, "deadline", wire.MAX_ID))


# ----------------------------------------------------------------------------------------------- masked


@dataclass(frozen=True)
class MaskedInput:
    round_id: int
    device_id: str
    words: np.ndarray  # P + 1 uint32
    rejected: tuple[Accusation, ...]  # the evidence against each rejected dealer, in increasing dealer order


def _masked_parts(words: np.ndarray) -> list[bytes | np.ndarray]:
    data = np.ascontiguousarray(words, dtype="<u4").view(np.uint8)
    return [b"\xd8\x46" + _bstr_head(data.size), data]


def masked_section_bytes(words: int) -> int:
    """The size of a masked input's section: the tag, the byte string's head and 4 bytes a word."""
    return 2 + len(_bstr_head(4 * words)) + 4 * words


def encode_masked(message: MaskedInput, key: SigningKey) -> bytes:
    parts = _masked_parts(message.words)
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    payload = {"v": wire.PROTOCOL_VERSION, "type": "secagg-masked", "phase": "masked", "round": message.round_id,
               "device": message.device_id, "words": int(message.words.size),
               "rejected": [[a.dealer, a.channel_point, a.proof] for a in message.rejected],
               "section_sha256": digest.digest()}
    return b"".join([wire.sign(payload, key, message.device_id), *parts])


def decode_masked(body: bytes | memoryview, key_for_kid: wire.KeyLookup, words: int | None = None,
                  limits: wire.Limits = wire.DEFAULT_LIMITS) -> MaskedInput:
    """Verify a masked input; with ``words`` (P + 1 of the round's model) its length must match (``wrong-length``),
    which is checked from the signed payload before the section is hashed."""
    opened = open_message(body, key_for_kid, "secagg-masked", limits)
    p = opened.payload
    declared = _uint(p, "words", limits.max_tensor_elements + 1)
    if words is not None and declared != words:
        raise ProtocolError("wrong-length", f"the masked input has {declared} words, the round needs {words}")
    rejected = accusations_of(p)
    item = _section(opened, limits, _MASKED_TAGS)
    if not (isinstance(item, cbor_reader.Tagged) and item.tag == TAG_UINT32_LE and isinstance(item.value, memoryview)):
        raise ProtocolError("bad-section", "the section must be a uint32 typed array (tag 70)")
    if len(item.value) != 4 * declared:
        raise ProtocolError("wrong-length", f"{len(item.value)} bytes do not hold {declared} words")
    if len(opened.section) != masked_section_bytes(declared):  # a longer head than the shortest
        raise ProtocolError("bad-section", "the words must be in deterministic encoding (the shortest head)")
    return MaskedInput(p["round"], _device(opened), np.frombuffer(item.value, dtype="<u4"), rejected)


# ----------------------------------------------------------------------------------------------- unmask


@dataclass(frozen=True)
class UnmaskRequest:
    round_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    deadline: int


def encode_unmask_request(message: UnmaskRequest, key: SigningKey) -> bytes:
    section = _canonical({"survivors": list(message.survivors), "dropped": list(message.dropped)})
    payload = {"type": "secagg-unmask-request", "phase": "unmask", "round": message.round_id,
               "deadline": message.deadline}
    return _seal(payload, section, key, wire.key_id(key.verify_key))


def decode_unmask_request(message: bytes | memoryview, aggregator_key: VerifyKey,
                          limits: wire.Limits = wire.DEFAULT_LIMITS) -> UnmaskRequest:
    opened = open_message(message, wire.pinned(aggregator_key), "secagg-unmask-request", limits)
    section = _section_map(opened, limits, ("survivors", "dropped"))
    return UnmaskRequest(opened.payload["round"], tuple(_indices(section["survivors"], "survivors")),
                         tuple(_indices(section["dropped"], "dropped")), _uint(opened.payload, "deadline", wire.MAX_ID))


@dataclass(frozen=True)
class Unmask:
    round_id: int
    device_id: str
    answer: Answer


def encode_unmask(message: Unmask, key: SigningKey) -> bytes:
    a = message.answer
    section = _canonical({
        "self_shares": [[u, shamir.scalar_bytes(s)] for u, s in sorted(a.self_shares.items())],
        "key_shares": [[u, shamir.scalar_bytes(s)] for u, s in sorted(a.key_shares.items())],
        "pair_seeds": [[u, seed] for u, seed in sorted(a.pair_seeds.items())],
    })
    payload = {"type": "secagg-unmask", "phase": "unmask", "round": message.round_id, "device": message.device_id}
    return _seal(payload, section, key, message.device_id)


def _scalars(pairs: Sequence[tuple[int, bytes]], name: str) -> dict[int, int]:
    try:
        return {u: shamir.scalar_from_bytes(s) for u, s in pairs}
    except ValueError:
        raise ProtocolError("bad-section", f"{name!r} holds a value that is not a scalar mod L") from None


def decode_unmask(body: bytes | memoryview, key_for_kid: wire.KeyLookup,
                  limits: wire.Limits = wire.DEFAULT_LIMITS) -> Unmask:
    opened = open_message(body, key_for_kid, "secagg-unmask", limits)
    section = _section_map(opened, limits, ("self_shares", "key_shares", "pair_seeds"))
    answer = Answer(
        _scalars(_pairs(section["self_shares"], "self_shares", shamir.SCALAR_BYTES), "self_shares"),
        _scalars(_pairs(section["key_shares"], "key_shares", shamir.SCALAR_BYTES), "key_shares"),
        dict(_pairs(section["pair_seeds"], "pair_seeds", 32)),
    )
    return Unmask(opened.payload["round"], _device(opened), answer)


def message_type(body: bytes | memoryview, key_for_kid: wire.KeyLookup, limits: wire.Limits) -> str:
    """The signed ``type`` of a message (its signature checked): how one upload route tells an Update from a
    masked input before reading the rest."""
    kind = wire.verify(body, key_for_kid, limits).payload.get("type")
    return kind if isinstance(kind, str) else ""

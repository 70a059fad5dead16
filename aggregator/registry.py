"""Enrolled devices: who may sign updates, and who no longer may.

Lookups read SQLite on every call (a primary-key read, ~10 µs), so an ``fl-aggregator enroll`` or ``revoke``
run from another process takes effect on the running server at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_core_ed25519_is_valid_point
from nacl.signing import VerifyKey

from aggregator.store import Store, StoreError
from appliance.errors import ProtocolError
from appliance.wire import key_id


class EnrolmentError(Exception):
    """An enrolment request is invalid; the message names the device or line at fault."""


@dataclass(frozen=True)
class Enrolment:
    device_id: str
    public_key: bytes
    name: str = ""
    site: bool = False  # a site aggregator (its updates carry its devices' summed samples)


def parse_public_key(text: str) -> VerifyKey:
    """A 64-hex-character Ed25519 public key.

    Any 32 bytes make a ``VerifyKey``, but only a canonical encoding of a point in the prime-order subgroup is a
    key some device holds the secret of: libsodium's check refuses the rest (bytes off the curve, and the
    small-order points such as all zeros, whose "signatures" prove nothing)."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raise EnrolmentError(f"public key {text!r} is not hex") from None
    if len(raw) != 32:
        raise EnrolmentError(f"public key {text!r} has {len(raw)} bytes, expected 32 (64 hex characters)")
    if not crypto_core_ed25519_is_valid_point(raw):
        raise EnrolmentError(f"public key {text!r} is not an Ed25519 public key (not a point of the curve's "
                             "prime-order subgroup)")
    return VerifyKey(raw)


def enrolment_for_key(text: str, name: str = "", site: bool = False) -> Enrolment:
    key = parse_public_key(text)
    return Enrolment(device_id=key_id(key), public_key=bytes(key), name=name, site=site)


def read_enrolment_file(path: Path) -> list[Enrolment]:
    """JSON lines ``{"device_id", "public_key", "name"}`` as written by ``flctl provision``.

    The device id must be the one derived from the key: a mismatch means the file was edited or corrupted. A
    ``device_id`` or ``name`` that is missing or null is absent (the name is then empty); a name that is not a
    string is refused, not enrolled as its text ("None", "42").
    """
    out = []
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise EnrolmentError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise EnrolmentError(f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise EnrolmentError(f"{where}: not JSON: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("public_key"), str):
            raise EnrolmentError(f"{where}: expected an object with a \"public_key\" hex string")
        name = record.get("name")  # null, as a null device_id, is absent: the board enrolled without a name
        if name is not None and not isinstance(name, str):
            raise EnrolmentError(f"{where}: \"name\" must be a string (the board name) or null, got {name!r}")
        try:
            enrolment = enrolment_for_key(record["public_key"], name or "")
        except EnrolmentError as exc:
            raise EnrolmentError(f"{where}: {exc}") from None
        claimed = record.get("device_id")
        if claimed is not None and claimed != enrolment.device_id:
            raise EnrolmentError(
                f"{where}: device_id {claimed!r} does not match its public key (which gives {enrolment.device_id})"
            )
        out.append(enrolment)
    return out


class Registry:
    """Device keys, backed by the store."""

    def __init__(self, store: Store):
        self.store = store

    def enroll(self, enrolments: Iterable[Enrolment]) -> list[tuple[Enrolment, bool]]:
        """Enrol each device; returns (enrolment, newly added). Stops at the first conflict."""
        results = []
        for e in enrolments:
            try:
                results.append((e, self.store.enroll(e.device_id, e.public_key, e.name, e.site)))
            except StoreError as exc:
                raise EnrolmentError(str(exc)) from None
        return results

    def revoke(self, device_id: str) -> bool:
        try:
            return self.store.revoke(device_id)
        except StoreError as exc:
            raise EnrolmentError(str(exc)) from None

    def key_for(self, kid: str) -> VerifyKey | None:
        """The key lookup given to ``wire.verify``: None for unknown ids; revoked ids raise ``revoked``."""
        device = self.store.device(kid)
        if device is None:
            return None
        if device.revoked_at is not None:
            raise ProtocolError("revoked", f"device {kid} was revoked")
        return VerifyKey(device.public_key)

    def signer_key(self, kid: str) -> VerifyKey | None:
        """The key of an enrolled device, revoked or not: enough to know who is uploading. (Whether it may
        upload is :meth:`key_for`'s answer, given later: a revoked device still gets the receipts of what was
        acknowledged before its revocation.)"""
        device = self.store.device(kid)
        return None if device is None else VerifyKey(device.public_key)

    def is_site(self, kid: str) -> bool:
        """Whether ``kid`` was enrolled as a site aggregator (``fl-aggregator enroll --site``)."""
        return self.store.is_site(kid)

    def active_count(self) -> int:
        return self.store.active_device_count()

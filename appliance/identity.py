"""Device identity: the Ed25519 key on the data partition and the pinned aggregator key.

Key files hold 64 lowercase hex characters and a newline (the 32-byte seed, or the 32-byte public key).
The device id is derived from the public key, so it cannot be claimed without the key.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey, VerifyKey

from appliance.durable import fsync_dir
from appliance.wire import key_id

IDENTITY_DIR = "identity"
DEVICE_KEY_FILE = "device.key"
AGGREGATOR_KEY_FILE = "aggregator.pub"


class IdentityError(Exception):
    """A key file is missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class DeviceIdentity:
    signing_key: SigningKey

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing_key.verify_key

    @property
    def device_id(self) -> str:
        return device_id_for(self.verify_key)

    @property
    def public_key_hex(self) -> str:
        return bytes(self.verify_key).hex()


def device_id_for(key: VerifyKey) -> str:
    """First 16 bytes of SHA-256 of the raw public key, as 32 lowercase hex characters."""
    return key_id(key)


def write_key_file(path: Path, raw: bytes, mode: int) -> None:
    """Write ``raw`` as hex atomically (temp file, fsync, rename, fsync dir) with ``mode`` from the start."""
    _publish_key_file(path, raw, mode, exclusive=False)


def _publish_key_file(path: Path, raw: bytes, mode: int, *, exclusive: bool) -> bool:
    """Write a complete temp file, then move it into place. With ``exclusive`` an existing file wins (the
    temp file is hard-linked, which fails if ``path`` exists) and False is returned; otherwise it is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.write(fd, raw.hex().encode() + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    finally:
        if fd >= 0:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)  # gone already after a rename; the spare name after a link


def read_key_file(path: Path) -> bytes:
    """The 32 raw bytes of a hex key file; errors name the file and what is wrong with it."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise IdentityError(f"{path}: key file not found") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read key file: {exc.strerror}") from None
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise IdentityError(f"{path}: not hex") from None
    if len(raw) != 32:
        raise IdentityError(f"{path}: expected 32 bytes (64 hex characters), found {len(raw)}")
    return raw


def device_key_path(state_dir: Path) -> Path:
    return Path(state_dir) / IDENTITY_DIR / DEVICE_KEY_FILE


def aggregator_key_path(state_dir: Path) -> Path:
    return Path(state_dir) / IDENTITY_DIR / AGGREGATOR_KEY_FILE


def write_device_key(state_dir: Path, signing_key: SigningKey) -> Path:
    path = device_key_path(state_dir)
    write_key_file(path, bytes(signing_key), 0o600)
    return path


def write_aggregator_key(state_dir: Path, verify_key: VerifyKey) -> Path:
    path = aggregator_key_path(state_dir)
    write_key_file(path, bytes(verify_key), 0o644)
    return path


def load_device_key(state_dir: Path) -> DeviceIdentity:
    path = device_key_path(state_dir)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0
    if mode & 0o077:
        raise IdentityError(f"{path}: device key is readable by others (mode {mode:o}); expected 600")
    return DeviceIdentity(SigningKey(read_key_file(path)))


def load_or_create_device_key(state_dir: Path) -> DeviceIdentity:
    """Load the device key, creating it on first boot. Creation is atomic: a power cut leaves no half key,
    and when two processes create it at once, the first to publish wins and both load that one."""
    path = device_key_path(state_dir)
    if not path.exists():
        _publish_key_file(path, bytes(SigningKey.generate()), 0o600, exclusive=True)
    return load_device_key(state_dir)


def load_aggregator_key(state_dir: Path) -> VerifyKey:
    return VerifyKey(read_key_file(aggregator_key_path(state_dir)))

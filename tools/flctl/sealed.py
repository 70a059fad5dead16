"""Secret keys at rest on the provisioning host: encrypted with a key derived from the fleet passphrase.

A sealed file is one JSON object (documented in docs/provisioning.md):
  {"format": "flctl-sealed/1", "kdf": "argon2id13", "opslimit": N, "memlimit": N, "salt": HEX,
   "box": HEX}
`box` is a NaCl SecretBox (XSalsa20-Poly1305) of the 32-byte secret: 24-byte nonce, then the ciphertext
with its 16-byte tag. The box key is argon2id(passphrase, salt, opslimit, memlimit). A fleet uses one salt
so the (deliberately slow) derivation runs once per command, not once per board; every box has its own
random nonce.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from appliance.durable import atomic_write

FORMAT = "flctl-sealed/1"
KDF = "argon2id13"
PASSPHRASE_ENV = "FLCTL_PASSPHRASE"
KDF_LEVEL_ENV = "FLCTL_KDF_LEVEL"
_LEVELS = {
    "interactive": (nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE, nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE),
    "moderate": (nacl.pwhash.argon2id.OPSLIMIT_MODERATE, nacl.pwhash.argon2id.MEMLIMIT_MODERATE),
    "sensitive": (nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE, nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE),
}


class SealError(Exception):
    """A sealed file cannot be opened (wrong passphrase, damaged or foreign file); the message says which."""


@dataclass(frozen=True)
class KdfParams:
    salt: bytes
    opslimit: int
    memlimit: int

    @classmethod
    def new(cls, level: str | None = None) -> KdfParams:
        level = level or os.environ.get(KDF_LEVEL_ENV) or "moderate"
        if level not in _LEVELS:
            raise SealError(f"{KDF_LEVEL_ENV}={level!r}: expected one of {', '.join(_LEVELS)}")
        ops, mem = _LEVELS[level]
        return cls(nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES), ops, mem)

    def to_json(self) -> dict[str, object]:
        return {"kdf": KDF, "opslimit": self.opslimit, "memlimit": self.memlimit, "salt": self.salt.hex()}

    @classmethod
    def from_json(cls, obj: dict[str, object], where: str) -> KdfParams:
        try:
            if obj["kdf"] != KDF:
                raise SealError(f"{where}: key derivation {obj['kdf']!r} not supported (expected {KDF})")
            return cls(bytes.fromhex(str(obj["salt"])), int(obj["opslimit"]), int(obj["memlimit"]))  # type: ignore[call-overload]
        except (KeyError, ValueError, TypeError) as exc:
            raise SealError(f"{where}: bad key derivation parameters ({exc})") from None


class Sealer:
    """Seals and opens 32-byte secrets with one passphrase; derives the box key once per KdfParams."""

    def __init__(self, passphrase: bytes) -> None:
        if not passphrase:
            raise SealError("the passphrase is empty")
        self._passphrase = passphrase
        self._boxes: dict[KdfParams, nacl.secret.SecretBox] = {}

    def _box(self, params: KdfParams) -> nacl.secret.SecretBox:
        if params not in self._boxes:
            key = nacl.pwhash.argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, self._passphrase, params.salt,
                                           opslimit=params.opslimit, memlimit=params.memlimit)
            self._boxes[params] = nacl.secret.SecretBox(key)
        return self._boxes[params]

    def seal(self, secret: bytes, params: KdfParams, path: Path) -> None:
        """Write `secret` sealed to `path` (mode 0600, written to a temp file then renamed)."""
        box = bytes(self._box(params).encrypt(secret))
        obj = {"format": FORMAT, **params.to_json(), "box": box.hex()}
        atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode(), 0o600)

    def open(self, path: Path) -> bytes:
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise SealError(f"{path}: sealed key not found") from None
        except (OSError, ValueError) as exc:
            raise SealError(f"{path}: not a sealed key file ({exc})") from None
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise SealError(f"{path}: not a {FORMAT} file")
        params = KdfParams.from_json(obj, str(path))
        try:
            return self._box(params).decrypt(bytes.fromhex(obj["box"]))
        except nacl.exceptions.CryptoError:
            raise SealError(f"{path}: wrong passphrase (or the file was altered)") from None
        except (KeyError, ValueError, TypeError):
            raise SealError(f"{path}: damaged sealed key (bad 'box')") from None


def read_passphrase(passphrase_file: str | None, confirm: bool) -> bytes:
    """The fleet passphrase: --passphrase-file, else $FLCTL_PASSPHRASE, else asked on the terminal."""
    if passphrase_file:
        try:
            text = Path(passphrase_file).read_bytes()
        except OSError as exc:
            raise SealError(f"cannot read passphrase file {passphrase_file}: {exc.strerror}") from None
        value = text.rstrip(b"\r\n")
    elif os.environ.get(PASSPHRASE_ENV):
        value = os.environ[PASSPHRASE_ENV].encode()
    elif sys.stdin.isatty():
        value = getpass.getpass("Fleet passphrase: ").encode()
        if confirm and getpass.getpass("Repeat the passphrase: ").encode() != value:
            raise SealError("the two passphrases differ")
    else:
        raise SealError(f"no passphrase: pass --passphrase-file FILE or set {PASSPHRASE_ENV}")
    if not value:
        raise SealError("the passphrase is empty")
    return value

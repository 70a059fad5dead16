"""The model release the agent holds, kept on the data partition so that a restart starts from it.

After a reboot, a power cut or an OOM kill the agent still holds its last model version: the next model it fetches
comes as the signed steps from it (docs/protocol.md section 6.5) instead of the whole float32 model, and its
heartbeat names it at once. One file, ``<state>/model-release.cose``, replaced atomically only when a new version
replaces the held one (SD cards wear).

The file holds what the aggregator signed, so that loading it is verifying it, with the pinned key, against the
package the agent holds:

- a release downloaded in full is stored as it came: its ModelRelease (``COSE_Sign1 || float32 section``, 6.3);
- a release rebuilt from a ModelDelta is not itself a signed object: the aggregator signed the delta, whose payload
  names the version, the package and the rebuilt model's digest (``model_digest``). It is stored as that signed
  envelope (without its steps) followed by the float32 section of the rebuilt parameters; at load the section's
  SHA-256 must be the signed ``model_digest``, as it had to be when the steps were applied.

A file that is missing, cut short, corrupted, signed by another key, for a package this device does not hold (or
whose tensors do not fit it) is ignored with one log line and removed: the agent downloads in full, as on its first
start.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import VerifyKey

from appliance import wire
from appliance.durable import atomic_write
from appliance.modelpkg import ModelPackage, load_package
from appliance.protocol.downlink import MESSAGE_TYPE as DELTA_TYPE
from appliance.storage_errors import storage_reason

log = logging.getLogger("fl_agent")

RELEASE_FILE = "model-release.cose"


@dataclass(frozen=True)
class HeldRelease:
    """A stored release that verified, and the package it was checked against."""

    release: wire.ModelRelease
    package: ModelPackage


def signed_form(answer: bytes | memoryview, release: wire.ModelRelease, aggregator_key: VerifyKey) -> list:
    """What to store for ``release``, which ``answer`` (a ``GET /v1/models`` body, already verified and decoded
    into ``release``) brought: the answer itself when it is a ModelRelease; the ModelDelta's signed envelope and
    the rebuilt parameters' float32 section when it is a delta. Pieces to write one after the other: the
    parameters are not copied."""
    verified = wire.verify(answer, wire.pinned(aggregator_key))
    if verified.payload.get("type") != DELTA_TYPE:
        return [answer]
    envelope = memoryview(answer)[: len(answer) - len(verified.rest)]
    return [envelope, *wire.parameters_section_parts(release.tensors)]


def store_release(state_dir: Path, answer: bytes | memoryview, release: wire.ModelRelease,
                  aggregator_key: VerifyKey) -> str | None:
    """Replace the stored release with ``release`` (see :func:`signed_form`). A failed write is logged, not raised:
    the agent goes on with the release in memory, and an older stored one still verifies as a base. Returns the
    storage reason (appliance/storage_errors.py) when the data partition refused the write, for the agent to count;
    None when it was stored, or failed otherwise."""
    try:
        atomic_write(state_dir / RELEASE_FILE, signed_form(answer, release, aggregator_key))
    except OSError as exc:
        log.warning("model version %d not stored in %s: %s; going on with it in memory", release.version,
                    state_dir / RELEASE_FILE, exc.strerror or exc)
        return storage_reason(exc)
    return None


def _as_release_payload(verified: wire.Verified) -> wire.Verified:
    """A stored delta envelope read as the release it led to: its signed ``model_digest`` is the digest of the
    float32 section stored after it (a delta's own ``section_sha256`` names steps that are not stored)."""
    payload = verified.payload
    if payload.get("type") != DELTA_TYPE:
        return verified
    if "model_digest" not in payload:
        raise wire.ProtocolError("bad-payload", "field 'model_digest' missing")
    as_release = {**payload, "type": "model", "tensors_sha256": payload["model_digest"]}
    return wire.Verified(verified.kid, as_release, verified.rest, verified.digest)


def _read(path: Path, aggregator_key: VerifyKey, models_dir: Path) -> HeldRelease:
    # Bounded before it is read: a file grown past any model answer would otherwise be read whole at every start.
    size = path.stat().st_size
    if size > wire.DEFAULT_LIMITS.max_bytes:
        raise wire.ProtocolError("too-large", f"{size} bytes exceeds the {wire.DEFAULT_LIMITS.max_bytes} a model "
                                              "answer may have")
    data = path.read_bytes()
    verified = _as_release_payload(wire.verify(data, wire.pinned(aggregator_key)))
    package_digest = verified.payload.get("package_digest")
    if not isinstance(package_digest, memoryview) or len(package_digest) != 32:
        raise wire.ProtocolError("bad-payload", "field 'package_digest' missing or not a 32-byte digest")
    package_path = models_dir / f"{bytes(package_digest).hex()}.flpkg"
    if not package_path.exists():
        raise wire.ProtocolError("wrong-model", f"its package {bytes(package_digest).hex()[:16]}... is not on "
                                                "this device")
    package = load_package(package_path, aggregator_key)
    if package.digest != package_digest:
        raise wire.ProtocolError("wrong-model", f"{package_path} holds package {package.digest.hex()[:16]}...")
    return HeldRelease(wire.release_from(verified, package.param_specs), package)


def load_release(state_dir: Path, aggregator_key: VerifyKey, models_dir: Path) -> HeldRelease | None:
    """The stored release, verified against the pinned key and the package in ``models_dir`` it names; None (with
    one log line saying why, and the file removed) when there is none that verifies."""
    path = state_dir / RELEASE_FILE
    if not path.exists():
        log.info("no model release stored in %s: the first model is downloaded in full", path)
        return None
    try:
        held = _read(path, aggregator_key, models_dir)
    except Exception as exc:  # whatever is wrong with the file, the agent starts without it, as on first boot
        reason, detail = getattr(exc, "reason", type(exc).__name__), getattr(exc, "detail", str(exc))
        log.warning("stored model release %s ignored and removed (%s: %s); the next model is downloaded in full",
                    path, reason, detail)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    log.info("holding model version %d from %s", held.release.version, path)
    return held

"""Model packages and published model versions.

A model package (appliance/modelpkg.py) is served byte for byte to the devices, which verify it themselves;
the aggregator only needs its digest, parameter specs and initial parameters. A *model version* is a full set
of parameters, published as a signed ModelRelease: version 0 is the package's initial parameters, version
v+1 is what the round that trained on version v produced.

Parameters travel inside the aggregator as one flat float32 vector in the order of the package's parameter
specs (:class:`Layout`), which is also the layout of every spooled update.

With a compressed downlink (``serve --downlink float16|int8|sparse``, appliance/protocol/downlink.py) each
version is published rounded to one step from the version before, and that step is kept beside the release
(``v<version>.step``) for the last :data:`KEEP_STEPS` versions, so a device that holds one of them fetches the
steps instead of the full model.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from appliance import wire
from appliance.durable import atomic_write
from appliance.protocol import downlink
from appliance.wire import ParamSpec

log = logging.getLogger(__name__)

# Steps kept: a device at most this many versions behind gets a delta (when it is smaller than the full model).
KEEP_STEPS = 16
# Signed delta messages kept in memory, most recently asked first: most devices ask for the same one or two.
CACHED_DELTAS = 8
# Why a device that names the model it holds gets the full model instead of a delta (ModelStore.delta), counted in
# fl_aggregator_model_downloads_total{answer="full_<reason>"}: the aggregator publishes full models only
# (serve --downlink full); the base is more than KEEP_STEPS versions behind; the device's base digest is not the one
# the first step starts from; the steps kept do not lead from the base to the version (one was published in full
# only, or before the compressed downlink was turned on); the steps together are not smaller than the model.
NO_DELTA_REASONS = ("downlink_off", "base_too_old", "base_unknown", "steps_missing", "delta_not_smaller")
_DIGEST = 32


class PackageInfo(Protocol):
    """What the aggregator reads from a model package (``appliance.modelpkg.ModelPackage`` has it all)."""

    name: str
    digest: bytes
    param_specs: list[ParamSpec]
    initial_params: dict[str, np.ndarray]


@dataclass(frozen=True)
class ServedPackage:
    """A package together with the exact file bytes served at ``GET /v1/package``."""

    info: PackageInfo
    raw: bytes


class PackageError(Exception):
    """The model package could not be loaded; the message names the file and the problem."""


def load_package_file(path: Path, aggregator_key: VerifyKey) -> ServedPackage:
    """Read a signed model package once, verify it with ``appliance.modelpkg``, and keep the exact bytes that
    were verified for serving (so the file changing on disk later cannot change what devices get)."""
    from appliance import modelpkg

    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise PackageError(f"{path}: cannot read model package: {exc.strerror}") from None
    try:
        info = modelpkg.decode_package(raw, aggregator_key, origin=str(path))
    except modelpkg.PackageError as exc:
        raise PackageError(f"{exc.detail} [{exc.reason}]") from None
    return ServedPackage(info=info, raw=raw)


class Layout:
    """Maps named parameter tensors to slices of one flat float32 vector."""

    def __init__(self, specs: list[ParamSpec]):
        if not specs:
            raise ValueError("a model needs at least one parameter tensor")
        self.specs = list(specs)
        self.offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for spec in self.specs:
            self.offsets[spec.name] = (offset, offset + spec.size)
            offset += spec.size
        self.size = offset

    def flatten(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """One new contiguous float32 vector holding ``tensors`` in spec order."""
        flat = np.empty(self.size, dtype=np.float32)
        for spec in self.specs:
            start, stop = self.offsets[spec.name]
            flat[start:stop] = np.asarray(tensors[spec.name], dtype=np.float32).reshape(-1)
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of ``flat`` shaped like the specs (no copy)."""
        return {spec.name: flat[slice(*self.offsets[spec.name])].reshape(spec.shape) for spec in self.specs}


class ModelStore:
    """Published model versions on disk: ``models/v<version>.release`` holds the signed ModelRelease bytes and,
    with a compressed downlink, ``models/v<version>.step`` the step from the version before (SHA-256 of that
    version's parameters, then of this one's, then the step section)."""

    def __init__(self, directory: Path, package: ServedPackage, key: SigningKey, downlink_encoding: str = "full"):
        if downlink_encoding not in downlink.DOWNLINK_ENCODINGS:
            raise ValueError(f"unknown downlink {downlink_encoding!r}; expected one of "
                             f"{', '.join(downlink.DOWNLINK_ENCODINGS)}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.package = package
        self.layout = Layout(package.info.param_specs)
        self.downlink = downlink_encoding
        self._key = key
        self._latest: tuple[int, bytes] | None = None
        self._published: tuple[int, np.ndarray, bytes] | None = None  # the last version written: params, digest
        self._deltas: OrderedDict[tuple[int, bytes, int], bytes] = OrderedDict()
        self._deltas_lock = threading.Lock()  # delta_bytes runs on several worker threads

    @property
    def package_digest(self) -> bytes:
        return self.package.info.digest

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:08d}.release"

    def step_path(self, version: int) -> Path:
        return self.directory / f"v{version:08d}.step"

    def write(
        self, version: int, params: np.ndarray, created_at: int, privacy: dict[str, float | int] | None = None
    ) -> bytes:
        """Sign and durably write version ``version``; returns its digest (SHA-256 of the tensor section).

        Writing is idempotent: re-closing a round after a crash rewrites the same file. ``privacy`` is the
        differential privacy spent up to this version (signed into the release), None without DP.

        With a compressed downlink the version published is ``params`` rounded to one step from version - 1
        (when that version is here); ``params`` itself is left as it is, and the round engine keeps training
        from it, so the rounding of this step is carried into the next one instead of being lost.
        """
        published, step = params, None
        base = self._base(version - 1) if self.downlink != "full" and version > 0 else None
        if base is not None:
            base_params, base_digest = base
            try:
                step, tensors = downlink.publish_step(
                    self.layout.unflatten(base_params), self.layout.unflatten(params), self.layout.specs,
                    self.downlink,
                )
                published = self.layout.flatten(tensors)
            except downlink.StepUnrepresentable as exc:
                log.warning("model version %d is published in full only (no %s step): %s", version, self.downlink,
                            exc)
                step = None
        release = wire.ModelRelease(
            version=version,
            package_digest=self.package_digest,
            tensors=self.layout.unflatten(published),
            created_at=created_at,
            privacy=privacy,
        )
        message, digest = wire.encode_model_release(release, self._key)
        if step is not None:
            atomic_write(self.step_path(version), base_digest + digest + step)
        else:
            self.step_path(version).unlink(missing_ok=True)
        atomic_write(self.path(version), message)
        self._drop_old_steps(version)
        self._latest = None
        self._published = (version, published, digest)
        with self._deltas_lock:
            self._deltas.clear()
        return digest

    def _base(self, version: int) -> tuple[np.ndarray, bytes] | None:
        """(parameters, digest) of a published ``version``, or None when it is not here."""
        if self._published is not None and self._published[0] == version:
            return self._published[1], self._published[2]
        data = self.release_bytes(version)
        if data is None:
            return None
        release = self._decode(data)
        return self.layout.flatten(release.tensors), release.digest

    def _drop_old_steps(self, newest: int) -> None:
        for path in self.directory.glob("v*.step"):
            if path.stem[1:].isdigit() and int(path.stem[1:]) <= newest - KEEP_STEPS:
                path.unlink(missing_ok=True)

    def drop_releases_before(self, oldest_kept: int) -> int:
        """Delete the release of every version below ``oldest_kept``; returns how many went. ``GET /v1/models/{v}``
        answers such a version 404 ``unknown-version`` (no longer stored). Its step stays (the last KEEP_STEPS are
        kept): a device that holds it still gets the steps from it to a version that is kept."""
        dropped = 0
        for path in self.directory.glob("v*.release"):
            if path.stem[1:].isdigit() and int(path.stem[1:]) < oldest_kept:
                path.unlink(missing_ok=True)
                dropped += 1
        if self._latest is not None and self._latest[0] < oldest_kept:
            self._latest = None
        with self._deltas_lock:
            for key in [key for key in self._deltas if key[2] < oldest_kept]:
                del self._deltas[key]
        return dropped

    def delta_bytes(self, base_version: int, base_digest: bytes, version: int) -> bytes | None:
        """A signed model-delta from ``base_version`` (whose digest the device says is ``base_digest``) to
        ``version``, or None when the steps are not all here, do not start from that digest, or together are
        not smaller than the full release: then the device gets the full model."""
        return self.delta(base_version, base_digest, version)[0]

    def delta(self, base_version: int, base_digest: bytes, version: int) -> tuple[bytes | None, str]:
        """(the signed model-delta of :meth:`delta_bytes`, "") or (None, why there is none: one of
        NO_DELTA_REASONS). Without the release of ``version`` there is no delta either (``steps_missing``); the
        caller finds that release missing too."""
        if not 1 <= version - base_version <= KEEP_STEPS:
            return self._no_delta("base_too_old")
        key = (base_version, base_digest, version)
        with self._deltas_lock:
            if key in self._deltas:
                self._deltas.move_to_end(key)
                return self._deltas[key], ""
        release = self.release_bytes(version)
        if release is None:
            return self._no_delta("steps_missing")
        steps, digest = [], base_digest
        for step_version in range(base_version + 1, version + 1):
            try:
                data = self.step_path(step_version).read_bytes()
            except FileNotFoundError:
                return self._no_delta("steps_missing")
            if data[:_DIGEST] != digest:
                return self._no_delta("base_unknown" if step_version == base_version + 1 else "steps_missing")
            digest = data[_DIGEST : 2 * _DIGEST]
            steps.append(data[2 * _DIGEST :])
        payload = wire.verify(release, wire.pinned(self._key.verify_key)).payload
        if bytes(payload["tensors_sha256"]) != digest:
            return self._no_delta("steps_missing")
        if sum(map(len, steps)) >= len(release):
            return self._no_delta("delta_not_smaller")
        message = downlink.encode_model_delta(
            version=version, base_version=base_version, base_digest=base_digest, model_digest=digest,
            package_digest=self.package_digest, created_at=payload["created_at"], steps=steps, key=self._key,
        )
        if len(message) >= len(release):
            return self._no_delta("delta_not_smaller")
        with self._deltas_lock:
            self._deltas[key] = message
            while len(self._deltas) > CACHED_DELTAS:
                self._deltas.popitem(last=False)
        return message, ""

    def _no_delta(self, reason: str) -> tuple[None, str]:
        """Publishing full models only (steps left from an earlier compressed run may still serve a delta) is the
        reason whatever else is missing."""
        return None, "downlink_off" if self.downlink == "full" else reason

    def release_bytes(self, version: int) -> bytes | None:
        """The signed release message of ``version``, or None when it was never written."""
        if self._latest is not None and self._latest[0] == version:
            return self._latest[1]
        try:
            data = self.path(version).read_bytes()
        except FileNotFoundError:
            return None
        self._latest = (version, data)
        return data

    def params(self, version: int) -> np.ndarray:
        """The parameters of ``version`` as a new flat float32 vector (verified against our own key)."""
        data = self.release_bytes(version)
        if data is None:
            raise FileNotFoundError(self.path(version))
        return self.layout.flatten(self._decode(data).tensors)

    def _decode(self, data: bytes) -> wire.ModelRelease:
        limits = wire.Limits(max_bytes=len(data) + 1, max_tensor_elements=self.layout.size)
        return wire.decode_model_release(data, self._key.verify_key, self.layout.specs, limits)

    def initial_params(self) -> np.ndarray:
        return self.layout.flatten(self.package.info.initial_params)



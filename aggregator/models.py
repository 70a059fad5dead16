"""Model packages and published model versions.

A model package (appliance/modelpkg.py) is served byte for byte to the devices, which verify it themselves;
the aggregator only needs its digest, parameter specs and initial parameters. A *model version* is a full set
of parameters, published as a signed ModelRelease: version 0 is the package's initial parameters, version
v+1 is what the round that trained on version v produced.

Parameters travel inside the aggregator as one flat float32 vector in the order of the package's parameter
specs (:class:`Layout`), which is also the layout of every spooled update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from nacl.signing import SigningKey, VerifyKey

from appliance import wire
from appliance.durable import atomic_write
from appliance.wire import ParamSpec


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
    """Published model versions on disk: ``models/v<version>.release`` holds the signed ModelRelease bytes."""

    def __init__(self, directory: Path, package: ServedPackage, key: SigningKey):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.package = package
        self.layout = Layout(package.info.param_specs)
        self._key = key
        self._latest: tuple[int, bytes] | None = None

    @property
    def package_digest(self) -> bytes:
        return self.package.info.digest

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:08d}.release"

    def write(
        self, version: int, params: np.ndarray, created_at: int, privacy: dict[str, float | int] | None = None
    ) -> bytes:
        """Sign and durably write version ``version``; returns its digest (SHA-256 of the tensor section).

        Writing is idempotent: re-closing a round after a crash rewrites the same file. ``privacy`` is the
        differential privacy spent up to this version (signed into the release), None without DP.
        """
        release = wire.ModelRelease(
            version=version,
            package_digest=self.package_digest,
            tensors=self.layout.unflatten(params),
            created_at=created_at,
            privacy=privacy,
        )
        message, digest = wire.encode_model_release(release, self._key)
        atomic_write(self.path(version), message)
        self._latest = None
        return digest

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
        release = wire.decode_model_release(
            data,
            self._key.verify_key,
            self.layout.specs,
            wire.Limits(max_bytes=len(data) + 1, max_tensor_elements=self.layout.size),
        )
        return self.layout.flatten(release.tensors)

    def initial_params(self) -> np.ndarray:
        return self.layout.flatten(self.package.info.initial_params)



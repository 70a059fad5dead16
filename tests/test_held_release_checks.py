"""A stored model release is held only for the package it was signed for and only when its tensors fit that package
(appliance/held_release.py): else it is ignored and removed, and the next model comes in full."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nacl.signing import SigningKey

from appliance import modelpkg, wire
from appliance.held_release import RELEASE_FILE, load_release, store_release
from tests.agent_harness import small_package

KEY = SigningKey(b"\x09" * 32)
SPECS = [wire.ParamSpec("w", (4, 3)), wire.ParamSpec("b", (3,))]


def _package(models: Path, specs: list[wire.ParamSpec], seed: int) -> modelpkg.ModelPackage:
    """A package written where the agent keeps it, under its digest."""
    models.mkdir(parents=True, exist_ok=True)
    written = small_package(models / "new.flpkg", KEY, specs, seed=seed, name=f"package-{seed}")
    package = modelpkg.load_package(written, KEY.verify_key)
    written.rename(models / f"{package.digest.hex()}.flpkg")
    return package


def _store(state: Path, package: modelpkg.ModelPackage, tensors: dict[str, np.ndarray]) -> None:
    release = wire.ModelRelease(version=3, package_digest=package.digest, tensors=tensors)
    message, _ = wire.encode_model_release(release, KEY)
    assert store_release(state, message, wire.decode_model_release(message, KEY.verify_key), KEY.verify_key) is None


def _tensors(specs: list[wire.ParamSpec]) -> dict[str, np.ndarray]:
    return {s.name: np.ones(s.shape, dtype=np.float32) for s in specs}


def test_a_release_stored_for_its_package_is_held(tmp_path: Path) -> None:
    package = _package(tmp_path / "models", SPECS, seed=1)
    _store(tmp_path, package, _tensors(SPECS))
    held = load_release(tmp_path, KEY.verify_key, tmp_path / "models")
    assert held is not None and held.release.version == 3 and held.package.digest == package.digest


def test_a_release_whose_tensors_do_not_fit_its_package_is_removed(tmp_path: Path) -> None:
    package = _package(tmp_path / "models", SPECS, seed=1)
    _store(tmp_path, package, _tensors([wire.ParamSpec("w", (3, 4)), wire.ParamSpec("b", (3,))]))
    assert load_release(tmp_path, KEY.verify_key, tmp_path / "models") is None
    assert not (tmp_path / RELEASE_FILE).exists()


def test_a_release_whose_package_file_holds_another_package_is_removed(tmp_path: Path) -> None:
    """The file named after the release's package holds another one (copied over it, say): not a base to build on."""
    models = tmp_path / "models"
    package = _package(models, SPECS, seed=1)
    other = _package(models, SPECS, seed=2)
    _store(tmp_path, package, _tensors(SPECS))
    (models / f"{other.digest.hex()}.flpkg").replace(models / f"{package.digest.hex()}.flpkg")
    assert load_release(tmp_path, KEY.verify_key, models) is None
    assert not (tmp_path / RELEASE_FILE).exists()

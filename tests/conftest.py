"""Fixtures shared by the host-side test modules (the QEMU ones have tests/qemu/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flash_images import env_for_tests, make_fleet


@pytest.fixture
def flctl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fleet passphrase from the environment and the quick argon2id level, as a CI job would set them."""
    env_for_tests(monkeypatch)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A provisioned fleet (cam-1, cam-2, cam-3), made once per module: argon2id sealing is slow on purpose."""
    mp = pytest.MonkeyPatch()
    env_for_tests(mp)
    try:
        yield make_fleet(tmp_path_factory.mktemp("fleet"))
    finally:
        mp.undo()

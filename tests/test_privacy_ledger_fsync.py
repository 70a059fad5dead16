"""What the privacy ledger counts is on disk before the call that counts it returns: the syncs, recorded on the host.

tests/test_privacy_crash.py kills the aggregator (SIGKILL keeps the page cache, so it cannot tell a write that was
synced from one that was not). Here the file and directory syncs are recorded in order: a round counted, or a
pending model forgotten, must be durable before the aggregator goes on (publishes, or opens the next round), or a
power cut would bring back a ledger that counts fewer rounds than the models already published.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from aggregator.privacy import LEDGER_FILE, PENDING_FILE, DPConfig, PendingRelease, PrivacyLedger

DELTA = 1e-5


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(call, path) in the order they happen: fsync, replace (a rename over a name), unlink."""
    log: list[tuple[str, str]] = []
    real_fsync, real_replace, real_unlink = os.fsync, os.replace, os.unlink

    def fsync(fd: int) -> None:
        log.append(("fsync", _path_of(fd)))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs) -> None:
        real_replace(src, dst, *args, **kwargs)
        log.append(("replace", str(dst)))

    def unlink(path, *args, **kwargs) -> None:
        real_unlink(path, *args, **kwargs)
        log.append(("unlink", str(path)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    return log


def _synced_into_place(calls: list[tuple[str, str]], path: Path) -> bool:
    """Whether ``path`` was written whole under a temp name (fsynced), renamed into place, and its directory
    fsynced after the rename."""
    if ("replace", str(path)) not in calls:
        return False
    at = calls.index(("replace", str(path)))
    temp_synced = any(call == "fsync" and Path(p).name.startswith(f".{path.name}.") for call, p in calls[:at])
    return temp_synced and ("fsync", str(path.parent)) in calls[at + 1 :]


def _release(round_id: int) -> PendingRelease:
    return PendingRelease(round_id=round_id, version=round_id, closed_at=1.0, participants=3, samples=30, note="",
                          params=np.zeros(4, dtype=np.float32), strategy_state={})


def test_a_counted_round_is_synced_into_the_ledger_before_it_returns(tmp_path: Path, calls) -> None:
    ledger = PrivacyLedger(tmp_path, DPConfig(1.0, DELTA, mode="central"))
    ledger.record_round()
    assert _synced_into_place(calls, tmp_path / LEDGER_FILE), calls


def test_a_noised_model_is_synced_with_its_count_before_the_ledger_itself(tmp_path: Path, calls) -> None:
    """The pending model and the ledger that counts its round are one file, in place before privacy.json."""
    ledger = PrivacyLedger(tmp_path, DPConfig(1.0, DELTA, mode="central"))
    ledger.record_round(release=_release(1))
    assert _synced_into_place(calls, tmp_path / PENDING_FILE), calls
    assert _synced_into_place(calls, tmp_path / LEDGER_FILE), calls
    pending, ledger_file = (calls.index(("replace", str(tmp_path / name))) for name in (PENDING_FILE, LEDGER_FILE))
    assert pending < ledger_file


def test_a_published_model_is_forgotten_durably(tmp_path: Path, calls) -> None:
    """Once its version is published the pending model is removed, and the removal synced: after a power cut a
    pending file coming back would be published a second time."""
    ledger = PrivacyLedger(tmp_path, DPConfig(1.0, DELTA, mode="central"))
    ledger.record_round(release=_release(1))
    calls.clear()
    ledger.published()
    pending = str(tmp_path / PENDING_FILE)
    assert calls[:2] == [("unlink", pending), ("fsync", str(tmp_path))], calls
    assert ledger.pending is None and not (tmp_path / PENDING_FILE).exists()

"""A state directory from before rounds could be ``superseded`` opens, keeps its rounds, and takes the new status."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import numpy as np

from aggregator.store import SCHEMA, SpoolJob, SpoolRecovery, Store


def test_an_old_state_directory_keeps_its_rounds_and_can_record_a_superseded_one(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / "aggregator.db")
    old.executescript(SCHEMA.replace(", 'superseded'", ""))
    old.execute("INSERT INTO rounds (round_id, model_version, status, opened_at, deadline, goal, closed_at, note) "
                "VALUES (1, 0, 'abandoned', 1.0, 2.0, 2, 2.0, 'below the quorum')")
    old.commit()
    old.close()
    store = Store(tmp_path)
    try:
        assert store.get_round(1).status == "abandoned" and store.get_round(1).note == "below the quorum"
        store.insert_round(2, 0, 3.0, 4.0, 2)
        store.finish_round(2, "superseded", 4.0, 0, 0, {}, note="no updates when upstream version 1 came")
        assert [r.status for r in store.recent_rounds()] == ["superseded", "abandoned"]
    finally:
        store.close()


def _old_state_with_one_open_update(state: Path, schema: str) -> None:
    """A state directory an older aggregator left, its database made by ``schema``: round 1 open with one
    acknowledged update (device ``old``, 100 floats of 0.5) spooled at the start of its segment."""
    old = sqlite3.connect(state / "aggregator.db")
    old.executescript(schema)
    old.execute("INSERT INTO rounds (round_id, model_version, status, opened_at, deadline, goal) "
                "VALUES (1, 0, 'open', 1.0, 2.0, 2)")
    old.execute("INSERT INTO updates (digest, device_id, round_id, num_samples, metrics, offset, length, receipt, "
                "accepted_at) VALUES (?, 'old', 1, 3, '{}', 0, 400, x'00', 1.0)", (b"\x01" * 32,))
    old.commit()
    old.close()
    (state / "spool").mkdir()
    (state / "spool" / "round-00000001.seg").write_bytes(np.full(100, 0.5, np.float32).tobytes() + bytes(3696))


def test_an_old_state_directorys_updates_resume_unchecked_and_new_ones_get_a_check(tmp_path: Path) -> None:
    """Rows written before spooled records had checks have none to compare with: their round resumes with them as
    before (a changed record there goes unnoticed, as it did), and updates spooled from then on carry a check."""
    schema = SCHEMA.replace("    check_kind  TEXT NOT NULL DEFAULT '',\n    check_value BLOB,\n", "")
    assert "check_kind" not in schema
    _old_state_with_one_open_update(tmp_path, schema)
    store = Store(tmp_path)
    try:
        assert store.recover_segment(1) == SpoolRecovery(cut_bytes=0, lost=[], cause="")
        assert [(u.device_id, u.check) for u in store.round_updates(1)] == [("old", None)]
        store.start_writer()
        job = SpoolJob(digest=b"\x02" * 32, device_id="new", round_id=1, num_samples=1, metrics={},
                       delta=np.full(100, 0.25, np.float32), receipt=b"r", accepted_at=2.0)
        asyncio.run(store.spool(job))
        assert [u.check.kind if u.check else None for u in store.round_updates(1)] == [None, "crc32"]
    finally:
        store.close()


def test_an_upgrade_stopped_between_adding_the_check_columns_opens_the_next_time(tmp_path: Path) -> None:
    """The two columns used to be added by two statements, each committed on its own: an aggregator stopped between
    them (a power cut at its first start after the upgrade) left ``check_kind`` without ``check_value``, and every
    later start skipped the migration and then failed to read its open round's updates."""
    _old_state_with_one_open_update(tmp_path, SCHEMA.replace("    check_value BLOB,\n", ""))
    store = Store(tmp_path)
    try:
        assert store.recover_segment(1) == SpoolRecovery(cut_bytes=0, lost=[], cause="")
        assert [(u.device_id, u.check) for u in store.round_updates(1)] == [("old", None)]
    finally:
        store.close()

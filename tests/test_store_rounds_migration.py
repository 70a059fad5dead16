"""A state directory from before rounds could be ``superseded`` opens, keeps its rounds, and takes the new status."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from aggregator.store import SCHEMA, Store


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

"""A model version's write killed midway leaves a temp file of a model's size in ``<state>/models``: the next start
of the aggregator removes it (one log line), and leaves the temp file of a write still under way in another process
(an ``fl-aggregator`` command on the same state) alone."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from interrupted_writes import HALF, killed_write, live_write
from nacl.signing import SigningKey

from tests.aggregator_harness import run, running


def test_the_next_start_removes_what_a_killed_write_left_and_keeps_a_live_writers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path, key=key) as h:
            assert await h.task() is not None
        models = tmp_path / "models"
        left = killed_write(models / "v00000001.release") + killed_write(tmp_path / "privacy-ledger.json")
        assert len(left) == 2
        with live_write(models / "v00000007.strategy.npz") as writer:
            (live,) = writer.temp_files()
            with caplog.at_level(logging.WARNING, logger="aggregator.app"):
                async with running(tmp_path, key=key) as h:
                    assert await h.task() is not None
            assert not any(path.exists() for path in left)
            assert live.exists()
            writer.finish()
        assert (models / "v00000007.strategy.npz").stat().st_size == 2 * HALF
        swept = [r.getMessage() for r in caplog.records if "temp file" in r.getMessage()]
        assert len(swept) == 1 and "removed 2 temp files (2.1 MB)" in swept[0], swept

    run(go())

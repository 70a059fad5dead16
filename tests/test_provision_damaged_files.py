"""A fleet directory whose ``fleet.json`` or a ``board.json`` is damaged (empty or cut short: a copy made by hand,
a file system that ignores fsync; flctl itself replaces them atomically) stops ``flctl provision`` in one line
naming the file, rather than a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flash_images import cli

pytestmark = pytest.mark.usefixtures("flctl_env")

DAMAGE = {"empty": "", "cut-short": '{"name": "cam-2", "device_id": "3f', "not-a-record": '{"name": "cam-2"}',
          "not-an-object": "[]"}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
@pytest.mark.parametrize("which", ["fleet.json", "boards/cam-2/board.json"])
def test_a_damaged_fleet_file_is_named_in_one_line(
    fleet: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], which: str, damage: str
) -> None:
    copy = tmp_path / "fleet"
    shutil.copytree(fleet, copy)
    (copy / which).write_text(DAMAGE[damage])
    capsys.readouterr()
    assert cli(["provision", "--fleet", str(copy), "--names", "cam-4"]) != 0
    err = capsys.readouterr().err.strip()
    assert str(copy / which) in err and "Traceback" not in err
    assert len(err.splitlines()) == 1

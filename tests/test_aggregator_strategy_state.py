"""The strategy's state beside each model version (``models/v<N>.strategy.npz``: FedAdam's and FedYogi's moments)
survives a power cut, and a damaged one stops the start in one line naming it.

The version's row is committed right after the state file is renamed into place; the rename must be durable by
then (the directory fsynced), or a power cut brings back a recorded version without its state, and the server
goes on with the moments silently started again from zero. The calls are recorded on the host, as in
tests/test_aggregator_fsync.py.
"""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from nacl.signing import SigningKey

from aggregator.rounds import load_strategy_state, save_strategy_state


def test_the_state_is_fsynced_and_renamed_into_place_and_the_rename_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs) -> None:
        real_replace(src, dst, *args, **kwargs)
        calls.append(("renamed", f"{src} -> {dst}"))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "v00000001.strategy.npz"
    save_strategy_state(path, {"fedadam/m": np.ones(4, np.float32), "fedadam/v": np.zeros(4, np.float32)})
    assert [call for call, _ in calls] == ["fsync", "renamed", "fsync"]
    temp = calls[0][1]
    assert Path(temp).parent == tmp_path and temp != str(path)
    assert calls[1] == ("renamed", f"{temp} -> {path}")
    assert calls[2] == ("fsync", str(tmp_path)), "the state's rename was not made durable"
    with np.load(path) as saved:
        np.testing.assert_array_equal(saved["fedadam/m"], np.ones(4, np.float32))


@pytest.mark.parametrize("damage", ["empty", "cut-short"])
def test_a_damaged_state_stops_the_start_in_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    key = SigningKey.generate()

    async def go() -> None:
        async with running(tmp_path, devices=2, key=key, strategy="fedadam") as h:
            devices = h.devices
            await one_round(h)
        (state,) = tmp_path.rglob("v00000001.strategy.npz")
        data = state.read_bytes()
        state.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(RuntimeError) as refused:
                async with running(tmp_path, key=key, enrolled=devices, strategy="fedadam"):
                    pass
            message = str(refused.value)
            del refused  # its traceback holds the refused start's frames, and with them what it left open
            gc.collect()
        assert str(state) in message and "damaged" in message and "\n" not in message
        # Nothing left open by the refused start: neither the state's file nor the harness's client session.
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]

    run(go())


async def one_round(h: Harness) -> None:
    task = await h.task()
    for device in h.devices:
        assert (await h.upload(device.update(task, h.delta())))[0] == 200
    assert await h.task(after=task.round_id, wait=10) is not None



@pytest.mark.parametrize("damage", ["empty", "cut"])
def test_a_damaged_state_is_read_with_its_file_closed(tmp_path: Path, damage: str) -> None:
    """np.load, given a path, left its own file for the garbage collector to close when the archive was cut short
    (ResourceWarning: unclosed file): the reader now opens and closes it itself."""
    path = tmp_path / "v00000001.strategy.npz"
    save_strategy_state(path, {"m": np.ones(1000, dtype=np.float32)})
    data = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="damaged"):
            load_strategy_state(path)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]

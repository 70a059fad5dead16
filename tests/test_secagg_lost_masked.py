"""A masked input acknowledged and counted as a survivor in the stored unmask request, whose spooled record the disk
then lost or changed (aggregator/store.py recover_segment; a changed record fails the SHA-256 its device signed over
its words): after the restart the sum of the other inputs cannot be unmasked
(the survivors' pairwise masks with it do not cancel, and asking for its key shares now would hand out both of its
secrets), so the round is abandoned saying so; it is neither published nor blamed on a device."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from secagg_harness import AggregatorProcess, process_deltas, until_masked

from appliance import wire


def _last_record(state: Path, round_id: int) -> tuple[str, int]:
    with sqlite3.connect(state / "aggregator.db") as db:
        device, offset = db.execute(
            "SELECT device_id, offset FROM updates WHERE round_id=? ORDER BY offset DESC LIMIT 1", (round_id,)
        ).fetchone()
        assert {kind for (kind,) in db.execute("SELECT check_kind FROM updates")} == {"masked-sha256"}
    return device, offset


def _cut_short(segment: Path, offset: int) -> None:
    with segment.open("r+b") as fh:
        fh.truncate(offset + 100)


def _one_byte_changed(segment: Path, offset: int) -> None:
    with segment.open("r+b") as fh:
        fh.seek(offset + 101)
        byte = fh.read(1)[0]
        fh.seek(offset + 101)
        fh.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize(("damage", "cause"), [(_cut_short, "segment-short"), (_one_byte_changed, "record-corrupt")])
def test_a_survivors_masked_input_lost_from_the_spool_abandons_the_round_with_the_reason(
    tmp_path: Path, damage: Callable[[Path, int], None], cause: str
) -> None:
    agg = AggregatorProcess(tmp_path, round_timeout=120)
    deltas, samples = process_deltas(3), [20, 40, 60]

    async def go() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as session:
            task, rounds = await agg.first_round(session)
            await until_masked(rounds)
            for r, d, n in zip(rounds, deltas, samples, strict=True):
                async with session.post(agg.url + "/v1/updates", data=r.masked_input(d, n),
                                        headers={"Content-Type": wire.CONTENT_TYPE}) as response:
                    assert response.status == 200, await response.text()
            await rounds[0].unmask()  # the unmask request (every input a survivor) is stored and answered once
            agg.kill()
            lost, offset = _last_record(agg.state, task.round_id)  # the disk loses the last acknowledged record
            damage(agg.state / "spool" / f"round-{task.round_id:08d}.seg", offset)
            agg.start()
            await agg.healthy(session)
            await asyncio.gather(*(r.unmask() for r in rounds[1:]), return_exceptions=True)
            code, body = await agg.get(session, "/v1/task", after=str(task.round_id), wait="60")
            assert code == 200 and wire.decode_task(body, agg.key).model_version == 0
            record = next(r for r in (await agg.status(session))["rounds"] if r["round"] == task.round_id)
            assert record["status"] == "abandoned", record
            assert "did not follow the protocol" not in record["note"], record["note"]
            assert lost in record["note"] and "spool" in record["note"], record["note"]
            assert (await agg.get(session, "/v1/models/1"))[0] == 404
            metrics = (await agg.get(session, "/metrics"))[1].decode()
            assert 'fl_aggregator_secagg_abandoned_total{reason="spool-lost"} 1.0' in metrics
            assert f'fl_aggregator_spool_lost_updates_total{{cause="{cause}"}} 1.0' in metrics
            assert 'fl_aggregator_secagg_abandoned_total{reason="sum-out-of-bounds"} 0.0' in metrics

    try:
        asyncio.run(go())
    finally:
        agg.stop()

"""A secure round's masked input that arrived but is not in the sum (its device dealt a neighbour bad shares) is not
listed among the round's devices: /v1/status, the paged device lists, the status page and ``fl-aggregator status``
list it as left out of the sum, with the reason, and the round's devices are the ones its sum covers. (A masked
input stored after the masked phase ended, on a stalled disk, is listed the same way: test_secagg_stalled_store.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aggregator_harness import run
from secagg_harness import flat_delta, secure_rounds, secure_running, transport

from aggregator import cli
from appliance.protocol import messages as m
from tests.secagg_sim import _off_polynomial


def test_a_masked_input_left_out_of_the_sum_is_listed_as_left_out_not_among_the_devices(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def go() -> str:
        async with secure_running(tmp_path, devices=4) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await asyncio.gather(*(r.advertise() for r in rounds))
            await asyncio.gather(*(r.join() for r in rounds))
            cheat, victim = rounds[0], rounds[1]
            setup = cheat.roster.setup()
            dealing = cheat.device.deal(setup, cheat.index)
            devices = [None] * setup.size
            for r in rounds:
                devices[r.index] = r.device
            dealing.ciphertexts[victim.index] = _off_polynomial(setup, devices, cheat.index, victim.index,
                                                                dealing.ciphertexts[victim.index])
            await transport(h).post("shares", m.encode_shares(m.Shares(task.round_id, cheat.device_id, dealing),
                                                                 h.devices[0].key))
            await asyncio.gather(*(r.share() for r in rounds[1:]))
            await asyncio.gather(*(r.receive() for r in rounds))
            for r in rounds:
                assert (await h.upload(r.masked_input(flat_delta(h), 50)))[0] == 200
            await asyncio.gather(*(r.unmask() for r in rounds))
            assert await h.task(after=task.round_id, wait=30) is not None

            rounds_status = (await (await h.client.get("/v1/status")).json())["rounds"]
            record = next(r for r in rounds_status if r["round"] == task.round_id)
            honest = sorted(r.device_id for r in rounds[1:])
            assert record["status"] == "published" and record["secure"]["sum_devices"] == 3
            assert sorted(record["devices"]) == honest and record["devices_total"] == 3
            assert (record["left_out_devices"], record["left_out_devices_total"]) == ([cheat.device_id], 1)
            assert record["secure"]["left_out"] == {"bad-shares": 1}
            assert (record["lost_devices"], record["lost_devices_total"]) == ([], 0)

            listed = await (await h.client.get(f"/v1/status/rounds/{task.round_id}/devices")).json()
            assert sorted(listed["devices"]) == honest and listed["total"] == 3
            left_out = await (await h.client.get(f"/v1/status/rounds/{task.round_id}/left_out_devices")).json()
            assert (left_out["left_out_devices"], left_out["total"]) == ([cheat.device_id], 1)

            page = await (await h.client.get("/")).text()
            assert "1 masked input left out of the sum (1 dealt bad shares)" in page
            assert f'title="{cheat.device_id}"' in page

            url = str(h.client.server.make_url("")).rstrip("/")
            assert await asyncio.to_thread(cli.main, ["status", "--url", url]) == 0
            text = capsys.readouterr().out
            assert f"1 masked input left out of the sum (1 bad-shares): {cheat.device_id}" in text
            return cheat.device_id

    cheat = run(go())
    assert cli.main(["status", "--state", str(tmp_path)]) == 0  # read from the state: the same line
    assert f"1 masked input left out of the sum (1 bad-shares): {cheat}" in capsys.readouterr().out

"""What the privacy audit found and pinned down: a distributed-DP sum the aggregator unmasked counts in epsilon
even when the round is then abandoned (the aggregator is who the devices' noise protects them from), and the
epsilons docs/privacy.md quotes are the ones the ledger reports for the same settings."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from aggregator_harness import run
from dp_accounting import rdp
from nacl.signing import SigningKey
from secagg_harness import CLIP, secure_rounds, secure_running, until_masked

from aggregator.privacy import DPConfig, epsilon
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from appliance.protocol import messages as m

DOC = Path(__file__).resolve().parent.parent / "docs" / "privacy.md"


def _dp_accounting(noise_multipliers: list[float], delta: float) -> float:
    accountant = rdp.RdpAccountant()
    for z in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


def test_a_noised_sum_unmasked_and_then_abandoned_counts_in_epsilon_and_after_a_restart(tmp_path: Path) -> None:
    """Three honest devices and one that writes its own weight word: the aggregator unmasks the noised sum, finds
    it outside the honest bounds and publishes nothing. It has seen that sum all the same, so epsilon is that of
    one round at the survivors' noise multiplier, in the status and the metric, and still after a restart (which
    the start-up check, versions against noised rounds, lets through)."""
    z, delta, n = 1.0, 1e-5, 4
    key, sims = SigningKey.generate(), [SimulatedDevice() for _ in range(n)]
    policy = RoundPolicy(min_clients=2, goal_clients=n, round_timeout=20)
    privacy = DPConfig(z, delta, mode="distributed")
    expected = _dp_accounting([z], delta)  # all 4 summed: the roster's noise multiplier exactly

    async def go() -> None:
        async with secure_running(tmp_path, devices=n, policy=policy, privacy=privacy, key=key, enrolled=sims) as h:
            task = await h.task(wait=30)
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            assert rounds[0].roster.noise_sigma > 0
            rng = np.random.default_rng(5)
            for r in rounds[:3]:
                delta_ = rng.normal(size=h.engine.models.layout.size).astype(np.float32)
                delta_ *= 0.5 * CLIP / np.linalg.norm(delta_)
                assert (await h.upload(r.masked_input(delta_, 1)))[0] == 200
            cheat = rounds[3]
            words = cheat.device.mask(np.zeros(h.engine.models.layout.size, np.float32), 1).copy()
            words[-1] += np.uint32(1)  # weight 2 where distributed DP gives every device weight 1
            device_key = next(d.key for d in h.devices if d.device_id == cheat.device_id)
            body = m.encode_masked(m.MaskedInput(task.round_id, cheat.device_id, words, tuple(cheat.rejected)),
                                   device_key)
            assert (await h.upload(body))[0] == 200
            await asyncio.gather(*(r.unmask() for r in rounds))
            assert await h.task(after=task.round_id, wait=30) is not None
            status = await (await h.client.get("/v1/status")).json()
            record = status["rounds"][-1]
            assert record["status"] == "abandoned" and "did not follow the protocol" in record["note"]
            assert "counts in epsilon" in record["note"], record["note"]
            assert h.engine.version == 0
            assert status["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)
            metrics = await (await h.client.get("/metrics")).text()
            gauge = re.search(r"^fl_aggregator_dp_epsilon (\S+)$", metrics, re.MULTILINE)
            assert gauge is not None and float(gauge.group(1)) == pytest.approx(expected, rel=1e-9)
        async with secure_running(tmp_path, devices=n, policy=policy, privacy=privacy, key=key, enrolled=sims) as h:
            status = await (await h.client.get("/v1/status")).json()
            assert status["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9)

    run(go())


def test_a_sum_unmasked_and_abandoned_that_spends_the_budget_stops_the_rounds(tmp_path: Path) -> None:
    """The budget holds one round at z but not two: an out-of-bounds sum the aggregator unmasked spends it, so no
    next round opens (its devices would train and share for a sum the budget forbids unmasking)."""
    z, delta, n = 1.0, 1e-5, 4
    budget = (_dp_accounting([z], delta) + _dp_accounting([z, z], delta)) / 2
    privacy = DPConfig(z, delta, epsilon_budget=budget, mode="distributed")
    policy = RoundPolicy(min_clients=2, goal_clients=n, round_timeout=20)

    async def go() -> None:
        async with secure_running(tmp_path, devices=n, policy=policy, privacy=privacy) as h:
            task = await h.task(wait=30)
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            for r in rounds[:3]:
                assert (await h.upload(r.masked_input(np.zeros(h.engine.models.layout.size, np.float32), 1)))[0] == 200
            cheat = rounds[3]
            words = cheat.device.mask(np.zeros(h.engine.models.layout.size, np.float32), 1).copy()
            words[-1] += np.uint32(1)
            device_key = next(d.key for d in h.devices if d.device_id == cheat.device_id)
            body = m.encode_masked(m.MaskedInput(task.round_id, cheat.device_id, words, tuple(cheat.rejected)),
                                   device_key)
            assert (await h.upload(body))[0] == 200
            await asyncio.gather(*(r.unmask() for r in rounds))
            for _ in range(300):
                status = await (await h.client.get("/v1/status")).json()
                current = status["current_round"]  # the engine lets the round go just after its end is recorded
                if ((status["rounds"][-1]["status"] != "open" or len(status["rounds"]) > 1)
                        and (current is None or current["round"] != task.round_id)):
                    break
                await asyncio.sleep(0.1)
            assert [r["status"] for r in status["rounds"]] == ["abandoned"], status["rounds"]
            assert status["privacy"]["exhausted"] and status["current_round"] is None
            assert status["privacy"]["epsilon"] == pytest.approx(_dp_accounting([z], delta), rel=1e-9)

    run(go())


def _table(heading: str) -> list[list[str]]:
    """The rows of the first Markdown table after ``heading`` in docs/privacy.md, header row first."""
    text = DOC.read_text()
    start = text.index(heading)
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not set("".join(cells)) <= set("-: "):
            rows.append(cells)
    return rows


def test_the_docs_epsilon_table_is_what_the_ledger_reports() -> None:
    """Each cell of "Choosing the noise": the epsilon the ledger reports for z and that many rounds, and the one
    for neighbours that swap a device's data (sensitivity 2 S: the epsilon of z / 2)."""
    header, *rows = _table("### Choosing the noise")
    assert rows, "the table is gone"
    columns = [(re.fullmatch(r"(\d+) rounds( \(swap\))?", cell), cell) for cell in header[1:]]
    assert all(match for match, _ in columns), header
    for row in rows:
        z = float(row[0])
        for (match, cell), quoted in zip(columns, row[1:], strict=True):
            rounds, swap = int(match.group(1)), match.group(2) is not None
            reported = epsilon([z / 2 if swap else z] * rounds, 1e-5)
            assert float(quoted) == pytest.approx(reported, abs=0.005), f"z = {z}, {cell}"
            assert reported == pytest.approx(_dp_accounting([z / 2 if swap else z] * rounds, 1e-5), rel=1e-12)


@pytest.mark.parametrize(("z", "rounds", "quoted"), [(2.86, 20, 7.972), (6.68, 20, 2.999), (18.1, 20, 0.999),
                                                     (0.1, 10, 655), (0.1, 4, 295), (2.02, 10, 7.98)])
def test_the_epsilons_the_docs_quote_for_measured_runs(z: float, rounds: int, quoted: float) -> None:
    assert epsilon([z] * rounds, 1e-5) == pytest.approx(quoted, rel=1e-3)


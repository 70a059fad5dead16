"""Distributed DP survives a crash around the unmask: the aggregator writes in the privacy ledger that it is about
to see a round's noised sum *before* it unmasks it, so a crash at any step after that can only over-count, never
under-count, and the round's publication or abandonment then settles that entry once.

A child process runs a real aggregator (tests/secagg_harness.py) with ``--secure-aggregation --dp distributed``;
four devices take part in round 1 (in the ``cheat`` runs one of them writes its own weight word, so the unmasked
sum falls outside the honest bounds and the round is abandoned as ``sum-out-of-bounds``), and the process dies
(``os._exit``, as kill -9 or a power cut would stop it, with everything it fsynced on disk) at one step after the
unmask. The test restarts the aggregator on that state: the round is counted exactly once, in the status, the
metric and ``privacy.json``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from aggregator_harness import Harness, run
from dp_accounting import rdp
from nacl.signing import SigningKey
from secagg_harness import secure_running

from aggregator.privacy import DPConfig
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice

pytestmark = pytest.mark.slow  # seven child aggregators and their restarts: about 45 s

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DEVICES, Z, DELTA = 4, 1.0, 1e-5
CRASHED = 86  # the child's exit status when it died at the crash point

CHILD = """
import asyncio, json, os, sys
from pathlib import Path
import numpy as np
from nacl.signing import SigningKey
sys.path.insert(0, {tests!r})
from secagg_harness import CLIP, secure_rounds, secure_running, until_masked
from aggregator import secagg_round
from aggregator.privacy import DPConfig
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store
from appliance.protocol import messages as m

state, crash_at, cheat = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "cheat"
config = json.loads(sys.argv[4])

def crash():
    os._exit({crashed})

real_ask = secagg_round.SecureRounds._ask
async def ask(self, sr):  # every masked input is in; the unmask request is not made yet
    if crash_at == "asking":
        crash()
    await real_ask(self, sr)
secagg_round.SecureRounds._ask = ask
real_collect = secagg_round.SecureRounds._collect_answers
async def collect_answers(self, sr):  # every device's unmask answer is in the database; the masks are still on
    await real_collect(self, sr)
    if crash_at == "answered":
        crash()
secagg_round.SecureRounds._collect_answers = collect_answers
real_unmask_total = secagg_round.unmask_total
def unmask_total(*args, **kwargs):  # the masks come off: the aggregator holds the noised sum
    report = real_unmask_total(*args, **kwargs)
    if crash_at == "unmasked":
        crash()
    return report
secagg_round.unmask_total = unmask_total
real_fail = secagg_round.SecureRounds._fail
def fail(self, sr, exc):  # the round's outcome (sum-out-of-bounds) in the database
    real_fail(self, sr, exc)
    if crash_at == "outcome":
        crash()
secagg_round.SecureRounds._fail = fail
real_finish = Store.finish_round
def finish_round(self, *args, **kwargs):  # the transaction that ends round 1 and opens round 2
    real_finish(self, *args, **kwargs)
    if crash_at == "finished":
        crash()
Store.finish_round = finish_round

async def go():
    key = SigningKey(bytes.fromhex(config["key"]))
    sims = [SimulatedDevice(SigningKey(bytes.fromhex(seed))) for seed in config["devices"]]
    policy = RoundPolicy(min_clients=2, goal_clients=len(sims), round_timeout=30)
    privacy = DPConfig(config["z"], config["delta"], mode="distributed")
    async with secure_running(state, devices=len(sims), policy=policy, privacy=privacy, key=key,
                              enrolled=sims) as h:
        task = await h.task(wait=30)
        rounds = secure_rounds(h, task)
        await until_masked(rounds)
        rng = np.random.default_rng(5)
        for r in rounds[:3] if cheat else rounds:
            delta = rng.normal(size=h.engine.models.layout.size).astype(np.float32)
            delta *= 0.5 * CLIP / np.linalg.norm(delta)
            assert (await h.upload(r.masked_input(delta, 1)))[0] == 200
        if cheat:
            r = rounds[3]
            words = r.device.mask(np.zeros(h.engine.models.layout.size, np.float32), 1).copy()
            words[-1] += np.uint32(1)  # weight 2 where distributed DP gives every device weight 1
            device_key = next(d.key for d in h.devices if d.device_id == r.device_id)
            body = m.encode_masked(m.MaskedInput(task.round_id, r.device_id, words, tuple(r.rejected)), device_key)
            assert (await h.upload(body))[0] == 200
        await asyncio.gather(*(r.unmask() for r in rounds))
        await asyncio.sleep(60)  # the round closes at its goal and the crash ends this process
    sys.exit("round 1 ended without reaching the crash point")

asyncio.run(go())
"""


def _epsilon_of_one_round() -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(Z))  # all four summed: the roster's noise multiplier exactly
    return accountant.get_epsilon(DELTA)


def _crashed(tmp_path: Path, crash_at: str, devices: str) -> tuple[Path, SigningKey, list[SimulatedDevice]]:
    """Round 1 in a child aggregator that dies at ``crash_at``: its state, key and devices."""
    state = tmp_path / "state"
    key, sims = SigningKey.generate(), [SimulatedDevice() for _ in range(DEVICES)]
    config = {"key": bytes(key).hex(), "devices": [bytes(d.key).hex() for d in sims], "z": Z, "delta": DELTA}
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS), crashed=CRASHED), str(state), crash_at, devices,
         json.dumps(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == CRASHED, child.stderr[-3000:]
    return state, key, sims


async def _round_one_ended(h: Harness) -> dict[str, Any]:
    """The status once round 1 has ended (the restart closes it at once: its answers are all in) and the engine
    has let it go: its end is committed on the records thread, and the engine steps on (clears or opens its next
    round) when it is back on the event loop, so a status served in between shows the recorded end with round 1
    still current."""
    for _ in range(300):
        status = await (await h.client.get("/v1/status")).json()
        current = status["current_round"]
        if (any(r["round"] == 1 and r["status"] != "open" for r in status["rounds"])
                and (current is None or current["round"] != 1)):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError("round 1 did not end after the restart")


POLICY = RoundPolicy(min_clients=2, goal_clients=DEVICES, round_timeout=30)


# Each step after the unmask, in order: the masks are off (the aggregator holds the sum); an out-of-bounds sum's
# outcome is in the database; the round's end is recorded (and round 2 opened).
@pytest.mark.parametrize(("crash_at", "devices"), [
    ("unmasked", "honest"), ("unmasked", "cheat"), ("outcome", "cheat"), ("finished", "cheat"),
])
def test_a_crash_after_the_unmask_counts_the_round_once_on_restart(tmp_path: Path, crash_at: str,
                                                                    devices: str) -> None:
    state, key, sims = _crashed(tmp_path, crash_at, devices)
    expected = _epsilon_of_one_round()
    privacy = DPConfig(Z, DELTA, mode="distributed")

    async def go() -> None:
        async with secure_running(state, devices=DEVICES, policy=POLICY, privacy=privacy, key=key,
                                  enrolled=sims) as h:
            assert await h.task(after=1, wait=30) is not None, "no round opened after round 1"
            status = await (await h.client.get("/v1/status")).json()
            first = next(r for r in status["rounds"] if r["round"] == 1)
            metrics = await (await h.client.get("/metrics")).text()
        gauge = re.search(r"^fl_aggregator_dp_epsilon (\S+)$", metrics, re.MULTILINE)
        ledger = json.loads((state / "privacy.json").read_text()) if (state / "privacy.json").exists() else {}
        assert status["privacy"]["epsilon"] == pytest.approx(expected, rel=1e-9), "the round is not counted once"
        assert gauge is not None and float(gauge.group(1)) == pytest.approx(expected, rel=1e-9)
        assert "unmasking" not in ledger, "the round's publication or abandonment did not settle its entry"
        if devices == "honest":
            assert (first["status"], status["model"]["version"], status["privacy"]["rounds"]) == ("published", 1, 1)
            assert ledger["noise_multipliers"] == [Z] and "unpublished_noise_multipliers" not in ledger
        else:
            assert (first["status"], status["model"]["version"], status["privacy"]["rounds"]) == ("abandoned", 0, 0)
            assert "counts in epsilon" in first["note"], first["note"]
            assert ledger["noise_multipliers"] == [] and ledger["unpublished_noise_multipliers"] == [Z]

    run(go())


def test_a_round_resumed_with_its_answers_is_not_unmasked_past_a_lower_budget(tmp_path: Path) -> None:
    """The crash comes with every unmask answer in and the masks still on; the aggregator restarts with a budget
    below one round's epsilon. The check before the unmask holds on the resumed round: the sum is never unmasked,
    nothing is counted, and no next round opens (the budget is spent)."""
    state, key, sims = _crashed(tmp_path, "answered", "honest")
    privacy = DPConfig(Z, DELTA, epsilon_budget=_epsilon_of_one_round() / 2, mode="distributed")

    async def go() -> None:
        async with secure_running(state, devices=DEVICES, policy=POLICY, privacy=privacy, key=key,
                                  enrolled=sims) as h:
            status = await _round_one_ended(h)
        first = next(r for r in status["rounds"] if r["round"] == 1)
        assert (first["status"], status["model"]["version"]) == ("abandoned", 0), first
        assert "past the budget" in first["note"] and "never unmasked" in first["note"], first["note"]
        assert status["privacy"]["epsilon"] == 0 and status["privacy"]["exhausted"]
        assert status["current_round"] is None

    run(go())


@pytest.mark.parametrize(("crash_at", "ends"), [("asking", "abandoned"), ("answered", "published")])
def test_a_noised_round_resumed_without_dp_ends(tmp_path: Path, crash_at: str, ends: str) -> None:
    """The operator restarts without --dp a state whose open round asked its devices for noise: there is no ledger
    to count in, and the round still ends (published from its answers, or abandoned when the devices that held
    its secrets are gone) instead of failing its close every 5 s."""
    state, key, sims = _crashed(tmp_path, crash_at, "honest")

    async def go() -> None:
        async with secure_running(state, devices=DEVICES, policy=POLICY, key=key, enrolled=sims,
                                  phase_timeout=1) as h:
            assert await h.task(after=1, wait=30) is not None, "round 1 never ended"
            status = await (await h.client.get("/v1/status")).json()
        assert next(r for r in status["rounds"] if r["round"] == 1)["status"] == ends

    run(go())

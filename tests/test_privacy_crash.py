"""Central DP survives a crash in the middle of a publication: the aggregator comes back, counts the round's
privacy once, publishes exactly the noised model it counted (its noise is never drawn again) and loses none of
the round's acknowledged updates.

A child process runs a real aggregator (tests/aggregator_harness.py) with ``--dp central``, three devices upload
to round 1, and the process dies (``os._exit``, as kill -9 or a power cut would stop it, with everything it
fsynced on disk) at one step of publishing version 1. The test then restarts the aggregator on that state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from aggregator_harness import run, running
from dp_accounting import rdp
from nacl.signing import SigningKey

from aggregator.models import ModelStore
from aggregator.privacy import DPConfig, GaussianSum
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.simulate import SimulatedDevice
from appliance import wire

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DEVICES = 3
Z, DELTA, CLIP = 0.01, 1e-5, 1.0  # little noise, so the published model shows every update counted
CRASHED = 86  # the child's exit status when it died at the crash point

# The child: a DP aggregator, one full round of uploads, and a crash at CRASH_AT once the round publishes.
CHILD = """
import asyncio, json, os, sys
from pathlib import Path
import numpy as np
from nacl.signing import SigningKey
sys.path.insert(0, {tests!r})
from aggregator_harness import running
from aggregator.privacy import DPConfig
from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store

state, crash_at, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
config = json.loads(sys.argv[4])

def crash():
    os._exit({crashed})

real_replace = os.replace
def replace(src, dst, *args, **kwargs):  # every durable file (ledger, release) is renamed into place
    real_replace(src, dst, *args, **kwargs)
    if Path(dst).name == crash_at:
        crash()
os.replace = replace
real_finish = Store.finish_round
def finish_round(self, *args, **kwargs):  # the SQLite transaction that records the version
    real_finish(self, *args, **kwargs)
    if crash_at == "aggregator.db":
        crash()
Store.finish_round = finish_round

async def go():
    key = SigningKey(bytes.fromhex(config["key"]))
    devices = [SimulatedDevice(SigningKey(bytes.fromhex(seed))) for seed in config["devices"]]
    async with running(state, devices=0, key=key, enrolled=devices, policy=RoundPolicy(**config["policy"]),
                       plan=TrainingPlan(clip_norm=config["clip"]),
                       privacy=DPConfig(noise_multiplier=config["z"], delta=config["delta"])) as h:
        task = await h.task(after=0, wait=10)
        deltas = [h.delta(0.05) for _ in devices]
        np.save(out, np.mean([np.concatenate([d[s.name].ravel() for s in h.specs]) for d in deltas], axis=0))
        for device, delta in zip(devices, deltas):
            status, _ = await h.upload(device.update(task, delta))
            assert status == 200
        await asyncio.sleep(60)  # the round closes at its goal and the crash ends this process
    sys.exit("the aggregator published version 1 without reaching the crash point")

asyncio.run(go())
"""


def _epsilon(z: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(z), rounds)
    return accountant.get_epsilon(delta)


def _flat(release: wire.ModelRelease, specs: list[wire.ParamSpec]) -> np.ndarray:
    return np.concatenate([release.tensors[spec.name].ravel() for spec in specs])


# Each durable step of publishing version 1, in order: the round's noised model with its ledger entry, the ledger,
# the signed release, the database transaction that records it.
@pytest.mark.parametrize("crash_at", ["privacy-pending.npz", "privacy.json", "v00000001.release", "aggregator.db"])
def test_a_crash_while_publishing_a_noised_round_publishes_the_counted_model_on_restart(
    tmp_path: Path, crash_at: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "state"
    key = SigningKey.generate()
    devices = [SimulatedDevice() for _ in range(DEVICES)]
    policy = RoundPolicy(min_clients=DEVICES, goal_clients=DEVICES, round_timeout=60)
    config = {
        "key": bytes(key).hex(), "devices": [bytes(d.key).hex() for d in devices], "z": Z, "delta": DELTA,
        "clip": CLIP, "policy": {"min_clients": DEVICES, "goal_clients": DEVICES, "round_timeout": 60},
    }
    mean_file = tmp_path / "mean.npy"
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(tests=str(TESTS), crashed=CRASHED), str(state), crash_at,
         str(mean_file), json.dumps(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == CRASHED, child.stderr
    written = state / "models" / "v00000001.release"
    crashed_release = written.read_bytes() if written.exists() else None

    draws: list[int] = []
    real_noise = GaussianSum.noise
    monkeypatch.setattr(GaussianSum, "noise", lambda self, size: draws.append(size) or real_noise(self, size))

    async def go() -> None:
        privacy = DPConfig(noise_multiplier=Z, delta=DELTA)
        async with running(state, devices=0, key=key, enrolled=devices, policy=policy,
                           plan=TrainingPlan(clip_norm=CLIP), privacy=privacy) as h:
            assert draws == [], "the restart drew new noise for a round whose privacy was already spent"
            status = await (await h.client.get("/v1/status")).json()
            assert status["model"]["version"] == 1
            assert status["privacy"]["rounds"] == 1
            assert status["privacy"]["epsilon"] == pytest.approx(_epsilon(Z, 1, DELTA), rel=1e-9)
            first = next(r for r in status["rounds"] if r["round"] == 1)
            assert (first["status"], first["participants"]) == ("published", DEVICES)

            served = await (await h.client.get("/v1/models/1")).read()
            if crashed_release is not None:
                assert served == crashed_release, "the restart published another model than the one written"
            release = wire.decode_model_release(served, h.key.verify_key, h.specs)
            assert release.privacy is not None and release.privacy["rounds"] == 1
            initial = wire.decode_model_release(await (await h.client.get("/v1/models/0")).read(),
                                                h.key.verify_key, h.specs)
            # every acknowledged update is in the mean: what is left is noise of std z * clip / 3
            left = _flat(release, h.specs) - _flat(initial, h.specs) - np.load(mean_file)
            assert np.abs(left).max() < 6 * Z * CLIP / DEVICES

            task = await h.task(after=1, wait=10)
            assert task is not None and (task.round_id, task.model_version) == (2, 1)
            for device in devices:
                assert (await h.upload(device.update(task, h.delta(0.05))))[0] == 200
            assert await h.task(after=2, wait=10) is not None
            status = await (await h.client.get("/v1/status")).json()
            assert (status["model"]["version"], status["privacy"]["rounds"]) == (2, 2)
            assert len(draws) == 1

    run(go())


def test_a_failed_publication_is_retried_with_the_model_already_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk error while writing the release: the round's close is retried (5 s later), and publishes the model
    counted the first time, so the ledger counts the round once and a restart takes the state."""
    real_write = ModelStore.write
    failures: list[int] = []

    def write_once_failing(self: ModelStore, version: int, *args: Any, **kwargs: Any) -> bytes:
        if version == 1 and not failures:
            failures.append(version)
            raise OSError(28, "No space left on device")
        return real_write(self, version, *args, **kwargs)

    monkeypatch.setattr(ModelStore, "write", write_once_failing)
    draws: list[int] = []
    real_noise = GaussianSum.noise
    monkeypatch.setattr(GaussianSum, "noise", lambda self, size: draws.append(size) or real_noise(self, size))
    policy = RoundPolicy(min_clients=DEVICES, goal_clients=DEVICES, round_timeout=60)
    plan = TrainingPlan(clip_norm=CLIP)
    privacy = DPConfig(noise_multiplier=Z, delta=DELTA)

    async def go() -> None:
        async with running(tmp_path, devices=DEVICES, policy=policy, plan=plan, privacy=privacy) as h:
            task = await h.task(after=0, wait=10)
            assert task is not None
            for device in h.devices:
                assert (await h.upload(device.update(task, h.delta(0.05))))[0] == 200
            assert await h.task(after=1, wait=30) is not None, "the round was not published after the retry"
            status = await (await h.client.get("/v1/status")).json()
            assert failures == [1] and len(draws) == 1
            assert (status["model"]["version"], status["privacy"]["rounds"]) == (1, 1)
        async with running(tmp_path, devices=0, key=h.key, enrolled=h.devices, policy=policy, plan=plan,
                           privacy=privacy) as again:
            status = await (await again.client.get("/v1/status")).json()
            assert (status["model"]["version"], status["privacy"]["rounds"]) == (1, 1)

    run(go())

"""A secure round's accusations are judged off the event loop. Each judgement is a DLEQ proof check and the
decryption and Feldman checks of a dealer's shares; a round with many accusations (a dealer that sent bad shares to
every neighbour, each of them accusing it) judged on the event loop held every other request of the aggregator, the
status and the uploads, until the last one was judged.

The judging is held on an event until a thread of the test's own has had /v1/status answered (a plain HTTP client
with its own timeout, so a held event loop fails the probe instead of stopping the test with it); then the round
goes on and leaves exactly the cheating dealer out."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aggregator_harness import run
from secagg_harness import expected_mean, flat_delta, secure_rounds, secure_running, transport

from appliance.protocol import messages as m
from appliance.protocol import secagg
from tests.secagg_sim import _off_polynomial

GUARD_SECONDS = 30.0  # reached only when the judging holds the event loop (and then the test fails)
PROBE_TIMEOUT = 10.0  # what the probe gives one answer: far more than an answer from memory takes
TOLERANCE = 1e-5


def test_the_status_answers_while_a_round_s_accusations_are_judged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    judged: list[tuple[int, int]] = []
    real = secagg.accusation_holds

    def accusation_holds(setup: Any, accuser: int, accusation: Any, dealing: Any) -> bool:
        judged.append((accuser, accusation.dealer))
        entered.set()
        release.wait(GUARD_SECONDS)  # bounded: held on the event loop, it would hold the test's guard too
        return real(setup, accuser, accusation, dealing)

    monkeypatch.setattr(secagg, "accusation_holds", accusation_holds)
    answers: dict[str, Any] = {}

    def probe(base: str) -> None:
        try:
            entered.wait(GUARD_SECONDS)
            with urllib.request.urlopen(f"{base}/v1/status", timeout=PROBE_TIMEOUT) as response:
                answers["status"] = (response.status, json.load(response)["current_round"]["closing"])
        except Exception as exc:  # no answer in time: the event loop was held by the judging
            answers["failed"] = repr(exc)
        finally:
            release.set()

    async def go() -> None:
        async with secure_running(tmp_path, devices=5) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await asyncio.gather(*(r.advertise() for r in rounds))
            await asyncio.gather(*(r.join() for r in rounds))
            cheat, honest = rounds[0], rounds[1:]
            setup = cheat.roster.setup()
            dealing = cheat.device.deal(setup, cheat.index)
            devices = [None] * setup.size
            for r in rounds:
                devices[r.index] = r.device
            for victim in honest:  # bad shares to every neighbour: every one of them accuses the cheat
                dealing.ciphertexts[victim.index] = _off_polynomial(setup, devices, cheat.index, victim.index,
                                                                    dealing.ciphertexts[victim.index])
            await transport(h).post("shares", m.encode_shares(m.Shares(task.round_id, cheat.device_id, dealing),
                                                                 h.devices[0].key))
            await asyncio.gather(*(r.share() for r in honest))
            assert all(await asyncio.gather(*(r.receive() for r in honest)))
            await cheat.receive()
            prober = threading.Thread(target=probe, args=(str(h.client.make_url("")).rstrip("/"),))
            prober.start()
            before = h.engine.params.copy()
            deltas = [flat_delta(h) for _ in rounds]
            async with asyncio.timeout(GUARD_SECONDS):
                for r, delta in zip(rounds, deltas, strict=True):  # the last one closes the round: the judging
                    assert (await h.upload(r.masked_input(delta, 50)))[0] == 200
                await asyncio.to_thread(prober.join)
                await asyncio.gather(*(r.unmask() for r in honest))
                assert await h.task(after=task.round_id, wait=GUARD_SECONDS) is not None
            assert "failed" not in answers, f"the status was not answered while the accusations were judged: {answers}"
            assert answers["status"] == (200, True)  # answered mid-close
            assert judged == [(min(r.index for r in honest), cheat.index)]  # the cheat is out: the rest need no judging
            published = h.engine.params.astype(np.float64) - before
            np.testing.assert_allclose(published, expected_mean(deltas[1:], [50] * 4), atol=TOLERANCE)

    try:
        run(go())
    finally:
        release.set()

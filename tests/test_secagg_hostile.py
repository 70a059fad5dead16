"""A hostile enrolled device in a secure round (docs/protocol.md section 12, docs/api.md): its signatures verify,
but what it signs is not sane. Each of its messages gets one clear 4xx problem naming what is wrong, counted in
the metrics; the honest devices' round goes on and publishes their exact mean; nothing answers 500.

What is already covered elsewhere and not repeated here: the decoders' own refusals (tests/test_secagg_messages.py),
a forged signature, another round's or a short masked input, a late advertisement and a second masked input
(tests/test_secagg_aggregator.py), shares off the dealer's polynomial and wrong unmask shares
(tests/test_secagg_protocol.py, tests/test_secagg_aggregator.py), and words outside the honest bounds
(tests/test_secagg_bounds.py)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from aggregator_harness import Harness, run
from secagg_harness import expected_mean, flat_delta, secure_rounds, secure_running, until_masked

from aggregator.rounds import RoundPolicy
from aggregator.uploads import ReadDeadline
from appliance import wire
from appliance.protocol import key_possession, shamir
from appliance.protocol import messages as m
from appliance.protocol.secagg import Answer
from appliance.secagg_client import SecureRound

TOLERANCE = 1e-5  # as in tests/test_secagg_aggregator.py: the rounding of a few devices is far below it

# Ed25519 encodings that are not points of the prime-order group: the identity, points of order 2, 4 and 8, a
# non-canonical encoding and bytes that are on no curve point at all. Neither key may be one.
BAD_KEYS = [bytes.fromhex(h) for h in (
    "01" + "00" * 31, "ec" + "ff" * 30 + "7f", "00" * 32, "00" * 31 + "80",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "ee" + "ff" * 30 + "7f", "02" + "00" * 31,
)]  # fmt: skip
ABOVE_SQLITE = (2**63, 2**64 - 1, -(2**64))  # CBOR integers no SQLite INTEGER (nor round id) holds


def goal(devices: int) -> RoundPolicy:
    """A round whose goal is ``devices`` of those enrolled: its advertise phase ends as soon as they advertised."""
    return RoundPolicy(min_clients=2, goal_clients=devices, round_timeout=60)


def signed(payload: dict[str, Any], key: Any, kid: str, section: Any = None) -> bytes:
    """A message signed by ``key`` whatever it says (a signature proves who sent it, not that it is sane); with a
    ``section`` (any CBOR value, or bytes as they are) after the envelope, pinned by its SHA-256."""
    body = {"v": wire.PROTOCOL_VERSION, **payload}
    if section is None:
        return wire.sign(body, key, kid)
    raw = section if isinstance(section, bytes) else cbor2.dumps(section, canonical=True)
    return wire.sign(body | {"section_sha256": hashlib.sha256(raw).digest()}, key, kid) + raw


async def post(h: Harness, phase: str, body: bytes) -> tuple[int, str]:
    response = await h.client.post(f"/v1/secagg/{phase}", data=body, headers={"Content-Type": wire.CONTENT_TYPE})
    assert response.content_type in ("application/json", "application/problem+json"), await response.text()
    answer = await response.json()
    return response.status, answer.get("reason", "accepted")


async def refusals(h: Harness, phase: str, cases: dict[str, tuple[bytes, int, str]]) -> None:
    """POST each hostile message; each must get exactly its (status, reason), counted as a refused upload."""
    for name, (body, status, reason) in cases.items():
        before = h.rejected(reason)
        assert await post(h, phase, body) == (status, reason), name
        assert h.rejected(reason) == before + 1, name


async def publish(h: Harness, task: wire.Task, rounds: list[SecureRound], counted: list[SecureRound]) -> None:
    """Every device of ``rounds`` sends its masked input and answers; the next version must be the exact mean of
    the updates of ``counted`` (the devices whose inputs the sum may cover)."""
    deltas = {r.device_id: flat_delta(h) for r in rounds}
    samples = {r.device_id: 10 * (i + 1) for i, r in enumerate(rounds)}
    for r in rounds:
        assert (await h.upload(r.masked_input(deltas[r.device_id], samples[r.device_id])))[0] == 200
    before = h.engine.params.astype(np.float64)
    await asyncio.gather(*(r.unmask() for r in rounds))
    assert await h.task(after=task.round_id, wait=30) is not None, "the next round did not open"
    record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
    assert record["status"] == "published", record["note"]
    assert record["secure"]["sum_devices"] == len(counted)
    want = expected_mean([deltas[r.device_id] for r in counted], [samples[r.device_id] for r in counted])
    np.testing.assert_allclose(h.engine.params.astype(np.float64) - before, want, atol=TOLERANCE)


# --------------------------------------------------------------------------------------------- advertise


def test_hostile_advertisements_are_refused_and_the_device_can_still_take_part(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=4) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            hostile = h.devices[0]
            keys = rounds[0].device.keys
            good = {"type": "secagg-advertise", "phase": "advertise", "round": task.round_id,
                    "device": hostile.device_id, "cipher_key": keys.cipher, "mask_key": keys.mask,
                    "cipher_proof": rounds[0].device.cipher_key_proof(hostile.device_id)}

            def advert(**change: Any) -> bytes:
                return signed(good | change, hostile.key, hostile.device_id)

            def proof_for(round_id: int) -> bytes:  # the cipher key's proof is bound to its round
                return key_possession.prove(round_id, hostile.device_id, rounds[0].device._cipher_secret, os.urandom)

            cases = {
                **{f"round {v!r}": (advert(round=v), 400, "bad-payload")
                   for v in ("1", 1.0, float("nan"), -1, True, None, {"r": 1}, [task.round_id])},
                "round beyond the id range": (advert(round=2**64 - 1), 400, "bad-payload"),
                "the next round": (advert(round=task.round_id + 1, cipher_proof=proof_for(task.round_id + 1)), 409,
                                   "wrong-round"),
                "a round from the past": (advert(round=0, cipher_proof=proof_for(0)), 409, "wrong-round"),
                **{f"cipher key {v!r}": (advert(cipher_key=v), 400, "bad-payload")
                   for v in (5, "k" * 32, keys.cipher[:31], keys.cipher + b"\0", [1] * 32, b"")},
                "mask key of 64 bytes": (advert(mask_key=keys.mask * 2), 400, "bad-payload"),
                **{f"cipher key {k.hex()[:8]}..{k.hex()[-2:]}": (advert(cipher_key=k), 400, "bad-key")
                   for k in BAD_KEYS},
                **{f"mask key {k.hex()[:8]}..{k.hex()[-2:]}": (advert(mask_key=k), 400, "bad-key")
                   for k in BAD_KEYS},
                "another device's id": (advert(device=h.devices[1].device_id), 403, "kid-mismatch"),
                "a device id that is not text": (advert(device=b"x" * 16), 400, "bad-payload"),
                "another type": (advert(type="secagg-shares"), 400, "wrong-type"),
                "another phase": (advert(phase="unmask"), 409, "wrong-phase"),
                "a section after it": (advert() + cbor2.dumps({"x": 1}), 400, "trailing-bytes"),
            }
            await refusals(h, "advertise", cases)
            stranger = m.encode_advertise(m.Advertise(task.round_id, "f" * 32, keys, good["cipher_proof"]),
                                          hostile.key)
            assert await post(h, "advertise", stranger) == (403, "unknown-key")
            response = await h.client.post("/v1/secagg/advertise", data=advert(),
                                           headers={"Content-Type": "text/plain"})
            assert (response.status, (await response.json())["reason"]) == (415, "unsupported-media-type")

            await until_masked(rounds)  # every hostile message was refused: the device still takes part
            await publish(h, task, rounds, counted=rounds)

    run(go())


# ------------------------------------------------------------------------------------------------ shares


def test_hostile_share_bundles_are_refused_and_cost_only_their_dealer(tmp_path: Path) -> None:
    """Shares for itself, for devices not in the roster or outside the index range, out of order, of the wrong
    size or count, keys that do not start with the advertised mask key, extra fields, deep nesting, another round,
    a device that never advertised: each refused with its reason. Commitments that are not points pass the
    aggregator's cheap checks, but every honest neighbour rejects that dealer: only its input is left out."""

    async def go() -> None:
        async with secure_running(tmp_path, devices=5, policy=goal(4)) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            late, rounds = rounds[-1], rounds[:-1]  # never advertises, so it is not in the roster
            await until_masked(rounds, stop_after="join")
            hostile = rounds[0]
            setup = hostile.roster.setup()
            me, t = hostile.index, setup.threshold
            mine = setup.graph[me]
            dealing = hostile.device.deal(setup, me)
            sealed = [[r, dealing.ciphertexts[r]] for r in mine]
            ct = sealed[0][1]
            self_c, key_c = b"".join(dealing.self_commitments), b"".join(dealing.key_commitments)

            def bundle(shares: Any = None, payload: dict | None = None, **section: Any) -> bytes:
                content = {"self_commitments": self_c, "key_commitments": key_c,
                           "shares": sealed if shares is None else shares} | section
                head = {"type": "secagg-shares", "phase": "share", "round": task.round_id,
                        "device": hostile.device_id} | (payload or {})
                return signed(head, hostile.key, hostile.device_id, content)

            cases = {
                "a share for itself": (bundle(sorted([*sealed, [me, ct]])), 422, "bad-shares"),
                "a share for a device not in the roster": (bundle([*sealed, [len(rounds), ct]]), 422, "bad-shares"),
                "a share for index 2^32 - 1": (bundle([*sealed, [2**32 - 1, ct]]), 422, "bad-shares"),
                "a share for index 2^32": (bundle([*sealed, [2**32, ct]]), 400, "bad-payload"),
                "a share for index -1": (bundle([[-1, ct], *sealed]), 400, "bad-payload"),
                "a share for index 1.0": (bundle([[1.0, ct]]), 400, "bad-payload"),
                "one neighbour twice": (bundle([sealed[0], sealed[0]]), 400, "bad-section"),
                "out of order": (bundle(sealed[::-1]), 400, "bad-section"),
                "a neighbour left out": (bundle(sealed[1:]), 422, "bad-shares"),
                "no shares": (bundle([]), 422, "bad-shares"),
                "a ciphertext of 119 bytes": (bundle([[r, c[:-1]] for r, c in sealed]), 422, "wrong-length"),
                "a ciphertext that is an integer": (bundle([[r, 7] for r, _ in sealed]), 400, "bad-section"),
                "shares as a map": (bundle({"1": ct}), 400, "bad-section"),
                "commitments as an integer": (bundle(self_commitments=5), 422, "wrong-length"),
                "commitments of 31 bytes": (bundle(self_commitments=self_c[:31]), 422, "wrong-length"),
                "no commitments": (bundle(key_commitments=b""), 422, "wrong-length"),
                "t + 1 commitments": (bundle(self_commitments=self_c + self_c[:32]), 422, "bad-shares"),
                "t - 1 commitments": (bundle(key_commitments=key_c[32:]), 422, "bad-shares"),
                "key commitments not from its mask key": (bundle(key_commitments=self_c), 422, "bad-shares"),
                "an extra field": (bundle(extra=1), 400, "bad-section"),
                "nested too deep": (bundle([[[[[[1]]]]]]), 400, "too-deep"),
                "a section that is a list": (signed({"type": "secagg-shares", "phase": "share",
                                                     "round": task.round_id, "device": hostile.device_id},
                                                    hostile.key, hostile.device_id, [1, 2]), 400, "bad-section"),
                "the next round": (bundle(payload={"round": task.round_id + 1}), 409, "wrong-round"),
                "round beyond the id range": (bundle(payload={"round": 2**63}), 400, "bad-payload"),
            }
            await refusals(h, "shares", cases)
            outsider = signed({"type": "secagg-shares", "phase": "share", "round": task.round_id,
                               "device": late.device_id}, late.key, late.device_id,
                              {"self_commitments": self_c, "key_commitments": key_c, "shares": sealed})
            assert await post(h, "shares", outsider) == (403, "not-in-roster")

            # Not points at all: the aggregator stores them, the neighbours reject the dealer, the round goes on.
            assert await post(h, "shares", bundle(self_commitments=b"\xff" * 32 * t)) == (200, "accepted")
            await asyncio.gather(*(r.share() for r in rounds[1:]))
            rejected = await asyncio.gather(*(r.receive() for r in rounds))
            assert all(found == [me] for r, found in zip(rounds, rejected, strict=True) if me in setup.graph[r.index])
            await publish(h, task, rounds, counted=rounds[1:])
            assert h.counter("fl_aggregator_secagg_excluded_total", reason="bad-shares") == 1

    run(go())


# ------------------------------------------------------------------------------------------ masked input


def test_hostile_masked_inputs_are_refused_and_the_round_goes_on(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=4, policy=goal(3)) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            late, rounds = rounds[-1], rounds[:-1]  # never advertises
            await until_masked(rounds)
            hostile = rounds[0]
            words = h.engine.models.layout.size + 1
            zero = np.zeros(words, dtype=np.uint32)
            section = m.masked_section_bytes(words)
            payload = {"type": "secagg-masked", "phase": "masked", "round": task.round_id,
                       "device": hostile.device_id, "words": words, "rejected": []}
            raw = m.encode_masked(m.MaskedInput(task.round_id, hostile.device_id, zero, ()), hostile.key)
            words_bytes = raw[len(raw) - section:]

            def masked(**change: Any) -> bytes:
                return signed(payload | change, hostile.key, hostile.device_id, words_bytes)

            setup = hostile.roster.setup()
            outsiders = [v for v in range(setup.size) if v not in setup.graph[hostile.index]]

            def evidence(*dealers: int) -> list[list[Any]]:
                return [[d, b"K" * 32, b"p" * 64] for d in dealers]
            cases = {
                **{f"round {v}": (masked(round=v), 400, "bad-payload") for v in ABOVE_SQLITE},
                **{f"round {v!r}": (masked(round=v), 400, "bad-payload") for v in (1.5, "1", -3, None)},
                "the next round": (masked(round=task.round_id + 1), 409, "wrong-round"),
                "words as text": (masked(words="51"), 400, "bad-payload"),
                "words 2^64 - 1": (masked(words=2**64 - 1), 400, "bad-payload"),
                "fewer words than it declares": (signed(payload, hostile.key, hostile.device_id,
                                                        cbor2.CBORTag(70, bytes(4 * words - 4))), 422,
                                                 "wrong-length"),
                "words after a 9-byte head": (signed(payload, hostile.key, hostile.device_id, b"\xd8\x46\x5b"
                                                     + (4 * words).to_bytes(8, "big") + bytes(4 * words)), 400,
                                              "bad-section"),
                "a byte after the words": (masked() + b"\0", 400, "digest-mismatch"),
                "a section of floats": (signed(payload, hostile.key, hostile.device_id,
                                               cbor2.CBORTag(85, bytes(4 * words))), 400, "unknown-tag"),
                "rejecting itself": (masked(rejected=evidence(hostile.index)), 400, "bad-payload"),
                "rejecting index 99": (masked(rejected=evidence(99)), 400, "bad-payload"),
                "rejecting a non-neighbour": (masked(rejected=evidence(*(outsiders[:1] or [99]))), 400,
                                              "bad-payload"),
                "rejections out of order": (masked(rejected=evidence(2, 1)), 400, "bad-section"),
                "rejections without evidence": (masked(rejected=[1]), 400, "bad-section"),
                "rejections as a map": (masked(rejected={"1": 1}), 400, "bad-section"),
                "rejections as a number": (masked(rejected=1), 400, "bad-section"),
            }
            for name, (body, status, reason) in cases.items():
                before = h.rejected(reason)
                got, problem = await h.upload(body)
                assert (got, problem["reason"]) == (status, reason), (name, problem)
                assert h.rejected(reason) == before + 1, name
            not_in_roster = m.encode_masked(m.MaskedInput(task.round_id, late.device_id, zero, ()), late.key)
            got, problem = await h.upload(not_in_roster)
            assert (got, problem["reason"]) == (403, "not-in-roster")
            # Messages of the other phases, for this round: the share phase is over, the unmask one not yet open.
            again = h.engine.secure.current.dealings[hostile.index][0]  # the very shares it sent
            early = m.encode_unmask(m.Unmask(task.round_id, hostile.device_id, Answer({}, {}, {})), hostile.key)
            await refusals(h, "shares", {"shares after the share phase": (again, 409, "wrong-phase")})
            await refusals(h, "unmask", {"an answer before the request": (early, 409, "wrong-phase")})
            await publish(h, task, rounds, counted=rounds)

    run(go())


# ------------------------------------------------------------------------------------------------ unmask


def test_hostile_unmask_answers_are_refused_and_the_round_goes_on(tmp_path: Path) -> None:
    """Shares it was not asked for (a non-survivor's self share, a survivor's key share or seed, a device it does
    not hold), scalars not below L, seeds of the wrong size, a section that is not the map, another round, and an
    answer from a device whose masked input never arrived."""

    async def go() -> None:
        async with secure_running(tmp_path, devices=4) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            silent = rounds[-1]  # shared, then sent no masked input: not asked to answer
            rounds = rounds[:-1]
            hostile = rounds[0]
            deltas = [flat_delta(h) for _ in rounds]
            for r, delta in zip(rounds, deltas, strict=True):
                assert (await h.upload(r.masked_input(delta, 10)))[0] == 200
            h.engine.current.full.set()  # the round's deadline, now: the silent device's input will not come
            body = await (await h.client.get(f"/v1/secagg/{task.round_id}/unmask", params={"wait": "30"})).read()
            request = m.decode_unmask_request(body, h.key.verify_key)
            survivor, other = request.survivors[0], request.survivors[1]
            one = shamir.scalar_bytes(1)
            head = {"type": "secagg-unmask", "phase": "unmask", "round": task.round_id, "device": hostile.device_id}

            def answer(self_shares: Any = (), key_shares: Any = (), pair_seeds: Any = (), **change: Any) -> bytes:
                section = {"self_shares": list(self_shares), "key_shares": list(key_shares),
                           "pair_seeds": list(pair_seeds)}
                return signed(head | change, hostile.key, hostile.device_id, section)

            cases = {
                "a self share of a dropped device": (answer([[silent.index, one]]), 422, "bad-shares"),
                "a self share of index 99": (answer([[99, one]]), 422, "bad-shares"),
                "a key share of a survivor": (answer(key_shares=[[other, one]]), 422, "bad-shares"),
                "a seed with a survivor": (answer(pair_seeds=[[other, bytes(32)]]), 422, "bad-shares"),
                "a seed of 31 bytes": (answer(pair_seeds=[[silent.index, bytes(31)]]), 422, "wrong-length"),
                "a share not below L": (answer([[survivor, b"\xff" * 32]]), 400, "bad-section"),
                "a share that is an integer": (answer([[survivor, 1]]), 400, "bad-section"),
                "a share of 33 bytes": (answer([[survivor, one + b"\0"]]), 422, "wrong-length"),
                "the same survivor twice": (answer([[survivor, one], [survivor, one]]), 400, "bad-section"),
                "the next round": (answer(round=task.round_id + 1), 409, "wrong-round"),
                "round beyond the id range": (answer(round=-(2**64)), 400, "bad-payload"),
                "a section that is a list": (signed(head, hostile.key, hostile.device_id, [1]), 400, "bad-section"),
            }
            await refusals(h, "unmask", cases)
            unasked = m.encode_unmask(m.Unmask(task.round_id, silent.device_id, Answer({}, {}, {})), silent.key)
            assert await post(h, "unmask", unasked) == (403, "not-in-roster")

            before = h.engine.params.astype(np.float64)
            await asyncio.gather(*(r.unmask() for r in rounds))
            assert await h.task(after=task.round_id, wait=30) is not None
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            assert record["status"] == "published" and record["secure"]["sum_devices"] == 3, record["note"]
            np.testing.assert_allclose(h.engine.params.astype(np.float64) - before,
                                       expected_mean(deltas, [10] * 3), atol=TOLERANCE)

    run(go())


# ----------------------------------------------------------------------------------------- published GETs


@pytest.mark.parametrize("path", [
    "/v1/secagg/9223372036854775808/roster",  # 2^63: no SQLite INTEGER holds it
    "/v1/secagg/99999999999999999999999999/unmask",
    "/v1/secagg/%C2%B2/roster",  # '²' is a digit to str.isdigit, not to int()
    "/v1/secagg/%D9%A1/shares/x",  # '١', an Arabic-Indic one
    "/v1/secagg/-1/roster",
    "/v1/secagg/1.0/roster",
])  # fmt: skip
def test_a_round_that_is_no_round_id_is_a_400(tmp_path: Path, path: str) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=2) as h:
            response = await h.client.get(path)
            assert response.status == 400, await response.text()
            assert (await response.json())["reason"] == "bad-parameter"
            assert h.counter("fl_aggregator_requests_rejected_total", reason="bad-parameter") == 1

    run(go())


def test_a_device_not_in_the_roster_has_no_routed_shares(tmp_path: Path) -> None:
    async def go() -> None:
        async with secure_running(tmp_path, devices=3, policy=goal(2)) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)[:2]
            await until_masked(rounds, stop_after="share")
            for device in (h.devices[2].device_id, "x" * 5000):
                response = await h.client.get(f"/v1/secagg/{task.round_id}/shares/{device}", params={"wait": "30"})
                assert response.status == 403 and (await response.json())["reason"] == "not-in-roster"

    run(go())


# ------------------------------------------------------------------------------------- at a phase's end

STEPS = ("advertise", "join", "share", "receive", "masked", "unmask")  # a device's steps in a round, in order


async def _step(h: Harness, rounds: list[SecureRound], step: str, deltas: list[np.ndarray]) -> None:
    """Every device of ``rounds`` takes ``step`` (``masked``: uploads its masked input of its delta)."""
    if step == "masked":
        for r, delta in zip(rounds, deltas, strict=True):
            assert (await h.upload(r.masked_input(delta, 10)))[0] == 200
    else:
        await asyncio.gather(*(getattr(r, step)() for r in rounds))


async def _steps(h: Harness, r: SecureRound, steps: tuple[str, ...], delta: np.ndarray) -> None:
    for step in steps:
        await _step(h, [r], step, [delta])


async def _phase_over(sr: Any, phase: str) -> None:
    """Until the aggregator has ended ``phase`` of the secure round ``sr``: it refuses the phase's late messages
    while it waits for the ones it admitted (``ending``), or it has moved on without them."""
    while sr.phase == phase and not sr.ending and not sr.outcome:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("phase", ["advertise", "share", "masked", "unmask"])
def test_a_message_being_stored_when_its_phase_ends_counts_in_it(tmp_path: Path, phase: str) -> None:
    """One device's message is acknowledged only once it is stored; here the store holds it until the phase's
    deadline has come. It was admitted before the deadline, so it counts: an advertisement in the roster, a set
    of shares routed to every neighbour (the others mask with it exactly as it masks with them), a masked input
    among the survivors, an unmask answer among the answers. Left out, the advertiser would drop out after a 200,
    the sum would hold masks that never cancel (the round abandoned), the answer would count as a dropout."""

    async def go() -> None:
        async with secure_running(tmp_path, devices=3, phase_timeout=3) as h:
            secure = h.engine.secure
            task = await h.task()
            rounds = secure_rounds(h, task)
            deltas = [flat_delta(h) for _ in rounds]
            others, slow = rounds[:-1], rounds[-1]
            held, release = threading.Event(), threading.Event()
            save = secure._save_message

            def held_save(round_id: int, device_id: str, kind: str, body: bytes) -> None:
                if (device_id, kind) == (slow.device_id, phase):
                    held.set()
                    release.wait(60)
                save(round_id, device_id, kind, body)

            secure._save_message = held_save
            sr = secure.current
            at = STEPS.index(phase)
            for step in STEPS[:at]:
                await _step(h, rounds, step, deltas)
            await _step(h, others, phase, deltas[:-1])
            held_one = asyncio.ensure_future(_step(h, [slow], phase, deltas[-1:]))
            # The others go on to wait for what the phase's end publishes (roster, routed shares, unmask request).
            then = STEPS[at + 1:at + 2]
            waiting = [asyncio.ensure_future(_steps(h, r, then, d)) for r, d in zip(others, deltas, strict=False)]
            try:
                await asyncio.to_thread(held.wait, 60)
                if phase == "masked":
                    h.engine.current.full.set()  # the round's deadline, now: masked inputs were due
                await _phase_over(sr, phase)
                if not sr.ending:  # it moved on without the message it holds
                    await asyncio.gather(*waiting)
            finally:
                release.set()
            await held_one
            await asyncio.gather(*waiting)
            await _steps(h, slow, then, deltas[-1])
            for step in STEPS[at + 2:]:
                await _step(h, rounds, step, deltas)
            assert await h.task(after=task.round_id, wait=30) is not None
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            assert record["status"] == "published", record["note"]
            assert record["secure"]["sum_devices"] == 3
            assert record["secure"]["dropouts"]["unmask"] == 0

    run(go())


def test_a_second_different_message_while_the_first_is_being_stored_is_a_duplicate(tmp_path: Path) -> None:
    """Two different sets of shares of one device at once: the one stored is the one the round keeps (and routes),
    the other is refused as a duplicate, as it would be after the first was stored; the same bytes again wait for
    the first and get its answer."""

    async def go() -> None:
        async with secure_running(tmp_path, devices=3) as h:
            secure = h.engine.secure
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds, stop_after="join")
            hostile = rounds[0]
            setup = hostile.roster.setup()
            other = m.encode_shares(m.Shares(task.round_id, hostile.device_id, hostile.device.deal(
                setup, hostile.index)), hostile.key)
            first = m.encode_shares(m.Shares(task.round_id, hostile.device_id, hostile.device.deal(
                setup, hostile.index)), hostile.key)  # dealt last: the shares the device holds itself
            held, release = threading.Event(), threading.Event()
            save = secure._save_message

            def held_save(round_id: int, device_id: str, kind: str, body: bytes) -> None:
                if body == first:
                    held.set()
                    release.wait(60)
                save(round_id, device_id, kind, body)

            secure._save_message = held_save
            sending = asyncio.ensure_future(post(h, "shares", first))
            again = asyncio.ensure_future(post(h, "shares", first))
            try:
                await asyncio.to_thread(held.wait, 60)
                assert await post(h, "shares", other) == (409, "duplicate")
            finally:
                release.set()
            assert await sending == await again == (200, "accepted")
            assert await post(h, "shares", other) == (409, "duplicate")
            await asyncio.gather(*(r.share() for r in rounds[1:]))
            assert await asyncio.gather(*(r.receive() for r in rounds)) == [[], [], []]
            await publish(h, task, rounds, counted=rounds)

    run(go())


def test_a_device_accusing_honest_neighbours_is_left_out_and_they_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device names two honest neighbours as dealers whose shares failed its checks, with genuine evidence (the
    channel points and valid proofs), and does not mask with them. Before, the aggregator could not tell that from
    the truth and left both out of the sum; now it opens their ciphertexts to the accuser with the proven keys,
    finds good shares, and leaves the accuser out instead: the round publishes the exact mean of everyone else, the
    metric counts a false accusation, and the round's note and the log name the accuser."""

    async def go() -> tuple[str, list[str], str]:
        async with secure_running(tmp_path, devices=6) as h:  # every device is every other's neighbour, t = 4
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            hostile, honest = rounds[0], rounds[1:3]
            accused = sorted(r.index for r in honest)
            hostile.rejected = accused  # its masked input carries evidence against them; it masks without them
            hostile.device._accepted = [u for u in hostile.device._accepted if u not in accused]
            await publish(h, task, rounds, counted=rounds[1:])
            assert h.counter("fl_aggregator_secagg_excluded_total", reason="false-accusation") == 1
            assert h.counter("fl_aggregator_secagg_excluded_total", reason="bad-shares") == 0
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            return hostile.device_id, [r.device_id for r in honest], record["note"]

    with caplog.at_level(logging.WARNING, logger="aggregator.secagg_round"):
        accuser, named, note = run(go())
    assert f"1 masked inputs left out: false accusation by {accuser}" in note, note
    lines = [r.getMessage() for r in caplog.records if "accused device" in r.getMessage()]
    assert len(lines) == 2 and all(accuser in line for line in lines), caplog.text
    assert all(any(d in line for line in lines) for d in named), caplog.text


def test_fewer_survivors_than_the_threshold_abandon_the_round_without_asking(tmp_path: Path) -> None:
    """In a round of four (t = 3), two devices each accuse a neighbour falsely: both are left out, which leaves two
    survivors. Every honest device must refuse an unmask request with fewer than t survivors (docs/protocol.md
    12.6), so the aggregator abandons the round at once, saying why, instead of asking and waiting out the unmask
    phase for refusals."""

    async def go() -> None:
        async with secure_running(tmp_path, devices=4) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            await until_masked(rounds)
            for liar, victim in ((rounds[0], rounds[2]), (rounds[1], rounds[3])):
                liar.rejected = [victim.index]
                liar.device._accepted = [u for u in liar.device._accepted if u != victim.index]
            for r in rounds:
                assert (await h.upload(r.masked_input(flat_delta(h), 10)))[0] == 200
            assert await h.task(after=task.round_id, wait=30) is not None
            record = (await (await h.client.get("/v1/status")).json())["rounds"][-1]
            assert record["status"] == "abandoned"
            assert "2 masked inputs can count, below the threshold of 3" in record["note"], record["note"]
            assert h.counter("fl_aggregator_secagg_abandoned_total", reason="too-few-survivors") == 1
            response = await h.client.get(f"/v1/secagg/{task.round_id}/unmask")
            assert (response.status, (await response.json())["reason"]) == (410, "round-closed")

    run(go())


def test_a_stalled_message_body_times_out_like_an_upload(tmp_path: Path) -> None:
    """A device that announces a secure-aggregation message and sends part of it held a connection and a handler
    for as long as it liked; now the body has an upload's deadline (408 body-timeout, connection closed, counted),
    and the device's message is taken when it sends it whole."""

    async def go() -> None:
        async with secure_running(tmp_path, devices=2, upload_deadline=ReadDeadline(floor=1.0, min_rate=1e9)) as h:
            task = await h.task()
            rounds = secure_rounds(h, task)
            device = rounds[0]
            body = m.encode_advertise(m.Advertise(task.round_id, device.device_id, device.device.keys,
                                                  device.device.cipher_key_proof(device.device_id)), h.devices[0].key)
            server = h.client.server
            reader, writer = await asyncio.open_connection(server.host, server.port)
            writer.write(f"POST /v1/secagg/advertise HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: "
                         f"{wire.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
            await writer.drain()
            try:  # the answer comes at the deadline (the server then lingers a while before it closes)
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            finally:
                writer.close()
            assert head.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in head
            assert h.rejected("body-timeout") == 1
            await until_masked(rounds)
            await publish(h, task, rounds, counted=rounds)

    run(go())

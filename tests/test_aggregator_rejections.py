"""Every way an upload can be refused: HTTP status, stable reason, and the rejection counter, one test each.

Nothing a client sends may produce a 5xx or a traceback.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import cbor2
import numpy as np
import pytest
from aggregator_harness import Harness, run, running
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.simulate import SimulatedDevice
from appliance import wire


async def _refused(h: Harness, body: bytes, status: int, reason: str, **kwargs) -> dict:
    before = h.rejected(reason)
    got_status, problem = await h.upload(body, **kwargs)
    assert (got_status, problem["reason"]) == (status, reason), problem
    assert problem["type"].endswith(reason) and problem["detail"]
    assert h.rejected(reason) == before + 1
    assert h.counter("fl_aggregator_updates_accepted_total") == 0
    return problem


def _case(tmp_path: Path, check, **options) -> None:
    async def go() -> None:
        async with running(tmp_path, **options) as h:
            task = await h.task()
            assert task is not None
            await check(h, task)

    run(go())


def test_unsigned_update_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        section = wire.encode_tensors(h.delta())
        payload = cbor2.dumps({"v": 1, "type": "update", "tensors_sha256": wire.tensors_digest(section)})
        await _refused(h, payload + section, 400, "not-signed")

    _case(tmp_path, check)


def test_unknown_key_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        stranger = SimulatedDevice()
        await _refused(h, stranger.update(task, h.delta()), 403, "unknown-key")

    _case(tmp_path, check)


def test_revoked_key_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        device = h.devices[0]
        h.engine.registry.revoke(device.device_id)
        await _refused(h, device.update(task, h.delta()), 403, "revoked")

    _case(tmp_path, check)


def test_tampered_tensors_fail_the_signed_digest(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        body = bytearray(h.devices[0].update(task, h.delta()))
        body[-3] ^= 0x01  # inside the last tensor's data
        await _refused(h, bytes(body), 400, "digest-mismatch")

    _case(tmp_path, check)


def test_tampered_signed_payload_fails_the_signature(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        body = h.devices[0].update(task, h.delta(), num_samples=32)
        # num_samples 32 is encoded as 0x18 0x20 after its key; make it 33 without re-signing.
        marker = cbor2.dumps("num_samples") + b"\x18\x20"
        assert body.count(marker) == 1
        tampered = body.replace(marker, cbor2.dumps("num_samples") + b"\x18\x21")
        await _refused(h, tampered, 403, "bad-signature")

    _case(tmp_path, check)


def test_identical_resend_gets_the_original_receipt(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        body = h.devices[0].update(task, h.delta())
        status, first = await h.upload(body)
        assert status == 200
        time.sleep(1.1)  # a fresh receipt would carry a later accepted_at
        status, again = await h.upload(body)
        assert status == 200 and again == first
        assert h.counter("fl_aggregator_updates_accepted_total") == 1
        assert h.counter("fl_aggregator_updates_resent_total") == 1
        assert h.engine.current.accepted == 1

    _case(tmp_path, check)


def test_a_resend_is_known_by_its_signed_envelope_and_answered_without_its_tensors(tmp_path: Path) -> None:
    """The receipt names the envelope, whose signed tensors_sha256 pins the rest: once acknowledged, the same
    envelope gets the original receipt whatever follows it (the rest is drained, never hashed or decoded)."""

    async def check(h: Harness, task: wire.Task) -> None:
        body = h.devices[0].update(task, h.delta())
        status, first = await h.upload(body)
        assert status == 200
        assert wire.decode_receipt(first, h.key.verify_key).update_digest == wire.update_digest(body)
        tampered = bytearray(body)
        tampered[-3] ^= 0x01  # digest-mismatch for an envelope not yet acknowledged
        envelope = len(body) - len(wire.verify(body, lambda kid: h.devices[0].key.verify_key).rest)
        for resend in (bytes(tampered), body[: envelope + 5]):
            assert await h.upload(resend) == (200, first)
        assert await h.upload(body) == (200, first)  # the connection the drained resends used still serves
        assert h.counter("fl_aggregator_updates_resent_total") == 3
        assert h.counter("fl_aggregator_updates_accepted_total") == 1 and h.engine.current.accepted == 1

    _case(tmp_path, check)


def test_other_update_for_the_same_round_is_a_duplicate(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        device = h.devices[0]
        status, _ = await h.upload(device.update(task, h.delta()))
        assert status == 200
        before = h.rejected("duplicate")
        status, problem = await h.upload(device.update(task, h.delta()))
        assert (status, problem["reason"]) == (409, "duplicate")
        assert h.rejected("duplicate") == before + 1
        assert h.counter("fl_aggregator_updates_accepted_total") == 1

    _case(tmp_path, check)


def test_update_for_a_closed_round_is_refused_as_late(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        late = h.devices[2].update(task, h.delta())
        for device in h.devices[:2]:
            assert (await h.upload(device.update(task, h.delta())))[0] == 200
        await h.engine.close_round()
        assert h.engine.current.round_id == task.round_id + 1
        before = h.rejected("round-closed")
        status, problem = await h.upload(late)
        assert (status, problem["reason"]) == (410, "round-closed")
        assert h.rejected("round-closed") == before + 1

    _case(tmp_path, check)


def test_update_for_an_unknown_round_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        future = wire.Task(**{**task.__dict__, "round_id": task.round_id + 5})
        await _refused(h, h.devices[0].update(future, h.delta()), 409, "wrong-round")

    _case(tmp_path, check)


def test_update_on_another_base_model_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        other = wire.Task(**{**task.__dict__, "model_digest": bytes(32)})
        await _refused(h, h.devices[0].update(other, h.delta()), 409, "wrong-model")
        older = wire.Task(**{**task.__dict__, "model_version": task.model_version + 1})
        await _refused(h, h.devices[0].update(older, h.delta()), 409, "wrong-model")

    _case(tmp_path, check)


def test_wrong_shape_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        delta = h.delta()
        name = h.specs[0].name
        delta[name] = delta[name].reshape(1, -1)
        await _refused(h, h.devices[0].update(task, delta), 422, "wrong-shape")

    _case(tmp_path, check)


def test_wrong_tensor_names_are_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        delta = h.delta()
        delta["extra.weight"] = np.zeros(3, dtype=np.float32)
        await _refused(h, h.devices[0].update(task, delta), 422, "wrong-tensors")
        delta = h.delta()
        delta.pop(h.specs[-1].name)
        await _refused(h, h.devices[0].update(task, delta), 422, "wrong-tensors")

    _case(tmp_path, check)


def test_wrong_dtype_is_refused(tmp_path: Path) -> None:
    """float64 (RFC 8746 tag 86) is not a protocol encoding: the bounded reader refuses the tag."""

    async def check(h: Harness, task: wire.Task) -> None:
        device = h.devices[0]
        section = cbor2.dumps(
            {
                s.name: cbor2.CBORTag(40, [list(s.shape), cbor2.CBORTag(86, np.zeros(s.shape, "<f8").tobytes())])
                for s in h.specs
            },
            canonical=True,
        )
        payload = {
            "v": 1, "type": "update", "device": device.device_id, "round": task.round_id,
            "model_version": task.model_version, "base_digest": task.model_digest, "num_samples": 8,
            "metrics": {}, "encoding": "float32", "nonce": b"12345678", "created_at": int(time.time()),
            "tensors_sha256": wire.tensors_digest(section),
        }
        await _refused(h, wire.sign(payload, device.key, device.device_id) + section, 400, "unknown-tag")

    _case(tmp_path, check)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(tmp_path: Path, bad: float) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        delta = h.delta()
        delta[h.specs[1].name][0] = bad
        await _refused(h, h.devices[0].update(task, delta), 422, "not-finite")

    _case(tmp_path, check)


def test_update_in_another_encoding_than_the_task_asks_for_is_refused(tmp_path: Path) -> None:
    """An operator who asks for int8 to save uplink gets int8: float32 and float16 updates are refused."""

    async def check(h: Harness, task: wire.Task) -> None:
        assert task.encoding == "int8"
        for encoding in ("float32", "float16"):
            problem = await _refused(h, h.devices[0].update(task, h.delta(), encoding=encoding), 422, "wrong-encoding")
            assert f"tensors are {encoding} but the task asks for int8" in problem["detail"]
        assert (await h.upload(h.devices[0].update(task, h.delta(), encoding="int8")))[0] == 200

    _case(tmp_path, check, plan=TrainingPlan(encoding="int8"))


def test_norm_above_the_bound_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        delta = {s.name: np.full(s.shape, 1.0, dtype=np.float32) for s in h.specs}  # norm sqrt(50) > 5
        await _refused(h, h.devices[0].update(task, delta), 422, "norm-too-large")
        small = {s.name: np.full(s.shape, 0.5, dtype=np.float32) for s in h.specs}  # norm 3.5 < 5
        assert (await h.upload(h.devices[0].update(task, small)))[0] == 200

    _case(tmp_path, check, policy=RoundPolicy(min_clients=2, goal_clients=3, max_update_norm=5.0))


def test_body_too_large_is_refused_before_reading(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        body = h.devices[0].update(task, h.delta()) + bytes(5000)
        await _refused(h, body, 413, "body-too-large")

    _case(tmp_path, check, max_body_bytes=4096)


def test_a_chunked_body_past_the_limit_is_refused_as_too_large(tmp_path: Path) -> None:
    """Without a Content-Length the limit is only known once the body runs past it: still 413, nothing counted. (The
    body is longer than the envelope's prefix, which is read and verified first.)"""
    async def check(h: Harness, task: wire.Task) -> None:
        body = h.devices[0].update(task, h.delta()) + bytes(200_000)

        async def pieces():
            for start in range(0, len(body), 10_000):
                yield body[start : start + 10_000]

        response = await h.client.post("/v1/updates", data=pieces(), headers={"Content-Type": wire.CONTENT_TYPE})
        problem = json.loads(await response.read())
        assert (response.status, problem["reason"]) == (413, "body-too-large"), problem
        assert h.rejected("body-too-large") == 1 and h.counter("fl_aggregator_updates_accepted_total") == 0

    _case(tmp_path, check, max_body_bytes=100_000)


def test_nesting_too_deep_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        nested: list = []
        for _ in range(40):
            nested = [nested]
        envelope = cbor2.dumps(cbor2.CBORTag(18, [b"\xa0", {1: nested}, b"\xa0", bytes(64)]))
        await _refused(h, envelope, 400, "too-deep")

    _case(tmp_path, check)


def test_wrong_content_type_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        body = h.devices[0].update(task, h.delta())
        await _refused(h, body, 415, "unsupported-media-type", content_type="application/json")

    _case(tmp_path, check)


def test_update_created_outside_the_window_is_refused(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        old = h.devices[0].update(task, h.delta(), created_at=int(time.time()) - 2 * 86400)
        await _refused(h, old, 422, "expired")
        future = h.devices[1].update(task, h.delta(), created_at=int(time.time()) + 3600)
        await _refused(h, future, 422, "expired")

    _case(tmp_path, check)


def test_update_signed_by_another_device_than_it_names(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        victim, signer = h.devices[0], h.devices[1]
        update = wire.Update(
            device_id=victim.device_id, round_id=task.round_id, model_version=task.model_version,
            base_digest=task.model_digest, num_samples=8, tensors=h.delta(),
        )
        section = wire.encode_tensors(update.tensors)
        payload = {
            "v": 1, "type": "update", "device": victim.device_id, "round": task.round_id,
            "model_version": task.model_version, "base_digest": task.model_digest, "num_samples": 8,
            "metrics": {}, "encoding": "float32", "nonce": b"12345678", "created_at": int(time.time()),
            "tensors_sha256": wire.tensors_digest(section),
        }
        await _refused(h, wire.sign(payload, signer.key, signer.device_id) + section, 403, "kid-mismatch")

    _case(tmp_path, check)


def test_other_bad_requests_get_problem_json(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        for path, status, reason in [
            ("/v1/models/99", 404, "unknown-version"),
            ("/v1/models/x", 400, "bad-parameter"),
            ("/v1/packages/" + "00" * 32, 404, "unknown-package"),
            ("/v1/task?wait=soon", 400, "bad-parameter"),
            ("/v1/task?after=-1", 400, "bad-parameter"),  # a round id: an integer >= 0 (0: any round)
            ("/v1/task?after=1.5", 400, "bad-parameter"),
            ("/v1/nothing", 404, "not-found"),
        ]:
            response = await h.client.get(path)
            assert response.status == status, path
            assert response.content_type == "application/problem+json"
            assert (await response.json())["reason"] == reason
            assert h.counter("fl_aggregator_requests_rejected_total", reason=reason) >= 1
        response = await h.client.delete("/v1/updates")
        assert response.status == 405 and (await response.json())["reason"] == "method-not-allowed"

    _case(tmp_path, check)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.binary(max_size=300),
    prefix=st.sampled_from([b"", b"\xd2", b"\xd2\x84", b"\xd2\x84\x43\xa1\x01\x27"]),
)
def test_garbage_never_produces_a_server_error(tmp_path: Path, garbage: bytes, prefix: bytes) -> None:
    async def go() -> None:
        async with running(Path(tempfile.mkdtemp(dir=tmp_path)), devices=1) as h:
            status, problem = await h.upload(prefix + garbage)
            assert 400 <= status < 500 and isinstance(problem["reason"], str)
            assert h.rejected(problem["reason"]) == 1

    run(go())


_ANY = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True), st.text(max_size=5),
    st.binary(max_size=40), st.none(), st.booleans(), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True), max_size=3),
)


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["round", "model_version", "base_digest", "num_samples", "metrics", "encoding",
                              "nonce", "created_at", "device", "type", "v", "tensors_sha256"]),
       value=_ANY)
def test_signed_updates_with_odd_field_values_never_produce_a_server_error(
    tmp_path: Path, field: str, value: object
) -> None:
    """Validly signed by an enrolled device, with one payload field replaced by anything at all."""

    async def go() -> None:
        async with running(Path(tempfile.mkdtemp(dir=tmp_path)), devices=1) as h:
            task = await h.task()
            device = h.devices[0]
            section = wire.encode_tensors(h.delta())
            payload = {
                "v": 1, "type": "update", "device": device.device_id, "round": task.round_id,
                "model_version": task.model_version, "base_digest": task.model_digest, "num_samples": 8,
                "metrics": {"loss": 0.5}, "encoding": "float32", "nonce": b"12345678",
                "created_at": int(time.time()), "tensors_sha256": wire.tensors_digest(section), field: value,
            }
            status, answer = await h.upload(wire.sign(payload, device.key, device.device_id) + section)
            assert status == 200 or 400 <= status < 500, answer
            if status != 200:
                assert h.rejected(answer["reason"]) == 1
            status_page = await h.client.get("/v1/status")
            assert status_page.status == 200
            _strict_json(await status_page.text())

    run(go())


@pytest.mark.parametrize("field,value", [("round", 2**63), ("model_version", -1), ("num_samples", 0),
                                         ("num_samples", 2**40)])
def test_integers_out_of_range_are_bad_payload(tmp_path: Path, field: str, value: int) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        device = h.devices[0]
        section = wire.encode_tensors(h.delta())
        payload = {
            "v": 1, "type": "update", "device": device.device_id, "round": task.round_id,
            "model_version": task.model_version, "base_digest": task.model_digest, "num_samples": 8,
            "metrics": {}, "encoding": "float32", "nonce": b"12345678", "created_at": int(time.time()),
            "tensors_sha256": wire.tensors_digest(section), field: value,
        }
        await _refused(h, wire.sign(payload, device.key, device.device_id) + section, 400, "bad-payload")

    _case(tmp_path, check)


def test_non_finite_training_metrics_are_refused_and_status_stays_strict_json(tmp_path: Path) -> None:
    async def check(h: Harness, task: wire.Task) -> None:
        body = h.devices[0].update(task, h.delta(), metrics={"loss": float("inf"), "accuracy": 0.5})
        await _refused(h, body, 400, "bad-payload")
        for device, accuracy in zip(h.devices, (0.5, 1.0, 1.0), strict=True):
            assert (await h.upload(device.update(task, h.delta(), metrics={"accuracy": accuracy})))[0] == 200
        assert await h.task(after=task.round_id, wait=10) is not None
        status = _strict_json(await (await h.client.get("/v1/status")).text())
        done = next(r for r in status["rounds"] if r["round"] == task.round_id)
        assert done["metrics"] == {"accuracy": pytest.approx((0.5 + 1.0 + 1.0) / 3)}

    _case(tmp_path, check)

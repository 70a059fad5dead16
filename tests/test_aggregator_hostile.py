"""Denial of service by one enrolled device or a few sockets (issue 12): none may void a round, block the other
uploads, flood the log or make the status unreadable."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, run_quietly, running

from aggregator.rounds import MAX_SAMPLES_LIMIT, MAX_UPDATE_NORM, RoundPolicy, TrainingPlan, update_norm_bound
from aggregator.strategies import STRATEGIES
from aggregator.uploads import ReadDeadline
from appliance import wire

# Bodies past the signed envelope's prefix (wire.ENVELOPE_PREFIX_BYTES), so that the rest is read holding a slot.
BIG = 40_000
STRATEGY_OPTIONS = {"krum": {"byzantine": 1}}


def _strict_json(text: str) -> object:
    """JSON as the RFC defines it: Infinity and NaN are not JSON."""

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


async def _published(h: Harness, round_id: int) -> dict:
    assert await h.task(after=round_id, wait=20) is not None, "the next round did not open"
    status = _strict_json(await (await h.client.get("/v1/status")).text())
    return next(r for r in status["rounds"] if r["round"] == round_id)


@pytest.mark.parametrize("rule", sorted(STRATEGIES))  # not "strategy": labgrid owns that fixture name
def test_a_huge_update_is_refused_and_the_honest_round_publishes(tmp_path: Path, rule: str) -> None:
    """Finite but huge values (1e37) from one enrolled device overflowed FedAvg and voided the round."""

    async def go() -> None:
        policy = RoundPolicy(min_clients=3, goal_clients=5, round_timeout=60)
        options = STRATEGY_OPTIONS.get(rule, {})
        async with running(tmp_path, devices=6, policy=policy, strategy=rule, strategy_options=options) as h:
            task = await h.task()
            hostile = {s.name: np.full(s.shape, 1e37, np.float32) for s in h.specs}
            status, problem = await h.upload(h.devices[0].update(task, hostile, num_samples=100))
            assert (status, problem["reason"]) == (422, "norm-too-large"), problem
            assert "model" in problem["detail"]  # the bound derived from the model, with no option set
            for device in h.devices[1:]:
                assert (await h.upload(device.update(task, h.delta())))[0] == 200
            done = await _published(h, task.round_id)
            assert done["status"] == "published" and done["participants"] == 5

    run(go())


@pytest.mark.parametrize("rule", sorted(STRATEGIES))  # not "strategy": labgrid owns that fixture name
def test_updates_at_the_largest_bound_with_the_largest_weight_cannot_overflow(tmp_path: Path, rule: str) -> None:
    """An operator's bounds are capped so that no accepted update can overflow any rule's arithmetic: the largest
    norm bound with the largest sample count an operator can allow."""

    async def go() -> None:
        policy = RoundPolicy(min_clients=3, goal_clients=5, round_timeout=60, max_update_norm=MAX_UPDATE_NORM,
                             max_samples=MAX_SAMPLES_LIMIT)
        options = STRATEGY_OPTIONS.get(rule, {})
        async with running(tmp_path, devices=5, policy=policy, strategy=rule, strategy_options=options) as h:
            task = await h.task()
            size = sum(s.size for s in h.specs)
            at_bound = {s.name: np.full(s.shape, 0.999 * MAX_UPDATE_NORM / math.sqrt(size), np.float32)
                        for s in h.specs}
            for sign, device in zip((1, 1, -1, 1, 1), h.devices, strict=True):
                tensors = {name: sign * value for name, value in at_bound.items()}
                answer = await h.upload(device.update(task, tensors, num_samples=MAX_SAMPLES_LIMIT))
                assert answer[0] == 200, answer
            done = await _published(h, task.round_id)
            assert done["status"] == "published", done["note"]

    run(go())


def test_an_operator_bound_above_the_ceiling_is_refused() -> None:
    with pytest.raises(ValueError, match="max-update-norm"):
        RoundPolicy(max_update_norm=MAX_UPDATE_NORM * 10)


def test_the_default_bound_comes_from_clip_norm_else_from_the_model() -> None:
    params = np.full(10_000, 0.5, np.float32)  # ||params|| = 50, sqrt(P) = 100
    assert update_norm_bound(None, 2.0, params) == pytest.approx((2.2, "clip-norm"))
    assert update_norm_bound(None, 0.0, params) == pytest.approx((100.0, "model"))
    assert update_norm_bound(None, 0.0, params * 10) == pytest.approx((500.0, "model"))
    assert update_norm_bound(7.0, 2.0, params) == (7.0, "max-update-norm")


async def _stall(
    host: str, port: int, body_prefix: bytes, length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A socket that sends an upload's headers and the first bytes of its body, then goes quiet."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/updates HTTP/1.1\r\nHost: {host}\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()
    writer.write(head + body_prefix)
    await writer.drain()
    return reader, writer


def test_a_hundred_stalled_sockets_do_not_block_honest_uploads(tmp_path: Path) -> None:
    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=60)
        async with running(tmp_path, devices=3, policy=policy) as h:
            task = await h.task()
            server = h.client.server
            bodies = [d.update(task, h.delta()) for d in h.devices]
            stalled = [await _stall(server.host, server.port, bodies[0][:100], len(bodies[0])) for _ in range(100)]
            try:
                health = await (await h.client.get("/healthz")).json()
                assert health["status"] == "ok" and health["uploads"]["active"] == 0
                answers = await asyncio.wait_for(asyncio.gather(*(h.upload(b) for b in bodies)), 30)
                assert [status for status, _ in answers] == [200, 200, 200]
                assert (await _published(h, task.round_id))["participants"] == 3
            finally:
                for _, writer in stalled:
                    writer.close()

    run(go())


def test_a_stalled_body_times_out_and_frees_its_slot(tmp_path: Path) -> None:
    """An enrolled device that sends its signed envelope and stalls holds a slot only until its deadline;
    meanwhile /healthz says the aggregator is saturated."""

    async def go() -> None:
        deadline = ReadDeadline(floor=3.0, min_rate=1e9)
        policy = RoundPolicy(min_clients=2, goal_clients=2, round_timeout=60)
        options = {"max_active_uploads": 1, "upload_deadline": deadline, "parameters": BIG}
        async with running(tmp_path, devices=2, policy=policy, **options) as h:
            task = await h.task()
            body = h.devices[0].update(task, h.delta())
            server = h.client.server
            reader, writer = await _stall(server.host, server.port, body[: len(body) - 10], len(body))
            try:
                for _ in range(50):
                    health = await (await h.client.get("/healthz")).json()
                    if health["status"] == "saturated":
                        break
                    await asyncio.sleep(0.02)
                assert health["status"] == "saturated" and health["uploads"] == {"active": 1, "limit": 1, "waiting": 0}
                answer = await asyncio.wait_for(reader.read(), 30)  # the server answers and closes
                assert b" 408 " in answer.split(b"\r\n", 1)[0] and b"body-timeout" in answer
            finally:
                writer.close()
            assert h.rejected("body-timeout") == 1
            assert (await h.upload(body))[0] == 200  # the device's retry goes through
            assert (await h.upload(h.devices[1].update(task, h.delta())))[0] == 200

    run(go())


def test_a_second_concurrent_upload_from_one_device_is_told_to_retry(tmp_path: Path) -> None:
    async def go() -> None:
        deadline = ReadDeadline(floor=5.0, min_rate=1e9)
        async with running(tmp_path, devices=2, upload_deadline=deadline, parameters=BIG) as h:
            task = await h.task()
            body = h.devices[0].update(task, h.delta())
            server = h.client.server
            _, writer = await _stall(server.host, server.port, body[: len(body) - 10], len(body))
            try:
                for _ in range(50):
                    if (await (await h.client.get("/healthz")).json())["uploads"]["active"] == 1:
                        break
                    await asyncio.sleep(0.02)
                status, problem = await h.upload(body)
                assert (status, problem["reason"]) == (429, "device-busy")
                assert (await h.upload(h.devices[1].update(task, h.delta())))[0] == 200  # others are not held up
            finally:
                writer.close()

    run(go())


def test_clients_that_drop_mid_body_are_counted_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            task = await h.task()
            body = h.devices[0].update(task, h.delta())
            server = h.client.server
            for cut in (50, len(body) - 10):
                _, writer = await _stall(server.host, server.port, body[:cut], len(body))
                writer.transport.abort()  # gone without a FIN: a reset, as a crashed client leaves
            for _ in range(100):
                if h.rejected("client-gone") == 2:
                    break
                await asyncio.sleep(0.02)
            assert h.rejected("client-gone") == 2
            assert (await h.upload(body))[0] == 200

    run_quietly(go(), caplog)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
def test_compressed_uploads_are_refused_with_415(tmp_path: Path, encoding: str) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2) as h:
            task = await h.task()
            body = h.devices[0].update(task, h.delta())
            for sent in (body, gzip.compress(body)):
                status, problem = await h.upload(sent, headers={"Content-Encoding": encoding})
                assert (status, problem["reason"]) == (415, "unsupported-content-encoding"), problem
            assert (await h.upload(body))[0] == 200

    run(go())


def test_extreme_metrics_leave_the_status_valid_json(tmp_path: Path) -> None:
    """loss = 1e308 times its sample count overflowed to Infinity (or NaN beside -1e308) in the round summary."""

    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=60)
        async with running(tmp_path, devices=3, policy=policy) as h:
            task = await h.task()
            for device, loss in zip(h.devices, (1e308, -1e308, 1e308), strict=True):
                body = device.update(task, h.delta(), num_samples=100, metrics={"loss": loss})
                assert (await h.upload(body))[0] == 200
            done = await _published(h, task.round_id)  # parsed strictly: no Infinity, no NaN
            assert math.isfinite(done["metrics"]["loss"])
            assert done["metrics"]["loss"] == pytest.approx(1e308 / 3)

    run(go())


def test_a_revoked_device_still_gets_the_receipt_of_an_acknowledged_update(tmp_path: Path) -> None:
    """Uploads are checked for their signer before they hold a slot; that check must not break the promise that
    an identical resend of an acknowledged update gets its original receipt, whatever happened since."""

    async def go() -> None:
        async with running(tmp_path, devices=3, parameters=BIG) as h:
            task = await h.task()
            device = h.devices[0]
            body = device.update(task, h.delta())
            status, receipt = await h.upload(body)
            assert status == 200
            h.engine.registry.revoke(device.device_id)
            assert await h.upload(body) == (200, receipt)
            status, problem = await h.upload(device.update(task, h.delta()))
            assert (status, problem["reason"]) == (403, "revoked")

    run(go())


@pytest.mark.parametrize(
    ("policy_bound", "clip_norm", "bound"),
    [(1.0, 0.0, 1.0), (None, 1.0, 1.1)],
    ids=["max-update-norm", "default-from-clip-norm"],
)
def test_the_norm_bound_holds_exactly_at_its_value(
    tmp_path: Path, policy_bound: float | None, clip_norm: float, bound: float
) -> None:
    """Just under the bound is counted, just over is refused: a looser bound (or a lost default) fails here."""

    async def go() -> None:
        policy = RoundPolicy(min_clients=2, goal_clients=3, round_timeout=60, max_update_norm=policy_bound)
        async with running(tmp_path, devices=3, policy=policy, plan=TrainingPlan(clip_norm=clip_norm)) as h:
            task = await h.task()
            direction = h.delta()
            norm = math.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in direction.values()))

            def scaled(target: float) -> dict[str, np.ndarray]:
                return {name: (t * np.float32(target / norm)).astype(np.float32) for name, t in direction.items()}

            status, problem = await h.upload(h.devices[0].update(task, scaled(bound * 1.02)))
            assert (status, problem["reason"]) == (422, "norm-too-large"), problem
            assert (await h.upload(h.devices[1].update(task, scaled(bound * 0.98))))[0] == 200

    run(go())

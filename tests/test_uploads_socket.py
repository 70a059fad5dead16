"""The rest of an upload's body is read straight off the socket once its slot is held (aggregator/uploads.py,
_BodyReceiver): the bytes spooled are exactly the bytes sent, however they are split on the wire; the answer
closes the connection (aiohttp's parser never saw the body end); and a client that stalls or goes away there is
answered or counted as before, its slot freed."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest
from aggregator_harness import Harness, run, run_quietly, running

from aggregator.uploads import ReadDeadline
from appliance import wire

PARAMETERS = 400_000  # a 1.6 MB body: past LEND_SOCKET_FROM_BYTES, and what aiohttp buffers before the slot
PREFIX = 2 * wire.ENVELOPE_PREFIX_BYTES


async def _open_upload(h: Harness, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send an upload's headers and its first bytes, then wait until the server holds its slot (reading the rest)."""
    server = h.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    head = (
        f"POST /v1/updates HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: {wire.CONTENT_TYPE}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body[:PREFIX])
    await writer.drain()
    for _ in range(250):
        if (await (await h.client.get("/healthz")).json())["uploads"]["active"] == 1:
            return reader, writer
        await asyncio.sleep(0.02)
    raise AssertionError("the upload never took its slot")


def _headers(answer: bytes) -> tuple[str, dict[str, str]]:
    head = answer.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    return head[0], {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in head[1:])}


def test_a_body_sent_in_pieces_after_its_slot_is_taken_is_spooled_exactly_and_its_connection_closed(
    tmp_path: Path,
) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=PARAMETERS) as h:
            task = await h.task()
            delta = h.delta()
            body = h.devices[0].update(task, delta)
            reader, writer = await _open_upload(h, body)
            try:
                rest = body[PREFIX:]
                for start in range(0, len(rest), 100_003):  # pieces that end mid-float, with pauses between
                    writer.write(rest[start : start + 100_003])
                    await writer.drain()
                    await asyncio.sleep(0.01)
                answer = await asyncio.wait_for(reader.read(), 30)  # read to the end: the server closes
            finally:
                writer.close()
            status, headers = _headers(answer)
            assert " 200 " in status and headers["connection"] == "close"
            receipt = wire.decode_receipt(answer.split(b"\r\n\r\n", 1)[1], h.key.verify_key)
            assert receipt.update_digest == wire.update_digest(body)
            row = h.engine.store.round_updates(task.round_id)[0]
            spooled = h.engine.store.read_delta(task.round_id, row.offset, row.length)
            assert spooled.tobytes() == h.flat(delta).astype(np.float32).tobytes()
            assert (await h.upload(h.devices[1].update(task, h.delta())))[0] == 200  # the next device is served

    run(go())


def test_a_body_that_stalls_after_its_slot_is_taken_times_out_and_frees_the_slot(tmp_path: Path) -> None:
    async def go() -> None:
        deadline = ReadDeadline(floor=2.0, min_rate=1e9)
        async with running(tmp_path, devices=1, parameters=PARAMETERS, upload_deadline=deadline,
                           max_active_uploads=1) as h:
            task = await h.task()
            body = h.devices[0].update(task, h.delta())
            reader, writer = await _open_upload(h, body)
            try:
                writer.write(body[PREFIX : len(body) // 2])  # lands in the body's buffer, then nothing more
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(), 30)
            finally:
                writer.close()
            status, headers = _headers(answer)
            assert " 408 " in status and headers["connection"] == "close" and b"body-timeout" in answer
            assert (await (await h.client.get("/healthz")).json())["uploads"]["active"] == 0
            assert (await h.upload(body))[0] == 200  # the device's retry goes through

    run(go())


def test_a_client_gone_after_its_slot_is_taken_is_counted_not_logged_and_frees_the_slot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=1, parameters=PARAMETERS, max_active_uploads=1) as h:
            task = await h.task()
            body = h.devices[0].update(task, h.delta())
            for ending in ("reset", "fin"):
                _, writer = await _open_upload(h, body)
                writer.write(body[PREFIX : len(body) // 2])
                await writer.drain()
                await asyncio.sleep(0.05)
                if ending == "reset":
                    writer.transport.abort()  # as a crashed client leaves
                else:
                    writer.close()
                for _ in range(250):
                    health = await (await h.client.get("/healthz")).json()
                    if health["uploads"]["active"] == 0:
                        break
                    await asyncio.sleep(0.02)
                assert health["uploads"]["active"] == 0
            assert h.rejected("client-gone") == 2
            assert (await h.upload(body))[0] == 200

    run_quietly(go(), caplog)


def test_a_small_body_is_read_through_aiohttp_and_its_connection_kept(tmp_path: Path) -> None:
    """Below LEND_SOCKET_FROM_BYTES a new connection would cost about what the copies it saves do."""

    async def go() -> None:
        async with running(tmp_path, devices=1, parameters=50_000) as h:
            task = await h.task()
            response = await h.client.post("/v1/updates", data=h.devices[0].update(task, h.delta()),
                                           headers={"Content-Type": wire.CONTENT_TYPE})
            assert response.status == 200 and response.headers.get("Connection", "").lower() != "close"

    run(go())


def test_a_large_body_over_tls_is_read_through_aiohttp_and_its_connection_kept(tmp_path: Path) -> None:
    """A TLS connection's socket carries ciphertext: the body is read through aiohttp (which decrypts it)."""
    pytest.importorskip("cryptography", reason="cryptography makes the test certificate")
    import ssl

    import aiohttp
    from aggregator_harness import ServedAsInProduction
    from aiohttp.test_utils import TestClient
    from nacl.signing import SigningKey
    from tls_certs import self_signed

    from aggregator.app import SERVICES, AggregatorConfig, make_app
    from aggregator.registry import Enrolment
    from aggregator.rounds import RoundPolicy
    from aggregator.simulate import SimulatedDevice, synthetic_package

    cert, key_file = self_signed(tmp_path)
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key_file)
    trusted = ssl.create_default_context(cafile=str(cert))

    async def go() -> None:
        key, device = SigningKey.generate(), SimulatedDevice()
        package = synthetic_package(PARAMETERS, tensors=2)
        policy = RoundPolicy(min_clients=1, goal_clients=2, round_timeout=60)
        app = make_app(AggregatorConfig(state_dir=tmp_path / "state", package=package, key=key, policy=policy))
        server = ServedAsInProduction(app, host="127.0.0.1")
        await server.start_server(ssl=served)
        client = TestClient(server, connector=aiohttp.TCPConnector(ssl=trusted))
        await client.start_server()
        assert str(client.make_url("/")).startswith("https://")
        try:
            app[SERVICES].registry.enroll([Enrolment(device.device_id, bytes(device.key.verify_key))])
            async with client.get("/v1/task") as r:
                task = wire.decode_task(await r.read(), key.verify_key)
            delta = {s.name: np.full(s.shape, 0.01, np.float32) for s in package.info.param_specs}
            body = device.update(task, delta)
            assert len(body) > 1024 * 1024
            async with client.post("/v1/updates", data=body, headers={"Content-Type": wire.CONTENT_TYPE}) as r:
                assert r.status == 200 and r.headers.get("Connection", "").lower() != "close"
                receipt = wire.decode_receipt(await r.read(), key.verify_key)
            assert receipt.update_digest == wire.update_digest(body)
        finally:
            await client.close()

    run(go())


@pytest.mark.parametrize("options", [{"floor": 0}, {"floor": -1}, {"min_rate": 0}, {"floor": math.nan},
                                     {"min_rate": math.nan}],
                         ids=["no-floor", "negative-floor", "no-rate", "nan-floor", "nan-rate"])
def test_a_read_deadline_that_gives_no_time_or_divides_by_zero_is_refused(options: dict) -> None:
    """No option sets it (AggregatorConfig.upload_deadline): refused when built, not at the first upload (a
    division by zero, or every body timed out at once: an asyncio timer at NaN fires at once)."""
    with pytest.raises(ValueError, match="floor and minimum rate must be positive"):
        ReadDeadline(**options)


@pytest.mark.parametrize("limit", [0, -1])
def test_an_aggregator_reading_no_upload_at_once_is_refused_before_anything_starts(tmp_path: Path, limit: int) -> None:
    """``max_active_uploads`` below 1 would hold every upload waiting for a slot that never frees: refused when the
    configuration is built, with nothing created. (Refused once the round engine had started, it left the engine's
    round clock running, the spool's threads and the store open, and the state directory made.)"""
    state = tmp_path / "state"

    async def go() -> None:
        async with running(state, devices=1, max_active_uploads=limit):
            pass

    with pytest.raises(ValueError, match="max_active_uploads must be at least 1"):
        run(go())
    assert not state.exists()

"""How the agent's client reads what the aggregator answers (appliance/client.py ``read_body``): a model release
from a real aggregator arrives whole, checked and read-only; an answer that announces more than the limit is
refused before a byte of its body is read, one without a length as soon as it runs past the limit, and one that
ends before its announced length is a network error (retried later), never a short body handed to the decoder."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from aggregator.app import SERVICES
from appliance import wire
from appliance.client import AggregatorClient, AggregatorUnavailable
from appliance.errors import ProtocolError
from appliance.modelpkg import MAX_PACKAGE_BYTES
from tests.aggregator_harness import run, running

KEY = SigningKey(bytes(range(32)))


def test_a_release_from_a_real_aggregator_arrives_whole_checked_and_read_only(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, parameters=300_000, key=KEY) as h:
            stored = h.app[SERVICES].models.release_bytes(0)
            expected = wire.decode_model_release(stored, KEY.verify_key, h.specs)
            async with AggregatorClient(str(h.client.make_url("")), KEY.verify_key) as client:
                release = await client.model_release(0, h.specs)
            assert release.digest == expected.digest
            for name, array in expected.tensors.items():
                assert release.tensors[name].tobytes() == array.tobytes()
                # the held release is the base of the next delta: nothing may change it in place
                assert not release.tensors[name].flags.writeable
                with pytest.raises(ValueError):
                    release.tensors[name][...] = 0

    run(go())


Respond = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(respond: Respond) -> AsyncIterator[str]:
    """A loopback HTTP server that answers every request with ``respond``; yields its URL."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await respond(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def head(**headers: object) -> bytes:
    lines = ["HTTP/1.1 200 OK", "Content-Type: application/octet-stream", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_an_answer_announcing_more_than_the_limit_is_refused_before_its_body_is_read() -> None:
    """The server announces a package one byte over the limit and sends nothing more: a client that started
    reading would wait for the body until its timeout (AggregatorUnavailable); it must refuse at once."""
    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head(**{"Content-Length": MAX_PACKAGE_BYTES + 1}))
        await writer.drain()
        await reader.read()  # holds the connection open until the client gives up on it

    async def go() -> None:
        async with raw_server(respond) as url, AggregatorClient(url, KEY.verify_key, timeout_seconds=30) as client:
            with pytest.raises(ProtocolError) as refused:
                await client.package_bytes(bytes(32))
        assert refused.value.reason == "too-large"

    run(go())


def test_an_answer_without_a_length_is_refused_once_it_runs_past_the_limit() -> None:
    limit = wire.DEFAULT_LIMITS.max_bytes
    piece = bytes(1 << 20)

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head(**{"Transfer-Encoding": "chunked"}))
        for _ in range(limit // len(piece) + 8):  # past the limit, and then some: the client hangs up first
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def go() -> None:
        async with raw_server(respond) as url, AggregatorClient(url, KEY.verify_key, timeout_seconds=60) as client:
            with pytest.raises(ProtocolError) as refused:
                await client.model_release(1, [wire.ParamSpec("w", (4,))])
        assert refused.value.reason == "too-large"

    run(go())


def test_an_answer_without_a_length_is_read_whole_within_the_limit() -> None:
    tensors = {"w": np.arange(5000, dtype=np.float32)}
    message, digest = wire.encode_model_release(wire.ModelRelease(3, bytes(32), tensors), KEY)

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head(**{"Transfer-Encoding": "chunked"}))
        for start in range(0, len(message), 4096):
            piece = message[start : start + 4096]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def go() -> None:
        async with raw_server(respond) as url, AggregatorClient(url, KEY.verify_key) as client:
            release = await client.model_release(3, [wire.ParamSpec("w", (5000,))])
        assert release.digest == digest
        assert release.tensors["w"].tobytes() == tensors["w"].tobytes()

    run(go())


def test_an_answer_cut_short_of_its_length_is_a_network_error_not_a_short_body() -> None:
    message, _ = wire.encode_model_release(wire.ModelRelease(3, bytes(32), {"w": np.ones(5000, np.float32)}), KEY)

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head(**{"Content-Length": len(message)}) + message[:-100])
        await writer.drain()

    async def go() -> None:
        async with raw_server(respond) as url, AggregatorClient(url, KEY.verify_key) as client:
            with pytest.raises(AggregatorUnavailable):
                await client.model_release(3, [wire.ParamSpec("w", (5000,))])

    run(go())


def test_a_compressed_answer_is_read_whole_past_its_compressed_length() -> None:
    """Content-Length counts the compressed bytes (a proxy may compress); aiohttp hands on the decompressed ones."""
    tensors = {"w": np.zeros(50_000, dtype=np.float32)}
    message, digest = wire.encode_model_release(wire.ModelRelease(3, bytes(32), tensors), KEY)
    packed = gzip.compress(message)

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head(**{"Content-Encoding": "gzip", "Content-Length": len(packed)}) + packed)
        await writer.drain()

    async def go() -> None:
        async with raw_server(respond) as url, AggregatorClient(url, KEY.verify_key) as client:
            release = await client.model_release(3, [wire.ParamSpec("w", (50_000,))])
        assert release.digest == digest

    run(go())

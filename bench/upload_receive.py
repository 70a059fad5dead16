"""The aggregator's two ways of receiving an upload's body, side by side in one server, on loopback.

aggregator/uploads.py reads the rest of a body either through aiohttp (pieces off its parser, copied into the
body's buffer) or, from ``LEND_SOCKET_FROM_BYTES`` on, from the socket straight into that buffer (a lent transport,
``Connection: close`` after the answer). This runs a server whose one route reads bodies with
``aggregator.uploads.BodyReader`` exactly as ``POST /v1/updates`` does (prefix, then the rest), nothing else, and
a client that posts bodies of the given size in batches, alternating the two ways batch by batch (so both see
the machine alike), and prints the event loop's CPU per upload for each: the median over batches, min and max.

    python bench/upload_receive.py                          # 4 MB bodies, 10 batches of 20 per way, 4 in flight
    python bench/upload_receive.py --size 1000000 --batches 20
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def serve(port: int) -> None:
    """The server: ``POST /read?lend=0|1`` reads a body one way or the other; ``GET /cpu`` says the event loop's
    CPU seconds so far (the handler runs on it)."""
    from aiohttp import web

    from aggregator import uploads
    from aggregator.app import SERVER_OPTIONS, UPLOAD_BODY, _close_after_socket_read

    buffers = uploads.Buffers(keep=16)
    lend_from = uploads.LEND_SOCKET_FROM_BYTES

    async def read(request: web.Request) -> web.Response:
        uploads.LEND_SOCKET_FROM_BYTES = lend_from if request.query["lend"] == "1" else sys.maxsize
        reader = uploads.BodyReader(request.content, request.content_length, sys.maxsize, uploads.ReadDeadline(),
                                    buffers, request.transport)
        request[UPLOAD_BODY] = reader
        await reader.read_prefix(64 * 1024)
        size = len(await reader.read_rest())
        reader.recycle()
        return web.Response(text=str(size))

    async def cpu(request: web.Request) -> web.Response:
        return web.Response(text=repr(time.thread_time()))

    app = web.Application(client_max_size=sys.maxsize)
    app.on_response_prepare.append(_close_after_socket_read)
    app.router.add_post("/read", read)
    app.router.add_get("/cpu", cpu)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, **SERVER_OPTIONS)


async def measure(port: int, size: int, batches: int, per_batch: int, concurrency: int) -> dict[str, list[float]]:
    """Event loop CPU ms per upload of each batch, by way (``aiohttp``, ``lent socket``)."""
    import aiohttp

    body = os.urandom(size)
    url = f"http://127.0.0.1:{port}"
    per_way: dict[str, list[float]] = {"aiohttp": [], "lent socket": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        for _ in range(300):
            try:
                async with session.get(url + "/cpu") as r:
                    await r.read()
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        gate = asyncio.Semaphore(concurrency)

        async def cpu_seconds() -> float:
            async with session.get(url + "/cpu") as r:
                return float(await r.text())

        async def upload(lend: str) -> None:
            async with gate, session.post(url + "/read", params={"lend": lend}, data=body) as r:
                if r.status != 200 or int(await r.text()) != size:
                    raise RuntimeError(f"upload answered {r.status}")

        for batch in range(batches):
            for way in (("aiohttp", "lent socket") if batch % 2 == 0 else ("lent socket", "aiohttp")):
                lend = "1" if way == "lent socket" else "0"
                before = await cpu_seconds()
                await asyncio.gather(*(upload(lend) for _ in range(per_batch)))
                per_way[way].append(1000 * (await cpu_seconds() - before) / per_batch)
    return per_way


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4_000_000, help="body bytes")
    parser.add_argument("--batches", type=int, default=10, help="batches per way")
    parser.add_argument("--per-batch", type=int, default=20, help="uploads per batch")
    parser.add_argument("--concurrency", type=int, default=4, help="uploads in flight")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.serve:
        serve(args.serve)
        return 0
    if min(args.size, args.batches, args.per_batch, args.concurrency) < 1:
        print("upload_receive: --size, --batches, --per-batch and --concurrency must be positive", file=sys.stderr)
        return 2
    from flctl.ports import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], cwd=ROOT)
    try:
        per_way = asyncio.run(measure(port, args.size, args.batches, args.per_batch, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=30)
    for way, values in per_way.items():
        values.sort()
        print(f"{args.size / 1e6:.2f} MB bodies, {way:>11}: {values[len(values) // 2]:.2f} ms of event loop CPU "
              f"per upload (median of {len(values)} batches of {args.per_batch}; min {values[0]:.2f}, "
              f"max {values[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

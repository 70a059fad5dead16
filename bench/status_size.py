"""The size and time of ``GET /v1/status`` when every round has N devices, and of paging through one round's list.

    .venv/bin/python bench/status_size.py --devices 10000 --rounds 20

The state directory is filled in SQLite directly (``rounds`` closed rounds of N accepted updates each; no spool:
the status reads only the rows), an aggregator is served in process on loopback, and after it opens its next round
that one gets N rows too, so the default ``GET /v1/status`` (20 rounds) lists ``rounds`` full rounds. Prints the
bytes and milliseconds of the status, of one page of 500 ids of ``GET /v1/status/rounds/{round}/devices`` and of
reading a whole round's list page by page.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from aggregator.app import SERVER_OPTIONS, AggregatorConfig, make_app  # noqa: E402
from aggregator.cli import init_state, load_key  # noqa: E402
from aggregator.rounds import STATUS_ROUND_DEVICES, RoundPolicy  # noqa: E402
from aggregator.simulate import synthetic_package  # noqa: E402
from aggregator.store import Store  # noqa: E402
from flctl.ports import free_port  # noqa: E402


def device_id(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "big")).hexdigest()[:32]  # as wire.key_id: 16 bytes in hex


def add_updates(db: sqlite3.Connection, round_id: int, devices: int, accepted_at: float) -> None:
    """``devices`` accepted update rows in the round (their spool records are not needed by the status)."""
    db.executemany(
        "INSERT INTO updates (digest, device_id, round_id, num_samples, metrics, offset, length, receipt, accepted_at) "
        "VALUES (?, ?, ?, 8, '{}', 0, 0, x'00', ?)",
        [(hashlib.sha256(f"{round_id}/{i}".encode()).digest(), device_id(i), round_id, accepted_at + i * 1e-3)
         for i in range(devices)],
    )


def fill(state: Path, devices: int, rounds: int) -> None:
    Store(state).close()
    now = time.time()
    with sqlite3.connect(state / "aggregator.db") as db:
        for r in range(1, rounds + 1):
            db.execute(
                "INSERT INTO rounds (round_id, model_version, status, opened_at, deadline, goal, closed_at, "
                "participants, samples) VALUES (?, 0, 'published', ?, ?, ?, ?, ?, ?)",
                (r, now, now + 3600, devices, now, devices, 8 * devices),
            )
            add_updates(db, r, devices, now)


async def _timed_get(session: aiohttp.ClientSession, url: str) -> tuple[float, bytes]:
    started = time.perf_counter()
    async with session.get(url) as response:
        body = await response.read()
        assert response.status == 200, body[:200]
    return time.perf_counter() - started, body


async def measure(devices: int, rounds: int, workdir: Path) -> dict[str, Any]:
    state = workdir / "state"
    init_state(state)
    fill(state, devices, rounds - 1)
    policy = RoundPolicy(min_clients=1, goal_clients=devices + 1, round_timeout=3600)
    app = make_app(AggregatorConfig(state_dir=state, package=synthetic_package(100), key=load_key(state),
                                    policy=policy))
    runner = web.AppRunner(app, **SERVER_OPTIONS)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        with sqlite3.connect(state / "aggregator.db") as db:  # the round the aggregator opened at start
            add_updates(db, rounds, devices, time.time())
        async with aiohttp.ClientSession() as session:
            await _timed_get(session, url + "/v1/status")  # warm the views thread's connection
            status_seconds, status = await _timed_get(session, url + "/v1/status")
            listed_rounds = json.loads(status)["rounds"]
            assert len(listed_rounds) == min(rounds, 20), "the status lists the default 20 rounds"
            assert all(r["devices_total"] == devices and len(r["devices"]) == min(devices, STATUS_ROUND_DEVICES)
                       for r in listed_rounds), "each round: the first ids of its full list, and their total"
            page_seconds, page = await _timed_get(session, f"{url}/v1/status/rounds/1/devices?per_page=500")
            pages = json.loads(page)["pages"]
            started = time.perf_counter()
            listed = 0
            ids = set()
            for number in range(1, pages + 1):
                body = (await _timed_get(session, f"{url}/v1/status/rounds/1/devices?per_page=500&page={number}"))[1]
                listed += len(body)
                ids.update(json.loads(body)["devices"])
            assert ids == {device_id(i) for i in range(devices)}, "the pages list every device of the round"
            round_seconds = time.perf_counter() - started
    finally:
        await runner.cleanup()
    return {"devices": devices, "rounds": rounds, "status_bytes": len(status), "status_seconds": status_seconds,
            "page_bytes": len(page), "page_seconds": page_seconds, "round_bytes": listed,
            "round_seconds": round_seconds, "round_pages": pages}


def report(r: dict[str, Any]) -> str:
    return (f"{r['rounds']} rounds of {r['devices']} devices:\n"
            f"  GET /v1/status: {r['status_bytes'] / 1024:.1f} KB in {r['status_seconds'] * 1000:.0f} ms\n"
            f"  GET /v1/status/rounds/1/devices?per_page=500: {r['page_bytes'] / 1024:.1f} KB in "
            f"{r['page_seconds'] * 1000:.0f} ms\n"
            f"  one round's whole list, {r['round_pages']} pages of 500: {r['round_bytes'] / 1024:.1f} KB in "
            f"{r['round_seconds'] * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=20, help="rounds with N devices (the status lists 20)")
    args = parser.parse_args()
    if args.devices < 1 or args.rounds < 1:
        sys.exit("bench/status_size.py: --devices and --rounds must be positive")
    with tempfile.TemporaryDirectory(prefix="fl-status-size-") as workdir:
        print(report(asyncio.run(measure(args.devices, args.rounds, Path(workdir)))))


if __name__ == "__main__":
    main()

"""The outbox survives SIGKILL at random points: no update lost, none accepted twice.

A child process (this file run as a script) keeps producing updates (update i is a fixed function of i), puts
each into the outbox and delivers them to a receiver in this test process over loopback TCP. The receiver
deduplicates by SHA-256 as the aggregator does and answers a resend with the original receipt; now and then
it answers "busy" (a transient error). The test SIGKILLs the child at random moments and restarts it, then
runs it once in "finish" mode: complete the step a kill may have cut short, deliver what is pending, exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socketserver
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_MESSAGES = 5000  # a bound on production; the kills come long before it
KILLS = 20


def make_message(i: int) -> bytes:
    """Update i: deterministic, 100 bytes to 6 KB."""
    rng = random.Random(i)
    return f"update {i:05d} ".encode() + rng.randbytes(rng.randint(100, 6000))


# -- the child ------------------------------------------------------------------------------------------


def _save_progress(path: Path, value: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(value))
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def _send(port: int, message: bytes) -> bytes:
    from appliance.outbox import TransientError

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(struct.pack(">I", len(message)) + message)
        await writer.drain()
        status = await reader.readexactly(1)
        if status == b"B":
            raise TransientError("busy")
        receipt = await reader.readexactly(32)
        if receipt != hashlib.sha256(message).digest():
            raise RuntimeError("receipt for another message")
        return receipt
    finally:
        writer.close()


async def _child(state_dir: Path, port: int, finish: bool) -> None:
    from appliance.outbox import Backoff, Outbox

    outbox = Outbox(state_dir / "outbox", max_messages=10_000, max_bytes=1 << 30)
    with open(state_dir / "starts.log", "a") as log:
        log.write(f"{outbox.counters.stale_temp_files_removed} {outbox.depth}\n")
    progress = state_dir / "produced"
    produced = int(progress.read_text()) if progress.exists() else 0
    backoff = Backoff(base=0.001, cap=0.01)
    # Production stops at the first step in finish mode: a kill between put and saving the progress leaves
    # update `produced` in the outbox, so that step is completed rather than left ambiguous.
    last = produced + 1 if finish else MAX_MESSAGES
    for i in range(produced, last):
        outbox.put(make_message(i))
        _save_progress(progress, i + 1)  # the agent's round state: "this update is in the outbox"
        if i % 7 == 6:
            await outbox.deliver(lambda m: _send(port, m), backoff=backoff)
    await outbox.deliver(lambda m: _send(port, m), backoff=backoff)


# -- the receiver (the aggregator's dedup by digest) --------------------------------------------------


class Receiver(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ReceiverHandler)
        self.lock = threading.Lock()
        self.accepted: dict[str, bytes] = {}  # digest -> message, first delivery
        self.receipts: Counter[str] = Counter()  # receipts sent per digest (resends included)
        self.torn = 0  # connections that ended mid-message (sender killed)
        self.rng = random.Random(1)


class ReceiverHandler(socketserver.BaseRequestHandler):
    def _read(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = self.request.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def handle(self) -> None:
        server: Receiver = self.server  # type: ignore[assignment]
        header = self._read(4)
        message = None if header is None else self._read(struct.unpack(">I", header)[0])
        if message is None:
            with server.lock:
                server.torn += 1
            return
        key = hashlib.sha256(message).hexdigest()
        with server.lock:
            busy = server.rng.random() < 0.1
            if not busy:
                server.accepted.setdefault(key, message)  # an identical resend changes nothing
                server.receipts[key] += 1
        time.sleep(server.rng.random() * 0.003)
        with contextlib.suppress(OSError):  # the sender was killed while we answered
            self.request.sendall(b"B" if busy else b"R" + bytes.fromhex(key))


# -- the test ---------------------------------------------------------------------------------------------


def _start_child(state_dir: Path, port: int, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, __file__, str(state_dir), str(port), mode], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_outbox_survives_repeated_sigkill_without_loss_or_duplicate(tmp_path):
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    port = receiver.server_address[1]
    rng = random.Random(20261128)
    kills = 0
    try:
        for _ in range(KILLS):
            child = _start_child(tmp_path, port, "run")
            time.sleep(rng.uniform(0.1, 1.0))
            assert child.poll() is None, f"the child stopped by itself: {child.stderr.read().decode()}"
            child.kill()
            child.wait()
            kills += 1
        child = _start_child(tmp_path, port, "finish")
        _, err = child.communicate(timeout=300)
        assert child.returncode == 0, err.decode()
    finally:
        receiver.shutdown()
        receiver.server_close()

    produced = int((tmp_path / "produced").read_text())
    sent = {hashlib.sha256(make_message(i)).hexdigest(): make_message(i) for i in range(produced)}
    # Nothing lost: every update reached the aggregator, byte for byte; nothing else arrived.
    assert receiver.accepted == sent
    # None duplicated: the aggregator accepted each once; a kill can cost at most one resend (the update
    # whose receipt arrived just before the kill), answered with the original receipt.
    resends = sum(receiver.receipts.values()) - len(sent)
    assert resends <= kills, f"{resends} resends for {kills} kills"
    # The outbox is empty and clean: no pending update, no rejected one, no temp file.
    outbox_dir = tmp_path / "outbox"
    assert sorted(p.name for p in outbox_dir.iterdir()) == []
    starts = (tmp_path / "starts.log").read_text().splitlines()
    print(f"updates={produced} kills={kills} resends={resends} torn_sends={receiver.torn} starts={len(starts)} "
          f"temp_files_cleaned={sum(int(line.split()[0]) for line in starts)}")


if __name__ == "__main__":
    asyncio.run(_child(Path(sys.argv[1]), int(sys.argv[2]), finish=sys.argv[3] == "finish"))

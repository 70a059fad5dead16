"""``fl-aggregator serve`` stopped (SIGTERM) while a write to its state directory never returns (a network disk that
hangs): it waits for the write at most --store-timeout, names it in its log, and exits with status 3. It used to wait
for ever (the stop, then the interpreter's exit, each joined the thread stuck in the write), so systemd or the kubelet
killed it after their grace period without a word of which write hung. Nothing the write holds was acknowledged.

The disk is played by a write of the secure round's record that never returns, in a process of its own."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from aggregator.cli import EXIT_WRITES_LEFT_BEHIND, main
from flctl.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
STOP_GUARD_SECONDS = 60.0  # reached only when the stop waits for the write (and then the test fails)

# serve, with every write of a secure round's own record hanging for ever
HANGING_SERVE = """
import sys, threading
from aggregator import cli
from aggregator.secagg_round import SecureRounds

def hang(self, statements):
    threading.Event().wait()

SecureRounds._write = hang
sys.exit(cli.main(sys.argv[1:]))
"""


def _status(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as response:
        return json.load(response)


def test_serve_stopped_while_a_write_never_returns_names_it_and_exits(tmp_path: Path) -> None:
    state = tmp_path / "state"
    main(["keygen", "--state", str(state)])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_SERVE, "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
         "--synthetic-parameters", "50", "--secure-aggregation", "--clip-norm", "1", "--store-timeout", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for _ in range(600):  # the first secure round opens at the start, and its first record hangs
            try:
                if _status(url)["disk"]["oldest_write"] == "the first record of secure round 1":
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        else:
            raise AssertionError("the secure round's first record never showed as a write under way")
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=STOP_GUARD_SECONDS)
        except subprocess.TimeoutExpired:
            raise AssertionError("serve did not exit while a write of its hung") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_WRITES_LEFT_BEHIND, output
    assert "stopping with 1 write to" in output and "the first record of secure round 1 (waiting for" in output, output
    assert "None of them was acknowledged" in output, output

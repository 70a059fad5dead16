"""The outbox queue: durable put, order, restart, bounds and drops, rejection, backoff (injected sleep/rng)."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import pytest

from appliance.outbox import (
    Backoff,
    Outbox,
    OutboxError,
    PermanentRejection,
    TransientError,
    digest,
)


def run(coro):
    return asyncio.run(coro)


class Aggregator:
    """A fake aggregator: receipts by digest, scripted failures per call."""

    def __init__(self, script: list[Exception | None] | None = None):
        self.script = list(script or [])
        self.received: list[bytes] = []

    async def send(self, message: bytes) -> str:
        outcome = self.script.pop(0) if self.script else None
        if outcome is not None:
            raise outcome
        self.received.append(message)
        return "receipt-" + hashlib.sha256(message).hexdigest()[:8]


class FakeSleep:
    def __init__(self):
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def test_put_stores_the_message_under_its_sha256_before_anything_is_sent(tmp_path):
    outbox = Outbox(tmp_path)
    key = outbox.put(b"signed update 1")
    assert key == hashlib.sha256(b"signed update 1").hexdigest() == digest(b"signed update 1")
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"000000000000-{key}.upd"]
    assert files[0].read_bytes() == b"signed update 1"
    assert oct(files[0].stat().st_mode & 0o777) == "0o600"
    assert outbox.depth == 1 and outbox.pending_bytes == 15 and outbox.counters.put_total == 1


def test_putting_the_same_update_twice_keeps_one_copy(tmp_path):
    outbox = Outbox(tmp_path)
    assert outbox.put(b"u") == outbox.put(b"u", key=digest(b"u"))
    assert outbox.depth == 1 and outbox.counters.put_total == 1


def test_a_key_that_is_not_the_digest_or_a_non_bytes_message_is_refused(tmp_path):
    outbox = Outbox(tmp_path)
    with pytest.raises(OutboxError, match="is not the SHA-256 of the message"):
        outbox.put(b"u", key="00" * 32)
    with pytest.raises(TypeError, match="outbox messages are bytes, got str"):
        outbox.put("text")  # type: ignore[arg-type]
    assert outbox.depth == 0


def test_pending_is_in_creation_order_and_survives_a_restart(tmp_path):
    outbox = Outbox(tmp_path)
    keys = [outbox.put(f"update {i}".encode()) for i in (3, 1, 2)]  # digests sort differently
    assert [e.key for e in outbox.pending()] == keys
    reopened = Outbox(tmp_path)
    assert [e.key for e in reopened.pending()] == keys
    assert reopened.read(reopened.pending()[0]) == b"update 3"
    later = reopened.put(b"update 4")
    assert [e.key for e in reopened.pending()] == [*keys, later]


def test_half_written_temp_files_from_a_crash_are_removed_at_start(tmp_path):
    Outbox(tmp_path).put(b"kept")
    (tmp_path / f".tmp-{'ab' * 32}").write_bytes(b"half an upd")
    reopened = Outbox(tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    assert reopened.counters.stale_temp_files_removed == 1
    assert reopened.depth == 1


def test_remove_after_receipt_forgets_the_update_for_good(tmp_path):
    outbox = Outbox(tmp_path)
    key = outbox.put(b"u")
    assert outbox.remove(key) is True
    assert outbox.remove(key) is False
    assert Outbox(tmp_path).depth == 0


def test_full_outbox_drops_the_oldest_by_count_counted_and_logged(tmp_path, caplog):
    outbox = Outbox(tmp_path, max_messages=3)
    with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
        keys = [outbox.put(f"update {i}".encode()) for i in range(5)]
    assert caplog.text.count("outbox full (3 messages") == 2
    assert [e.key for e in outbox.pending()] == keys[2:]
    assert outbox.counters.dropped_total == 2 and outbox.counters.dropped_bytes_total == 16
    assert len(list(tmp_path.glob("*.upd"))) == 3


def test_full_outbox_drops_the_oldest_by_bytes(tmp_path, caplog):
    outbox = Outbox(tmp_path, max_messages=100, max_bytes=1000)
    a = outbox.put(b"a" * 400)
    b = outbox.put(b"b" * 400)
    with caplog.at_level(logging.WARNING, logger="appliance.outbox"):
        c = outbox.put(b"c" * 300)  # 1100 > 1000: the oldest goes
    assert [e.key for e in outbox.pending()] == [b, c]
    assert outbox.pending_bytes == 700 and outbox.counters.dropped_total == 1
    assert f"dropped the oldest update {a}" in caplog.text
    with pytest.raises(OutboxError, match="message of 1001 bytes exceeds the outbox bound of 1000"):
        outbox.put(b"d" * 1001)
    assert outbox.depth == 2  # refusing an oversized message drops nothing


def test_deliver_sends_oldest_first_removes_on_receipt_and_reports_receipts(tmp_path):
    outbox = Outbox(tmp_path)
    keys = [outbox.put(m) for m in (b"one", b"two", b"three")]
    aggregator = Aggregator()
    receipts = []
    report = run(outbox.deliver(aggregator.send, on_receipt=lambda k, r: receipts.append((k, r))))
    assert aggregator.received == [b"one", b"two", b"three"]
    assert [k for k, _ in receipts] == keys and receipts[0][1].startswith("receipt-")
    assert (report.delivered, report.rejected, report.stopped) == (3, 0, "empty")
    assert outbox.depth == 0 and outbox.counters.delivered_total == 3


def test_transient_errors_retry_the_same_update_with_capped_exponential_backoff(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put(b"u1")
    outbox.put(b"u2")
    failures = [TransientError("http-503"), ConnectionRefusedError(), TransientError("http-503"),
                TimeoutError(), TransientError("http-503"), None]
    aggregator = Aggregator(failures)
    sleep = FakeSleep()
    report = run(outbox.deliver(aggregator.send, backoff=Backoff(base=1.0, cap=8.0), sleep=sleep,
                                rng=lambda: 1.0))
    assert sleep.delays == [1.0, 2.0, 4.0, 8.0, 8.0]  # the ceiling doubles, capped
    assert aggregator.received == [b"u1", b"u2"]  # head of line: u1 first, no skipping
    assert report.failures == 5 and report.delivered == 2
    assert outbox.counters.delivery_failures_total == {"http-503": 3, "ConnectionRefusedError": 1,
                                                       "TimeoutError": 1}


def test_backoff_uses_full_jitter_and_resets_after_a_success(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put(b"u1")
    outbox.put(b"u2")
    draws = iter([0.5, 0.25, 0.0, 0.75])
    aggregator = Aggregator([OSError(), OSError(), None, OSError(), None])
    sleep = FakeSleep()
    run(outbox.deliver(aggregator.send, backoff=Backoff(base=2.0, cap=60.0), sleep=sleep, rng=lambda: next(draws)))
    assert sleep.delays == [0.5 * 2.0, 0.25 * 4.0, 0.0 * 2.0]  # after u1's receipt the ceiling is base again


def test_backoff_ceiling_and_validation():
    backoff = Backoff(base=0.5, cap=300.0)
    assert [backoff.ceiling(n) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff.ceiling(20) == 300.0 and backoff.ceiling(5000) == 300.0
    with pytest.raises(ValueError, match="bad backoff"):
        Backoff(base=10.0, cap=1.0)


def test_deliver_gives_up_after_max_failures_and_keeps_the_update(tmp_path):
    outbox = Outbox(tmp_path)
    key = outbox.put(b"u")
    aggregator = Aggregator([ConnectionResetError()] * 10)
    report = run(outbox.deliver(aggregator.send, max_failures=3, sleep=FakeSleep()))
    assert (report.stopped, report.failures, report.delivered) == ("max_failures", 3, 0)
    assert [e.key for e in Outbox(tmp_path).pending()] == [key]


def test_a_permanent_rejection_moves_the_update_aside_and_delivery_goes_on(tmp_path):
    outbox = Outbox(tmp_path)
    bad = outbox.put(b"update for a closed round")
    good = outbox.put(b"good update")
    aggregator = Aggregator([PermanentRejection("round-closed", "round 7 closed at 12:00"), None])
    sleep = FakeSleep()
    report = run(outbox.deliver(aggregator.send, sleep=sleep))
    assert aggregator.received == [b"good update"] and sleep.delays == []  # no retry of a refusal
    assert (report.delivered, report.rejected) == (1, 1)
    assert outbox.counters.rejected_total == {"round-closed": 1}
    assert outbox.rejected() == [(bad, "round-closed")]
    assert (tmp_path / "rejected" / f"000000000000-{bad}.upd").read_bytes() == b"update for a closed round"
    reopened = Outbox(tmp_path)
    assert reopened.depth == 0 and good not in reopened
    reopened.put(b"next")
    assert reopened.pending()[0].seq > 0  # never reuses the rejected update's sequence number


def test_a_corrupted_stored_update_is_not_sent(tmp_path):
    outbox = Outbox(tmp_path)
    key = outbox.put(b"signed update")
    path = next(tmp_path.glob("*.upd"))
    path.write_bytes(b"signed updatE")  # bit rot on the data partition
    aggregator = Aggregator()
    report = run(outbox.deliver(aggregator.send))
    assert aggregator.received == [] and report.rejected == 1
    assert outbox.counters.corrupt_total == 1 and outbox.rejected() == [(key, "corrupt")]


def test_rejected_updates_are_bounded(tmp_path):
    outbox = Outbox(tmp_path, max_rejected=2)
    keys = [outbox.put(f"u{i}".encode()) for i in range(4)]
    run(outbox.deliver(Aggregator([PermanentRejection("bad-signature")] * 4).send))
    assert [k for k, _ in outbox.rejected()] == keys[2:]
    assert len(list((tmp_path / "rejected").iterdir())) == 4  # 2 updates + 2 reason notes


def test_updates_put_while_delivering_go_out_in_the_same_call(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put(b"first")
    received = []

    async def send(message: bytes) -> str:
        received.append(message)
        if message == b"first":
            outbox.put(b"second")
        return "ok"

    report = run(outbox.deliver(send))
    assert received == [b"first", b"second"] and report.delivered == 2 and outbox.depth == 0


def test_stop_ends_delivery_with_updates_still_pending(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put(b"a")
    outbox.put(b"b")
    sent = []

    async def send(message: bytes) -> str:
        sent.append(message)
        return "ok"

    report = run(outbox.deliver(send, stop=lambda: len(sent) == 1))
    assert report.stopped == "stop" and sent == [b"a"] and outbox.depth == 1


def test_bad_bounds_are_refused(tmp_path):
    with pytest.raises(ValueError, match="max_messages=0"):
        Outbox(tmp_path, max_messages=0)

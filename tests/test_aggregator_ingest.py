"""What one upload costs the aggregator, in the work that grows with its size (docs/aggregator.md, "Performance").

The wire format asks for one SHA-256 pass over the tensor bytes (the signed digest of the tensor section; the
receipt names the update by the digest of its small envelope) and one 64-byte signature check. Once, each was
done more often: the envelope's signature three times (on arrival, for the header, again while decoding), and
the tensor bytes hashed twice (receipts named the SHA-256 of the whole body).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from aggregator_harness import running
from nacl.signing import VerifyKey

from aggregator.app import SERVICES
from appliance import wire


class _Counting:
    """Counts what the wrapped SHA-256 constructor is fed."""

    def __init__(self, real):
        self.real = real
        self.bytes = 0

    def __call__(self, data=b"", **kwargs):
        self.bytes += memoryview(data).nbytes
        return _Hash(self.real(data, **kwargs), self)


class _Hash:
    def __init__(self, inner, counter: _Counting):
        self.inner, self.counter = inner, counter

    def update(self, data) -> None:
        self.counter.bytes += memoryview(data).nbytes
        self.inner.update(data)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def test_an_upload_is_hashed_once_and_its_signature_checked_once(tmp_path: Path, monkeypatch) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=100_000) as h:
            task = await h.task()
            body = h.devices[0].update(task, h.delta())
            sha256 = _Counting(hashlib.sha256)
            checks = []
            real_verify = VerifyKey.verify

            def verify(key, *args, **kwargs):
                checks.append(key)
                return real_verify(key, *args, **kwargs)

            monkeypatch.setattr(hashlib, "sha256", sha256)
            monkeypatch.setattr(VerifyKey, "verify", verify)
            status, receipt = await h.upload(body)
            monkeypatch.undo()
            assert status == 200
            assert wire.decode_receipt(receipt, h.key.verify_key).update_digest == wire.update_digest(body)
            assert len(checks) == 1
            envelope = len(body) - len(wire.verify(body, lambda kid: h.devices[0].key.verify_key).rest)
            assert len(body) - envelope <= sha256.bytes <= len(body) + envelope  # the section, and the envelope

    asyncio.run(go())


def test_an_accepted_delta_is_accumulated_exactly_as_sent(tmp_path: Path) -> None:
    async def go() -> None:
        async with running(tmp_path, devices=2, parameters=10_000) as h:
            task = await h.task()
            deltas = [h.delta(), h.delta()]
            for device, delta, samples in zip(h.devices, deltas, (3, 5), strict=True):
                status, _ = await h.upload(device.update(task, delta, num_samples=samples))
                assert status == 200
            store = h.app[SERVICES].store
            layout = h.app[SERVICES].models.layout
            for row, delta in zip(store.round_updates(task.round_id), deltas, strict=True):
                spooled = store.read_delta(row.round_id, row.offset, row.length)
                assert spooled.tobytes() == layout.flatten(delta).tobytes()

    asyncio.run(go())

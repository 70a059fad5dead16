"""The fleet views name the round a site's forward answered from its receipt, signed by this aggregator. The
listing, the status page and /metrics read it on every request, so each receipt's signature is checked once and
its answer kept with its bytes: a receipt changed on disk is checked again, and a tampered one is still refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from aggregator_harness import Harness, run, running
from nacl.signing import VerifyKey

from aggregator.app import SERVICES
from aggregator.registry import Enrolment
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from appliance import wire


async def site_row(h: Harness, site: SimulatedDevice) -> dict:
    listing = await (await h.client.get("/v1/status/devices")).json()
    return next(d for d in listing["devices"] if d["device"] == site.device_id)


def store_receipt(h: Harness, site: SimulatedDevice, receipt: bytes) -> None:
    """Put ``receipt`` in place of the site's stored one, as a hand edit of aggregator.db would."""
    with sqlite3.connect(h.engine.store.db_path) as db:
        assert db.execute("UPDATE updates SET receipt = ? WHERE device_id = ?", (receipt, site.device_id)).rowcount == 1


def test_a_sites_receipt_is_verified_once_across_listings_and_scrapes_and_again_when_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = SimulatedDevice()
    checks: list[bytes] = []  # the messages each Ed25519 verification in the process was asked to check
    verify = VerifyKey.verify

    def counted(self: VerifyKey, smessage: bytes, signature: bytes | None = None, *args, **kwargs) -> bytes:
        checks.append(smessage)
        return verify(self, smessage, signature, *args, **kwargs)

    async def scenario() -> None:
        async with running(tmp_path, devices=1, policy=RoundPolicy(min_clients=1, goal_clients=3,
                                                                   round_timeout=60)) as h:
            h.app[SERVICES].registry.enroll([Enrolment(site.device_id, bytes(site.key.verify_key), "site-a",
                                                       site=True)])
            task = await h.task()
            assert task is not None
            status, _ = await h.upload(site.update(task, h.delta(), num_samples=10))
            assert status == 200
            monkeypatch.setattr(VerifyKey, "verify", counted)

            assert (await site_row(h, site))["last_round"] == task.round_id
            assert (await h.client.get("/metrics")).status == 200
            assert (await h.client.get("/")).status == 200
            assert (await h.client.get("/v1/status")).status == 200
            assert (await site_row(h, site))["last_round"] == task.round_id
            assert len(checks) == 1  # two listings, a scrape, the page and the status: one check of the receipt

            # The aggregator's receipt naming round 7 with one bit of its signature flipped: checked (its bytes
            # changed) and refused, so the row keeps the round the forward was taken into; refused again without a
            # check on the next listing.
            genuine = wire.encode_receipt(wire.Receipt(device_id=site.device_id, round_id=7, update_digest=bytes(32),
                                                       accepted_at=1), h.key)
            store_receipt(h, site, genuine[:-1] + bytes([genuine[-1] ^ 1]))
            assert (await site_row(h, site))["last_round"] == task.round_id
            assert (await site_row(h, site))["last_round"] == task.round_id
            assert len(checks) == 2

            # The same receipt untouched (as a new forward's would be): checked and taken.
            store_receipt(h, site, genuine)
            assert (await site_row(h, site))["last_round"] == 7
            assert len(checks) == 3

    run(scenario())

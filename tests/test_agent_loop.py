"""The agent's round loop against an aggregator that can lie: only models signed by the pinned key and
matching the task are ever trained on, and a good round ends with one signed update in the outbox."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import numpy as np
import pytest
from agent_harness import FakeAggregator, run_agent_against, sample
from nacl.signing import SigningKey

from appliance import wire
from appliance.agent import clip_update
from appliance.framebuffer import FrameBuffer
from appliance.synthetic import SyntheticCamera


@pytest.mark.parametrize(
    ("forged", "tampered", "reason"), [(True, False, "unknown-key"), (False, True, "digest-mismatch")]
)
async def test_agent_refuses_a_model_release_not_signed_by_its_pinned_key(
    signed_package, tmp_path, forged, tampered, reason
):
    key, path = signed_package
    fake = FakeAggregator(key, path, release_key=SigningKey.generate() if forged else None, tamper=tampered)
    agent = await run_agent_against(
        fake, tmp_path, until=lambda a: sample(a, "fl_agent_models_refused_total", {"reason": reason}) >= 1
    )
    assert sample(agent, "fl_agent_models_refused_total", {"reason": reason}) >= 1
    assert sample(agent, "fl_agent_rounds_total") == 0
    assert sample(agent, "fl_agent_rounds_joined_total") == 0  # a refused model is no round taken part in
    assert fake.updates == []
    assert agent.outbox.depth == 0


async def test_agent_trains_a_round_and_delivers_one_signed_update(signed_package, tmp_path):
    key, path = signed_package
    fake = FakeAggregator(key, path)
    agent = await run_agent_against(
        fake, tmp_path, until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1 and a.outbox.depth == 0
    )
    assert sample(agent, "fl_agent_rounds_total") == 1
    assert len(fake.updates) == 1
    update = wire.decode_update(fake.updates[0], lambda kid: agent.identity.verify_key, fake.package.param_specs)
    assert update.round_id == 1 and update.base_digest == fake.digest and update.num_samples == 64
    assert update.metrics["loss_after"] < update.metrics["loss_before"]
    assert agent.outbox.depth == 0  # the receipt removed it
    assert sample(agent, "fl_agent_updates_delivered_total") == 1
    assert sample(agent, "fl_agent_rounds_joined_total") == 1 and sample(agent, "fl_agent_rounds_completed_total") == 1
    assert agent.last_round == 1  # survives a restart: the round is not trained twice
    assert (tmp_path / "state" / "agent-state.json").read_text().startswith('{"last_round": 1, "acknowledged_at": ')


def test_clip_update_bounds_the_global_norm():
    delta = {"a": np.full(4, 3.0, np.float32), "b": np.full(1, 4.0, np.float32)}
    clipped, norm = clip_update(delta, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 16))
    assert np.sqrt(sum(float((v**2).sum()) for v in clipped.values())) == pytest.approx(1.0, rel=1e-5)
    unclipped, _ = clip_update(delta, 0.0)
    assert unclipped is delta


async def test_an_update_waits_in_the_outbox_while_the_aggregator_is_down(signed_package, tmp_path):
    key, path = signed_package
    fake = FakeAggregator(key, path)
    fake.unavailable_posts = 2
    agent = await run_agent_against(
        fake, tmp_path, until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1 and a.outbox.depth == 0
    )
    assert fake.unavailable_posts == 0
    assert len(fake.updates) == 1
    assert sample(agent, "fl_agent_delivery_failures_total", {"reason": "AggregatorUnavailable"}) == 2
    assert sample(agent, "fl_agent_updates_delivered_total") == 1
    assert agent.outbox.depth == 0


async def test_a_camera_appliance_waits_for_labelled_frames_instead_of_skipping_the_round(
    signed_package, tmp_path, monkeypatch
):
    """A freshly booted camera has no labelled frames yet: the round is trained once frames arrive, before
    its deadline, rather than skipped for good."""
    monkeypatch.setattr("appliance.agent.FRAME_POLL_SECONDS", 0.2)
    key, path = signed_package

    async def camera_fills_the_buffer(state: Path) -> None:
        await asyncio.sleep(2)
        frames = FrameBuffer(state / "frames")
        x, y = SyntheticCamera(0).capture(64)
        for pixels, label in zip(x, y, strict=True):
            frames.append(pixels, int(label))
        frames.flush()

    fake = FakeAggregator(key, path)
    agent = await run_agent_against(
        fake, tmp_path, until=lambda _a: len(fake.updates) >= 1, source="cameras", during=camera_fills_the_buffer
    )
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "no-data"}) == 0
    assert len(fake.updates) == 1


# --- HTTPS with a pinned trust anchor -------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path):
    """A CA, the aggregator's certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    pytest.importorskip("cryptography", reason="cryptography makes the test certificates")
    from tls_certs import certificate

    ca = certificate(tmp_path, "ca", "fl-edge test CA", ca=True)
    leaf = certificate(tmp_path, "aggregator", issuer=ca, issuer_name="fl-edge test CA")
    other_ca = certificate(tmp_path, "other-ca", "someone else's CA", ca=True)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(leaf.cert, leaf.key_file)
    return server, {"ca": ca.cert, "leaf": leaf.cert, "other": other_ca.cert}


@pytest.mark.parametrize("pinned", ["ca", "leaf"])
async def test_agent_delivers_over_https_verified_against_the_pinned_ca_or_certificate(
    signed_package, tmp_path, pki, pinned
):
    key, path = signed_package
    server, pems = pki
    fake = FakeAggregator(key, path)
    agent = await run_agent_against(
        fake, tmp_path, tls=(server, pems[pinned]),
        until=lambda a: sample(a, "fl_agent_updates_delivered_total") >= 1 and a.outbox.depth == 0,
    )
    assert len(fake.updates) == 1
    assert sample(agent, "fl_agent_aggregator_errors_total", {"operation": "task"}) == 0


async def test_agent_refuses_an_aggregator_whose_certificate_the_pinned_ca_did_not_sign(
    signed_package, tmp_path, pki, caplog
):
    """The system's CA store plays no part: a certificate from any other CA is a network failure, retried, and
    nothing is sent."""
    key, path = signed_package
    server, pems = pki
    fake = FakeAggregator(key, path)
    agent = await run_agent_against(
        fake, tmp_path, tls=(server, pems["other"]),
        until=lambda a: sample(a, "fl_agent_aggregator_errors_total", {"operation": "task"}) >= 1,
    )
    assert sample(agent, "fl_agent_aggregator_errors_total", {"operation": "task"}) >= 1
    assert fake.updates == [] and sample(agent, "fl_agent_rounds_total") == 0
    assert "certificate verify failed" in caplog.text

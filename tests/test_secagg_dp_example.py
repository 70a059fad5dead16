"""The distributed-DP fields of docs/protocol.md (the roster's ``noise_sigma``, section 12.3 and 12.5; the release's
``"mode"``, section 6.3) are generated here and checked, so the document cannot rot.

    .venv/bin/python tests/test_secagg_dp_example.py            # print the generated blocks
    .venv/bin/python tests/test_secagg_dp_example.py --write    # rewrite them in docs/protocol.md
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import cbor2
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance import wire  # noqa: E402
from appliance.protocol import discrete_gaussian  # noqa: E402
from appliance.protocol import messages as m  # noqa: E402
from appliance.protocol.quantise import noise_tail, private_levels, sensitivity  # noqa: E402
from tests.test_secagg_example import AGGREGATOR_KEY, Example  # noqa: E402
from tests.test_wire_example import DOC, assert_doc_shows, diag, example_key, wrap_hex, write_or_print  # noqa: E402

NOISE_MULTIPLIER = 1.0
NOISE_KEY = hashlib.sha256(b"fl-edge dp example noise key").digest()
EXAMPLE_PRIVACY = {"epsilon": 2.75, "delta": 1e-05, "noise_multiplier": 1.5, "rounds": 4, "mode": "distributed"}


def roster_dp_example() -> str:
    """Section 12.3/12.5's example roster as ``--dp distributed`` publishes it, and one device's noise."""
    ex = Example()
    devices, dimension = len(ex.roster.device_ids), 3
    levels, sigma = private_levels(devices, NOISE_MULTIPLIER, dimension)
    roster = m.Roster(**{**ex.roster.__dict__, "levels": levels, "max_samples": 1, "noise_sigma": sigma})
    body = m.encode_roster(roster, AGGREGATOR_KEY)
    payload = cbor2.loads(cbor2.loads(body).value[2])
    noise = discrete_gaussian.sample(sigma, dimension, NOISE_KEY)
    return "\n".join([
        f"payload {diag(dict(payload))}",
        "",
        f"n = {devices}, P = {dimension}, z = {NOISE_MULTIPLIER}:",
        f"B = {levels}, sensitivity B + sqrt(P) = {sensitivity(levels, dimension)!r}",
        f"sigma = z (B + sqrt(P)) / sqrt(n) = {sigma!r}",
        f"n B + T = {devices * levels} + {noise_tail(devices, sigma):.1f} <= 2^31 - 1 = {2**31 - 1}",
        f"noise key {NOISE_KEY.hex()}",
        f"first uniforms {discrete_gaussian._Uniforms(NOISE_KEY).draw(3).tolist()}",
        f"noise added to words 0..{dimension - 1}: {noise.tolist()}",
    ])


def release_dp_distributed_example() -> str:
    """Section 6.3's ``dp`` field of a version trained with distributed DP."""
    release = wire.ModelRelease(version=4, package_digest=hashlib.sha256(b"fl-edge example package").digest(),
                                tensors={"fc.bias": np.array([0.015625, -0.75], dtype=np.float32)},
                                created_at=1_764_288_000, privacy=EXAMPLE_PRIVACY)
    message, _ = wire.encode_model_release(release, example_key())
    payload = cbor2.loads(cbor2.loads(message[: len(message) - len(wire.encode_tensors(release.tensors))]).value[2])
    return "\n".join([f"dp {diag(payload['dp'])}", "", "hex:", wrap_hex(cbor2.dumps(EXAMPLE_PRIVACY, canonical=True))])


def example_blocks() -> dict[str, str]:
    return {"secagg-roster-dp": roster_dp_example(), "release-dp-distributed": release_dp_distributed_example()}


def test_the_example_roster_decodes_with_its_noise() -> None:
    ex = Example()
    levels, sigma = private_levels(3, NOISE_MULTIPLIER, 3)
    roster = m.Roster(**{**ex.roster.__dict__, "levels": levels, "max_samples": 1, "noise_sigma": sigma})
    decoded = m.decode_roster(m.encode_roster(roster, AGGREGATOR_KEY), AGGREGATOR_KEY.verify_key)
    assert decoded.setup().noise_sigma == sigma


def test_the_release_mode_round_trips_and_a_wrong_mode_is_refused() -> None:
    key = example_key()
    release = wire.ModelRelease(1, b"p" * 32, {"w": np.zeros(2, np.float32)}, created_at=1, privacy=EXAMPLE_PRIVACY)
    decoded = wire.decode_model_release(wire.encode_model_release(release, key)[0], key.verify_key)
    assert decoded.privacy == EXAMPLE_PRIVACY
    wrong = wire.ModelRelease(1, b"p" * 32, {"w": np.zeros(2, np.float32)}, created_at=1,
                              privacy={**EXAMPLE_PRIVACY, "mode": "local"})
    try:
        wire.encode_model_release(wrong, key)
    except wire.ProtocolError as exc:
        assert "'mode' must be \"distributed\"" in str(exc)
    else:
        raise AssertionError("a release with an unknown DP mode was encoded")


def test_the_example_is_deterministic() -> None:
    assert example_blocks() == example_blocks()


def test_doc_shows_the_current_example() -> None:
    """If this fails after a deliberate change, run: python tests/test_secagg_dp_example.py --write"""
    assert_doc_shows(DOC, example_blocks())


if __name__ == "__main__":
    write_or_print(DOC, example_blocks())

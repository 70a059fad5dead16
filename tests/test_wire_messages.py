"""Round trip of every message type, and the checks each decoder adds on top of the envelope."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from nacl.signing import SigningKey

from aggregator.rounds import TrainingPlan
from appliance import wire
from appliance.wire import ParamSpec, ProtocolError

DEVICE = SigningKey(b"\x31" * 32)
DEVICE_ID = wire.key_id(DEVICE.verify_key)
AGGREGATOR = SigningKey(b"\x32" * 32)
SPECS = [ParamSpec("conv.w", (4, 1, 3, 3)), ParamSpec("fc.b", (10,))]


def registry(kid: str):
    return {DEVICE_ID: DEVICE.verify_key}.get(kid)


def params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in SPECS}


def make_update(encoding: str = "float32", **overrides) -> wire.Update:
    fields = dict(
        device_id=DEVICE_ID,
        round_id=12,
        model_version=3,
        base_digest=hashlib.sha256(b"base").digest(),
        num_samples=640,
        tensors=params(),
        metrics={"loss": 0.25, "accuracy": 0.9, "steps": 20},
        encoding=encoding,
        nonce=b"\xab" * 16,
        created_at=1_764_300_000,
    )
    fields.update(overrides)
    return wire.Update(**fields)


def reason(fn, *args) -> str:
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.reason


@pytest.mark.parametrize(("encoding", "tolerance"), [("float32", 0.0), ("float16", 2e-3), ("int8", 0.02)])
def test_update_round_trip(encoding, tolerance):
    update = make_update(encoding)
    body = wire.encode_update(update, DEVICE)
    got = wire.decode_update(body, registry, SPECS)
    assert (got.device_id, got.round_id, got.model_version, got.base_digest, got.num_samples) == (
        DEVICE_ID,
        12,
        3,
        update.base_digest,
        640,
    )
    assert got.metrics == {"loss": 0.25, "accuracy": 0.9, "steps": 20.0}
    assert (got.encoding, got.nonce, got.created_at) == (encoding, b"\xab" * 16, 1_764_300_000)
    for name, array in update.tensors.items():
        assert got.tensors[name].dtype == np.float32 and got.tensors[name].shape == array.shape
        np.testing.assert_allclose(got.tensors[name], array, atol=tolerance * np.abs(array).max(), rtol=0)


def test_update_sizes_shrink_with_the_encoding():
    sizes = {e: len(wire.encode_update(make_update(e), DEVICE)) for e in wire.ENCODINGS}
    assert sizes["int8"] < sizes["float16"] < sizes["float32"]


def test_update_defaults_give_a_fresh_nonce_and_current_time():
    a = wire.Update(DEVICE_ID, 1, 1, b"b" * 32, 1, params())
    b = wire.Update(DEVICE_ID, 1, 1, b"b" * 32, 1, params())
    assert a.nonce != b.nonce and len(a.nonce) == 16 and a.created_at > 1_700_000_000


def test_update_must_be_signed_by_the_device_it_names():
    other = SigningKey(b"\x33" * 32)
    other_id = wire.key_id(other.verify_key)
    body = wire.encode_update(make_update(device_id=DEVICE_ID), other)  # kid = DEVICE_ID, wrong key
    assert reason(wire.decode_update, body, registry) == "bad-signature"
    both = {DEVICE_ID: DEVICE.verify_key, other_id: other.verify_key}
    forged = wire.sign(
        {**payload_of(wire.encode_update(make_update(), DEVICE)), "device": DEVICE_ID}, other, other_id
    ) + wire.encode_tensors(params())
    assert reason(wire.decode_update, forged, both.get) == "kid-mismatch"


def payload_of(body: bytes) -> dict:
    return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in wire.verify(body, registry).payload.items()}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"num_samples": 0}, "num_samples must be positive"),
        ({"num_samples": True}, "a bool is not a count"),
        ({"nonce": b"1234567"}, "nonce shorter than 8 bytes"),
        ({"round": "12"}, "round is text"),
        ({"base_digest": "00"}, "digest is text"),
        ({"metrics": {"loss": "low"}}, "metric value is text"),
        ({"metrics": {f"m{i}": 1 for i in range(33)}}, "more than 32 metrics"),
        ({"created_at": 1.5}, "time as float"),
        ({"encoding": "bf16"}, "an encoding no decoder knows"),
        ({"metrics": {1: 0.5}}, "metric name is not text"),
        ({"metrics": {"converged": True}}, "a bool is not a metric"),
    ],
)
def test_update_payload_fields_are_typed(change, why):
    payload = {**payload_of(wire.encode_update(make_update(), DEVICE)), **change}
    body = wire.sign(payload, DEVICE, DEVICE_ID) + wire.encode_tensors(params())
    assert reason(wire.decode_update, body, registry) == "bad-payload", why


def test_update_tensor_section_is_pinned_by_the_signed_digest():
    body = wire.encode_update(make_update(), DEVICE)
    other = wire.encode_tensors(params(seed=1))
    envelope = body[: len(body) - len(wire.encode_tensors(params()))]
    assert reason(wire.decode_update, envelope + other, registry) == "digest-mismatch"
    assert reason(wire.decode_update, envelope, registry) == "digest-mismatch"


def test_update_against_wrong_specs():
    body = wire.encode_update(make_update(), DEVICE)
    assert reason(wire.decode_update, body, registry, [ParamSpec("conv.w", (4, 1, 3, 3))]) == "wrong-tensors"
    assert reason(wire.decode_update, body, registry, [SPECS[0], ParamSpec("fc.b", (11,))]) == "wrong-shape"


def test_message_types_cannot_be_swapped():
    receipt = wire.encode_receipt(wire.Receipt(DEVICE_ID, 1, b"d" * 32), AGGREGATOR)
    assert reason(wire.decode_task, receipt, AGGREGATOR.verify_key) == "wrong-type"
    task = wire.encode_task(make_task(), AGGREGATOR)
    assert reason(wire.decode_receipt, task, AGGREGATOR.verify_key) == "wrong-type"
    release, _ = wire.encode_model_release(wire.ModelRelease(1, b"p" * 32, params()), AGGREGATOR)
    assert reason(wire.decode_task, release, AGGREGATOR.verify_key) == "wrong-type"
    device_signed = wire.sign({"v": 1, "type": "update"}, AGGREGATOR, wire.key_id(AGGREGATOR.verify_key))
    assert reason(wire.decode_model_release, device_signed, AGGREGATOR.verify_key) == "wrong-type"


def make_task(**overrides) -> wire.Task:
    fields = dict(
        round_id=12,
        model_version=3,
        model_digest=b"m" * 32,
        package_digest=b"p" * 32,
        deadline=1_764_300_600,
        epochs=2,
        batch_size=16,
        learning_rate=0.01,
        prox_mu=0.1,
        encoding="int8",
        clip_norm=1.5,
        issued_at=1_764_300_000,
    )
    fields.update(overrides)
    return wire.Task(**fields)


def test_task_round_trip():
    task = make_task()
    assert wire.decode_task(wire.encode_task(task, AGGREGATOR), AGGREGATOR.verify_key) == task


def test_task_with_integral_floats_still_decodes():
    """learning_rate=1 is encoded as a float (1.0, a half float on the wire), not an integer."""
    task = make_task(learning_rate=1, prox_mu=0, clip_norm=0)
    got = wire.decode_task(wire.encode_task(task, AGGREGATOR), AGGREGATOR.verify_key)
    assert (got.learning_rate, got.prox_mu, got.clip_norm) == (1.0, 0.0, 0.0)


def test_task_checks():
    message = wire.encode_task(make_task(), AGGREGATOR)
    assert reason(wire.decode_task, message, DEVICE.verify_key) == "unknown-key"  # not the pinned key
    assert reason(wire.decode_task, message + b"\0", AGGREGATOR.verify_key) == "trailing-bytes"
    bad = wire.encode_task(make_task(encoding="bf16"), AGGREGATOR)
    assert reason(wire.decode_task, bad, AGGREGATOR.verify_key) == "bad-payload"


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", -1), ("batch_size", 0),
    ("learning_rate", float("nan")), ("learning_rate", float("inf")), ("learning_rate", 0.0), ("learning_rate", -0.1),
    ("prox_mu", float("nan")), ("prox_mu", -1.0), ("clip_norm", float("inf")), ("clip_norm", -1.0),
])
def test_a_signed_task_no_device_can_train_on_is_refused_naming_the_field(field, value):
    """What an aggregator's round plan refuses (RoundPlan), a device refuses too: signed or not, 0 epochs or a NaN
    learning rate failed every round in the trainer (counted trainer-failed, the cause in its traceback)."""
    message = wire.encode_task(make_task(**{field: value}), AGGREGATOR)
    with pytest.raises(ProtocolError, match=f"field '{field}' must be a finite") as refused:
        wire.decode_task(message, AGGREGATOR.verify_key)
    assert refused.value.reason == "bad-payload"


@pytest.mark.parametrize("field, value, bound", [
    ("epochs", 2**40, "1000"), ("epochs", 1001, "1000"), ("batch_size", 2**40, "65536"), ("batch_size", 65537, "65536"),
    ("learning_rate", 1e300, "1000"), ("learning_rate", 1000.5, "1000"), ("prox_mu", 1e19, "1000"),
])
def test_a_signed_task_asking_past_any_real_training_is_refused_naming_the_field_and_its_bound(field, value, bound):
    """Finite, and absurd: 2^40 epochs ran into the deadline, a learning rate of 1e300 or a FedProx mu of 1e19
    overflowed float32 at the first steps; each round failed in the trainer, counted trainer-failed. The aggregator's
    plan refuses them at start, and a device refuses a task that asks them all the same."""
    message = wire.encode_task(make_task(**{field: value}), AGGREGATOR)
    with pytest.raises(ProtocolError, match=re.escape(f"field '{field}' must be a finite")) as refused:
        wire.decode_task(message, AGGREGATOR.verify_key)
    assert refused.value.reason == "bad-payload" and f"<= {bound}, got {value!r}" in str(refused.value)
    with pytest.raises(ValueError, match=f"must be at most {bound}, got"):
        TrainingPlan(**{field: value})


def test_a_task_at_the_bounds_is_taken():
    task = make_task(epochs=1000, batch_size=65536, learning_rate=1000.0, prox_mu=1000.0)
    assert wire.decode_task(wire.encode_task(task, AGGREGATOR), AGGREGATOR.verify_key) == task
    TrainingPlan(epochs=1000, batch_size=65536, learning_rate=1000.0, prox_mu=1000.0)


@pytest.mark.parametrize("field, value", [("round_id", -1), ("round_id", 2**63), ("model_version", -1),
                                          ("model_version", 2**64 - 1)])
def test_a_signed_task_naming_a_round_or_version_no_aggregator_holds_is_refused(field, value):
    message = wire.encode_task(make_task(**{field: value}), AGGREGATOR)
    name = {"round_id": "round"}.get(field, field)
    with pytest.raises(ProtocolError, match=rf"field '{name}' must be an integer in \[0, 2\^63 - 1\], got {value}"):
        wire.decode_task(message, AGGREGATOR.verify_key)


def test_model_release_round_trip_and_digest():
    release = wire.ModelRelease(version=4, package_digest=b"p" * 32, tensors=params(), created_at=1_764_300_000)
    message, digest = wire.encode_model_release(release, AGGREGATOR)
    assert digest == hashlib.sha256(wire.encode_tensors(params())).digest()
    got = wire.decode_model_release(message, AGGREGATOR.verify_key, SPECS)
    assert (got.version, got.package_digest, got.digest, got.created_at) == (4, b"p" * 32, digest, 1_764_300_000)
    for name, array in params().items():
        np.testing.assert_array_equal(got.tensors[name], array)
    # an update trained from this release names it by that digest
    trained = wire.encode_update(make_update(base_digest=digest), DEVICE)
    assert wire.decode_update(trained, registry).base_digest == digest


def test_model_release_must_be_float32_and_signed_by_the_pinned_key():
    section = wire.encode_tensors(params(), "float16")
    payload = {
        "v": 1,
        "type": "model",
        "version": 1,
        "package_digest": b"p",
        "created_at": 1,
        "tensors_sha256": hashlib.sha256(section).digest(),
    }
    message = wire.sign(payload, AGGREGATOR, wire.key_id(AGGREGATOR.verify_key)) + section
    assert reason(wire.decode_model_release, message, AGGREGATOR.verify_key) == "bad-tensor"
    good, _ = wire.encode_model_release(wire.ModelRelease(1, b"p", params()), AGGREGATOR)
    assert reason(wire.decode_model_release, good, DEVICE.verify_key) == "unknown-key"


def test_receipt_round_trip_names_the_update_digest():
    body = wire.encode_update(make_update(), DEVICE)
    receipt = wire.Receipt(DEVICE_ID, 12, wire.update_digest(body), accepted_at=1_764_300_001)
    message = wire.encode_receipt(receipt, AGGREGATOR)
    assert wire.decode_receipt(message, AGGREGATOR.verify_key) == receipt
    assert reason(wire.decode_receipt, message + b"\0", AGGREGATOR.verify_key) == "trailing-bytes"


def test_an_update_is_named_by_the_digest_of_its_signed_envelope():
    """The receipt's digest covers the envelope only (whose signed tensors_sha256 pins the rest), so the
    aggregator hashes the tensor bytes once; the verifier's digest and the sender's are the same bytes."""
    update = make_update()
    body = wire.encode_update(update, DEVICE)
    envelope = body[: len(body) - len(wire.encode_tensors(update.tensors))]
    assert wire.update_digest(body) == hashlib.sha256(envelope).digest() != hashlib.sha256(body).digest()
    assert wire.verify(body, registry).digest == wire.update_digest(body)
    # another update of the same device, round and tensors (a new nonce) has another name
    assert wire.update_digest(wire.encode_update(make_update(nonce=b"\xcd" * 16), DEVICE)) != wire.update_digest(body)
    assert reason(wire.update_digest, body[:40]) == "truncated"


def test_decoders_accept_memoryviews_of_a_larger_buffer():
    body = wire.encode_update(make_update(), DEVICE)
    buffer = bytearray(b"junk" + body + b"junk")
    view = memoryview(buffer)[4 : 4 + len(body)]
    assert wire.decode_update(view, registry, SPECS).round_id == 12


@pytest.mark.parametrize(("declared", "why"), [("float16", "says float16, carries float32"), ("bf16", "unknown")])
def test_update_encoding_field_must_match_its_tensor_section(declared, why):
    """The signed `encoding` names the tensor section's encoding; a body contradicting it is refused."""
    payload = {**payload_of(wire.encode_update(make_update(), DEVICE)), "encoding": declared}
    body = wire.sign(payload, DEVICE, DEVICE_ID) + wire.encode_tensors(params())
    assert reason(wire.decode_update, body, registry) in {"bad-tensor", "bad-payload"}, why


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_update_with_a_non_finite_metric_is_refused(bad):
    key = SigningKey.generate()
    kid = wire.key_id(key.verify_key)
    update = wire.Update(kid, 1, 0, b"\0" * 32, 10, {"w": np.zeros(3, np.float32)}, metrics={"loss": bad})
    with pytest.raises(ProtocolError) as exc:
        wire.decode_update(wire.encode_update(update, key), lambda k: key.verify_key)
    assert exc.value.reason == "bad-payload"


def test_a_task_whose_secagg_field_is_not_a_boolean_is_refused():
    """1 is not true: a device must not guess whether a round is a secure one."""
    aggregator_id = wire.key_id(AGGREGATOR.verify_key)
    payload = dict(wire.verify(wire.encode_task(make_task(), AGGREGATOR), wire.pinned(AGGREGATOR.verify_key)).payload)
    payload = {k: bytes(v) if isinstance(v, memoryview) else v for k, v in payload.items()}
    message = wire.sign({**payload, "secagg": 1}, AGGREGATOR, aggregator_id)
    assert reason(wire.decode_task, message, AGGREGATOR.verify_key) == "bad-payload"


@pytest.mark.parametrize("dp", [
    {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0, "rounds": 1, "sampling": 0.1},  # a field no version sends
    {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0, "rounds": 1, "mode": "local"},
    {"epsilon": -1.0, "delta": 1e-5, "noise_multiplier": 1.0, "rounds": 1},  # no privacy is spent below zero
    {"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0, "rounds": True},  # a bool is not a count
    {"epsilon": float("inf"), "delta": 1e-5, "noise_multiplier": 1.0, "rounds": 1},  # a guarantee of nothing
])
def test_a_release_with_privacy_metadata_no_version_sends_is_refused(dp):
    """What a release says of the privacy spent is shown to operators as it is: a field or mode nobody defined is
    refused, not shown."""
    section = wire.encode_tensors(params())
    payload = {"v": 1, "type": "model", "version": 1, "package_digest": b"p", "created_at": 1,
               "tensors_sha256": hashlib.sha256(section).digest(), "dp": dp}
    message = wire.sign(payload, AGGREGATOR, wire.key_id(AGGREGATOR.verify_key)) + section
    assert reason(wire.decode_model_release, message, AGGREGATOR.verify_key) == "bad-payload"

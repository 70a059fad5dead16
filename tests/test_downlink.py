"""The compressed downlink without HTTP: what the aggregator publishes (aggregator.models.ModelStore) and what a
device rebuilds from the steps (appliance.protocol.downlink) are the same bits, for every encoding, one version
or many behind; a device too far behind gets no delta; anything altered in a delta is refused."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import cbor2
import numpy as np
import pytest
from nacl.signing import SigningKey

from aggregator import models
from aggregator.models import ModelStore
from aggregator.simulate import synthetic_package
from appliance import wire
from appliance.errors import ProtocolError
from appliance.protocol import downlink

KEY = SigningKey(hashlib.sha256(b"downlink test aggregator").digest())
ENCODINGS = ("float16", "int8", "sparse")


def publish(directory: Path, encoding: str, versions: int, parameters: int = 3000, seed: int = 0,
            scale: float = 0.01) -> tuple[ModelStore, list[np.ndarray]]:
    """Versions 0..``versions`` as the round engine makes them: it keeps training from its own unrounded
    parameters (the targets, returned), the store publishes them rounded."""
    store = ModelStore(directory, synthetic_package(parameters, tensors=3), KEY, encoding)
    rng = np.random.default_rng(seed)
    target = store.initial_params()
    targets = [target]
    store.write(0, target, 1_764_288_000)
    for version in range(1, versions + 1):
        target = target + (rng.standard_normal(target.size) * scale).astype(np.float32)
        targets.append(target)
        store.write(version, target, 1_764_288_000 + version)
    return store, targets


def held(store: ModelStore, version: int) -> wire.ModelRelease:
    """What a device holds after fetching ``version`` in full."""
    data = store.release_bytes(version)
    assert data is not None
    return wire.decode_model_release(data, KEY.verify_key, store.layout.specs)


def assert_same_bits(rebuilt: wire.ModelRelease, published: wire.ModelRelease) -> None:
    assert rebuilt.digest == published.digest and rebuilt.version == published.version
    for name, array in published.tensors.items():
        assert rebuilt.tensors[name].dtype == np.float32
        assert rebuilt.tensors[name].tobytes() == array.tobytes(), name


# The most versions behind a delta still beats the full float32 model: 2 bytes a parameter per float16 step,
# 1 per int8 step, about 0.225 per sparse step.
DELTA_REACH = {"float16": 1, "int8": 3, "sparse": 6}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_device_rebuilds_each_published_version_bit_for_bit(tmp_path: Path, encoding: str) -> None:
    store, _ = publish(tmp_path, encoding, versions=6)
    specs = store.layout.specs
    for base, version in [(0, 1), (4, 5), (3, 5), (0, 3), (1, 6), (0, 6)]:  # k = 1, 2, 3, 5, 6
        holding = held(store, base)
        message, no_delta = store.delta(base, holding.digest, version)
        if version - base > DELTA_REACH[encoding]:
            # the steps would outweigh the full model: the device gets that
            assert (message, no_delta) == (None, "delta_not_smaller")
            continue
        assert message is not None
        full = store.release_bytes(version)
        assert full is not None and len(message) < len(full)
        rebuilt = downlink.decode_model_answer(message, KEY.verify_key, specs, holding)
        assert_same_bits(rebuilt, held(store, version))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_the_published_model_does_not_drift_from_the_trained_one(tmp_path: Path, encoding: str) -> None:
    """Each step carries what the previous one rounded away (the engine trains on from its unrounded target), so
    the gap stays the size of one step's rounding over 24 versions instead of growing with them."""
    store, targets = publish(tmp_path, encoding, versions=24)
    gaps = [float(np.abs(store.params(v) - targets[v]).max()) for v in range(1, 25)]
    one_round = 0.01 * 4.5  # the largest change of one round's N(0, 0.01) steps, with room
    bound = {"float16": 1e-3 * one_round, "int8": one_round / 127, "sparse": 3 * one_round}[encoding]
    assert max(gaps) < bound
    assert max(gaps[16:]) < 2 * max(gaps[:8])


def test_sparse_steps_carry_a_tenth_of_the_entries(tmp_path: Path) -> None:
    store, _ = publish(tmp_path, "sparse", versions=1, parameters=10_000)
    change = store.params(1) - store.params(0)
    assert np.count_nonzero(change) <= np.ceil(downlink.SPARSE_FRACTION * 10_000) + 3  # ceil per tensor
    step = store.step_path(1).read_bytes()
    assert len(step) < 10_000 * 0.25  # bitmap (1/8 byte each) + one int8 per kept entry


def test_an_unchanged_tensor_costs_its_bitmap_only(tmp_path: Path) -> None:
    """A frozen layer (an all-zero change) goes as a bitmap of zeros, not as dense zeros."""
    specs = [wire.ParamSpec("frozen", (8000,)), wire.ParamSpec("head", (10,))]
    base = {"frozen": np.ones(8000, np.float32), "head": np.zeros(10, np.float32)}
    target = {"frozen": base["frozen"], "head": np.arange(10, dtype=np.float32)}
    section = downlink.encode_step(base, target, specs, "int8")
    assert len(section) < 8000 // 8 + 100
    changes = downlink.decode_step(section, specs, wire.Limits())
    assert changes["frozen"].tobytes() == np.zeros(8000, np.float32).tobytes()


def test_a_base_older_than_the_kept_steps_gets_the_full_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(models, "KEEP_STEPS", 3)
    store, _ = publish(tmp_path, "int8", versions=6)
    assert sorted(p.name for p in tmp_path.glob("*.step")) == ["v00000004.step", "v00000005.step", "v00000006.step"]
    assert store.delta(2, held(store, 2).digest, 6) == (None, "base_too_old")  # 4 steps: more than are kept
    assert store.delta_bytes(3, held(store, 3).digest, 6) is not None


def test_a_base_the_aggregator_did_not_publish_gets_the_full_model(tmp_path: Path) -> None:
    store, _ = publish(tmp_path, "int8", versions=2)
    assert store.delta(1, hashlib.sha256(b"another model").digest(), 2) == (None, "base_unknown")


def test_full_downlink_publishes_the_exact_parameters_and_no_steps(tmp_path: Path) -> None:
    store, targets = publish(tmp_path, "full", versions=2)
    assert store.params(2).tobytes() == targets[2].tobytes()
    assert not list(tmp_path.glob("*.step"))
    assert store.delta(1, held(store, 1).digest, 2) == (None, "downlink_off")
    assert store.delta(1, hashlib.sha256(b"another model").digest(), 2) == (None, "downlink_off")


def test_a_change_float16_cannot_hold_is_published_in_full(tmp_path: Path) -> None:
    store, _ = publish(tmp_path, "float16", versions=1)
    huge = store.params(1) + np.float32(70_000.0)
    store.write(2, huge, 1_764_288_010)
    assert store.params(2).tobytes() == huge.tobytes()  # exact: no step was possible
    assert not store.step_path(2).exists()
    assert store.delta(1, held(store, 1).digest, 2) == (None, "steps_missing")


# ------------------------------------------------------------------------------------------ refusals


def delta_message(store: ModelStore, base: int, version: int) -> bytes:
    message = store.delta_bytes(base, held(store, base).digest, version)
    assert message is not None
    return message


def resigned(store: ModelStore, base: int, steps: list[bytes], version: int | None = None,
             model_digest: bytes | None = None) -> bytes:
    """A delta signed by the genuine key around other steps: what an aggregator bug would send."""
    version = base + len(steps) if version is None else version
    return downlink.encode_model_delta(
        version=version, base_version=base, base_digest=held(store, base).digest,
        model_digest=model_digest or held(store, version).digest, package_digest=store.package_digest,
        created_at=1, steps=steps, key=KEY,
    )


def refusal(store: ModelStore, message: bytes, base: int) -> str:
    with pytest.raises(ProtocolError) as caught:
        downlink.decode_model_answer(message, KEY.verify_key, store.layout.specs, held(store, base))
    return caught.value.reason


def test_a_changed_byte_in_the_steps_is_refused(tmp_path: Path) -> None:
    store, _ = publish(tmp_path, "int8", versions=2)
    message = bytearray(delta_message(store, 0, 2))
    message[-3] ^= 0x01
    assert refusal(store, bytes(message), 0) == "digest-mismatch"


def test_steps_that_rebuild_another_model_are_refused(tmp_path: Path) -> None:
    """Validly signed and well formed, but the result is not the model the signed digest names."""
    store, _ = publish(tmp_path, "int8", versions=2)
    wrong = resigned(store, 0, [store.step_path(2).read_bytes()[64:]], version=1)
    assert refusal(store, wrong, 0) == "digest-mismatch"


def test_a_delta_from_another_base_is_refused(tmp_path: Path) -> None:
    store, _ = publish(tmp_path, "int8", versions=2)
    with pytest.raises(ProtocolError) as caught:
        downlink.decode_model_answer(delta_message(store, 1, 2), KEY.verify_key, store.layout.specs, held(store, 0))
    assert caught.value.reason == "wrong-model"
    with pytest.raises(ProtocolError) as caught:
        downlink.decode_model_answer(delta_message(store, 1, 2), KEY.verify_key, store.layout.specs, None)
    assert caught.value.reason == "wrong-type"


@pytest.mark.parametrize("held_instead", [
    {"digest": b"\x01" * 32},  # another model numbered as the delta's base (an aggregator started anew, say)
    {"version": 7},  # the base's parameters under another number
    {"package_digest": b"\x02" * 32},  # the same numbers for another model package
])
def test_a_delta_is_applied_only_to_the_very_base_it_names(tmp_path: Path, held_instead: dict) -> None:
    """Refused before any step is applied, as the wrong base, rather than found out from the rebuilt digest."""
    store, _ = publish(tmp_path, "int8", versions=2)
    base = dataclasses.replace(held(store, 1), **held_instead)
    with pytest.raises(ProtocolError) as caught:
        downlink.decode_model_answer(delta_message(store, 1, 2), KEY.verify_key, store.layout.specs, base)
    assert caught.value.reason == "wrong-model"


def test_a_step_that_overflows_float32_on_its_base_is_refused() -> None:
    """Each step is finite, yet base + step is not: the device refuses the model rather than train on infinities."""
    base = {"w": np.full(3, 3e38, dtype=np.float32)}
    with pytest.raises(ProtocolError) as caught:
        downlink.apply_step(base, {"w": np.full(3, 3e38, dtype=np.float32)})
    assert caught.value.reason == "not-finite"


def test_a_delta_signed_by_another_key_is_refused(tmp_path: Path) -> None:
    store, _ = publish(tmp_path, "int8", versions=1)
    forged = downlink.encode_model_delta(
        version=1, base_version=0, base_digest=held(store, 0).digest, model_digest=held(store, 1).digest,
        package_digest=store.package_digest, created_at=1, steps=[store.step_path(1).read_bytes()[64:]],
        key=SigningKey.generate(),
    )
    assert refusal(store, forged, 0) == "unknown-key"




def _sparse(mask: bytes, values: bytes, dims: list[int]) -> list:
    return [dims, mask, [cbor2.CBORTag(wire.TAG_SINT8, values), 0.5]]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("bitmap-too-short", "bad-tensor"),
        ("more-values-than-bits", "bad-tensor"),
        ("bits-past-the-end", "bad-tensor"),
        ("missing-tensor", "wrong-tensors"),
        ("wrong-dims", "wrong-shape"),
        ("float32-dense", "unknown-tag"),
        ("int8-without-scale", "bad-tensor"),
        ("zero-scale", "bad-tensor"),
        ("scale-past-float32", "bad-tensor"),  # 127 x scale overflows float32
        ("sparse-values-not-a-pair", "bad-tensor"),
        ("sparse-values-not-typed", "bad-tensor"),
        ("float16-values-of-odd-bytes", "bad-tensor"),
        ("a-bit-past-the-end-beside-one-counted", "bad-tensor"),  # one value for the one bit within
        ("dense-int8-not-a-pair", "bad-tensor"),
        ("dense-of-other-dims", "wrong-shape"),  # one value that would broadcast over the tensor
        ("dense-int8-without-scale", "bad-tensor"),
        ("a-name-that-is-not-text", "bad-tensor"),
        ("an-extra-tensor", "wrong-tensors"),
    ],
)
def test_malformed_steps_are_refused_with_a_reason(case: str, reason: str) -> None:
    specs = [wire.ParamSpec("a", (10,)), wire.ParamSpec("b", (3,))]
    good_b = [cbor2.CBORTag(wire.TAG_MULTI_DIM, [[3], cbor2.CBORTag(wire.TAG_SINT8, b"\x01\x02\x03")]), 0.5]
    forms = {
        "bitmap-too-short": {"a": _sparse(b"\x01", b"\x01", [10]), "b": good_b},
        "more-values-than-bits": {"a": _sparse(b"\x01\x00", b"\x01\x02", [10]), "b": good_b},
        "bits-past-the-end": {"a": _sparse(b"\x00\x04", b"\x01", [10]), "b": good_b},
        "missing-tensor": {"a": _sparse(b"\x01\x00", b"\x01", [10])},
        "wrong-dims": {"a": _sparse(b"\x01\x00", b"\x01", [2, 5]), "b": good_b},
        "float32-dense": {"a": _sparse(b"\x01\x00", b"\x01", [10]),
                          "b": cbor2.CBORTag(wire.TAG_MULTI_DIM, [[3], cbor2.CBORTag(wire.TAG_FLOAT32_LE, bytes(12))])},
        "int8-without-scale": {"a": [[10], b"\x01\x00", cbor2.CBORTag(wire.TAG_SINT8, b"\x01")], "b": good_b},
        "zero-scale": {"a": _sparse(b"\x01\x00", b"\x01", [10]),
                       "b": [cbor2.CBORTag(wire.TAG_MULTI_DIM, [[3], cbor2.CBORTag(wire.TAG_SINT8, bytes(3))]), 0.0]},
        "scale-past-float32": {"a": _sparse(b"\x01\x00", b"\x01", [10]),
                               "b": [cbor2.CBORTag(wire.TAG_MULTI_DIM, [[3], cbor2.CBORTag(wire.TAG_SINT8,
                                                                                         b"\x7f\x7f\x7f")]), 1e300]},
        "sparse-values-not-a-pair": {"a": [[10], b"\x01\x00", [cbor2.CBORTag(wire.TAG_SINT8, b"\x01"), 0.5, 0.5]],
                                     "b": good_b},
        "sparse-values-not-typed": {"a": [[10], b"\x01\x00", [cbor2.CBORTag(wire.TAG_MULTI_DIM, [[1], b"\x01"]), 0.5]],
                                    "b": good_b},
        "float16-values-of-odd-bytes": {"a": [[10], b"\x01\x00", cbor2.CBORTag(wire.TAG_FLOAT16_LE, b"\0\0\0")],
                                        "b": good_b},
        "a-bit-past-the-end-beside-one-counted": {"a": _sparse(b"\x01\x04", b"\x01", [10]), "b": good_b},
        "dense-int8-not-a-pair": {"a": _sparse(b"\x01\x00", b"\x01", [10]), "b": [*good_b, 0.5, 0.5]},
        "dense-of-other-dims": {"a": _sparse(b"\x01\x00", b"\x01", [10]),
                                "b": [cbor2.CBORTag(wire.TAG_MULTI_DIM, [[1], cbor2.CBORTag(wire.TAG_SINT8, b"\x01")]),
                                      0.5]},
        "dense-int8-without-scale": {"a": _sparse(b"\x01\x00", b"\x01", [10]), "b": good_b[0]},
        "a-name-that-is-not-text": {"a": _sparse(b"\x01\x00", b"\x01", [10]), "b": good_b, 1: good_b},
        "an-extra-tensor": {"a": _sparse(b"\x01\x00", b"\x01", [10]), "b": good_b, "c": good_b},
    }[case]
    with pytest.raises(ProtocolError) as caught:
        downlink.decode_step(cbor2.dumps(forms, canonical=True), specs, wire.Limits())
    assert caught.value.reason == reason


@pytest.mark.parametrize(("steps", "version"), [(0, 3), (2, 4), (downlink.MAX_STEPS + 1, 3 + downlink.MAX_STEPS + 1)])
def test_an_aggregator_never_signs_a_delta_whose_steps_do_not_lead_to_its_version(steps: int, version: int) -> None:
    with pytest.raises(ValueError, match="steps cannot lead from version 3"):
        downlink.encode_model_delta(version=version, base_version=3, base_digest=bytes(32), model_digest=bytes(32),
                                    package_digest=bytes(32), created_at=1, steps=[b"\xa0"] * steps, key=KEY)


def test_a_payload_promising_other_steps_than_it_carries_is_refused(tmp_path: Path) -> None:
    store, _ = publish(tmp_path, "int8", versions=2)
    one_step = resigned(store, 0, [store.step_path(1).read_bytes()[64:]])
    envelope_end = len(one_step) - len(store.step_path(1).read_bytes()[64:]) - 1
    payload = cbor2.loads(cbor2.loads(one_step[:envelope_end]).value[2])
    assert payload["version"] - payload["base_version"] == 1
    # claim two versions forward with the one step: the section is an array of 1, the payload says 2
    section = b"\x81" + store.step_path(1).read_bytes()[64:]
    body = {**payload, "version": 2, "section_sha256": hashlib.sha256(section).digest()}
    forged = wire.sign(body, KEY, wire.key_id(KEY.verify_key)) + section
    assert refusal(store, forged, 0) == "bad-tensor"


@pytest.mark.parametrize(("field", "value"), [("created_at", -1), ("created_at", True), ("base_digest", bytes(31)),
                                            ("model_digest", b"short"), ("package_digest", "ab" * 32)])
def test_a_delta_whose_signed_fields_are_not_of_their_kind_is_refused(tmp_path: Path, field: str, value) -> None:
    store, _ = publish(tmp_path, "int8", versions=1)
    step = store.step_path(1).read_bytes()[64:]
    message = resigned(store, 0, [step])
    section = message[len(message) - len(step) - 1 :]
    payload = cbor2.loads(cbor2.loads(message[: len(message) - len(section)]).value[2])
    forged = wire.sign({**payload, field: value}, KEY, wire.key_id(KEY.verify_key)) + section
    assert refusal(store, forged, 0) == "bad-payload"


def test_a_delta_that_does_not_go_forward_is_refused(tmp_path: Path) -> None:
    """From version 0 to version 0 in no steps: refused from the signed payload, whatever its section holds."""
    store, _ = publish(tmp_path, "int8", versions=1)
    step = store.step_path(1).read_bytes()[64:]
    message = resigned(store, 0, [step])
    payload = cbor2.loads(cbor2.loads(message[: len(message) - len(step) - 1]).value[2])
    section = b"\x80"  # no steps
    body = {**payload, "version": 0, "model_digest": held(store, 0).digest,
            "section_sha256": hashlib.sha256(section).digest()}
    assert refusal(store, wire.sign(body, KEY, wire.key_id(KEY.verify_key)) + section, 0) == "bad-payload"

"""Decoding a tensor section straight into one flat float32 vector (``decode_tensors(..., into=...)``), as the
aggregator does with every upload: the same values, bit for bit, as decoding and then flattening, in the specs'
order whatever the section's key order, and the same refusals."""

from __future__ import annotations

import numpy as np
import pytest
from nacl.signing import SigningKey

from appliance import wire
from appliance.wire import ParamSpec, ProtocolError

# Listed out of the section's canonical key order (shorter keys first), so the specs' order is what counts.
SPECS = [ParamSpec("layer.weight", (3, 5)), ParamSpec("b", (7,)), ParamSpec("conv", (2, 2, 2))]
SIZE = sum(spec.size for spec in SPECS)


def _tensors(seed: int = 0, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {spec.name: (rng.standard_normal(spec.shape) * scale).astype(np.float32) for spec in SPECS}


@pytest.mark.parametrize("encoding", wire.ENCODINGS)
def test_the_flat_vector_holds_what_decoding_then_flattening_gives_bit_for_bit(encoding: str) -> None:
    section = wire.encode_tensors(_tensors(scale=3.0), encoding)
    decoded, decoded_encoding = wire.decode_tensors(section, SPECS)
    flat = np.empty(SIZE, dtype=np.float32)
    views, into_encoding = wire.decode_tensors(section, SPECS, into=flat)
    expected = np.concatenate([decoded[spec.name].reshape(-1) for spec in SPECS])
    assert into_encoding == decoded_encoding == encoding
    assert flat.view(np.uint32).tolist() == expected.view(np.uint32).tolist()
    for spec in SPECS:
        assert views[spec.name].shape == spec.shape and np.shares_memory(views[spec.name], flat)


def test_an_update_decoded_into_a_vector_is_the_update_decoded_as_usual() -> None:
    key = SigningKey.generate()
    kid = wire.key_id(key.verify_key)
    update = wire.Update(kid, 4, 2, b"\x01" * 32, 9, _tensors(), metrics={"loss": 0.5}, encoding="int8")
    body = wire.encode_update(update, key)
    flat = np.empty(SIZE, dtype=np.float32)
    into = wire.decode_update(body, wire.pinned(key.verify_key), SPECS, into=flat)
    usual = wire.decode_update(body, wire.pinned(key.verify_key), SPECS)
    assert (into.device_id, into.round_id, into.num_samples, into.metrics, into.nonce) == (
        usual.device_id, usual.round_id, usual.num_samples, usual.metrics, usual.nonce
    )
    for spec in SPECS:
        np.testing.assert_array_equal(into.tensors[spec.name], usual.tensors[spec.name])


@pytest.mark.parametrize("encoding", ["float32", "float16"])
def test_a_non_finite_value_is_refused_naming_its_tensor(encoding: str) -> None:
    tensors = _tensors()
    tensors["conv"][1, 0, 1] = np.inf if encoding == "float32" else np.nan
    section = wire.encode_tensors(tensors, encoding)
    with pytest.raises(ProtocolError) as refused:
        wire.decode_tensors(section, SPECS, into=np.empty(SIZE, dtype=np.float32))
    assert refused.value.reason == "not-finite" and "'conv'" in refused.value.detail
    # finite=False leaves the check to the caller (the aggregator's norm), who names the tensor the same way
    views, _ = wire.decode_tensors(section, SPECS, into=np.empty(SIZE, dtype=np.float32), finite=False)
    assert not np.isfinite(views["conv"][1, 0, 1])
    with pytest.raises(ProtocolError) as refused:
        wire.check_finite(views)
    assert refused.value.reason == "not-finite" and "'conv'" in refused.value.detail


def test_a_section_that_does_not_match_the_specs_is_refused_before_anything_is_written() -> None:
    section = wire.encode_tensors({**_tensors(), "b": np.zeros(8, np.float32)})
    flat = np.full(SIZE, 7.0, dtype=np.float32)
    with pytest.raises(ProtocolError) as refused:
        wire.decode_tensors(section, SPECS, into=flat)
    assert refused.value.reason == "wrong-shape" and (flat == 7.0).all()


def test_a_vector_of_the_wrong_size_or_type_is_a_programming_error() -> None:
    section = wire.encode_tensors(_tensors())
    for bad in (np.empty(SIZE + 1, np.float32), np.empty(SIZE, np.float64), np.empty((SIZE, 2), np.float32)[:, 0]):
        with pytest.raises(ValueError):
            wire.decode_tensors(section, SPECS, into=bad)

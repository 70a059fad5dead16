"""Model packages: signed, content-addressed round trip; unsigned, tampered and malformed packages refused."""

from __future__ import annotations

import re

import cbor2
import numpy as np
import pytest
from nacl.signing import SigningKey

from appliance import modelpkg, wire
from appliance.modelpkg import ModelPackage, PackageError, decode_package, encode_package, load_package, write_package
from appliance.wire import ParamSpec

KEY = SigningKey(bytes(range(32)))


def _package(**over) -> ModelPackage:
    rng = np.random.default_rng(0)
    fields = dict(
        name="tiny",
        param_specs=[ParamSpec("fc.weight", (3, 4)), ParamSpec("fc.bias", (3,))],
        initial_params={"fc.weight": rng.normal(size=(3, 4)).astype(np.float32), "fc.bias": np.zeros(3, np.float32)},
        training_graph=b"training-graph-bytes",
        inference_graph=b"inference-graph-bytes",
        optimizer={"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.01},
        preprocessing={"input_shape": [4], "mean": 0.5, "std": 0.25, "input_range": [0.0, 1.0]},
        num_classes=3,
        task="three classes",
        class_names=["a", "b", "c"],
    )
    fields.update(over)
    return ModelPackage(**fields)


def test_round_trip_keeps_everything_and_names_the_content(tmp_path):
    pkg = _package()
    path = tmp_path / "tiny.flpkg"
    digest = write_package(path, pkg, KEY)
    loaded = load_package(path, KEY.verify_key)
    assert loaded.digest == digest and len(digest) == 32
    assert loaded.name == "tiny" and loaded.num_classes == 3 and loaded.class_names == ["a", "b", "c"]
    assert loaded.param_specs == pkg.param_specs
    assert list(loaded.initial_params) == ["fc.weight", "fc.bias"]  # spec order, not CBOR key order
    for k, v in pkg.initial_params.items():
        np.testing.assert_array_equal(loaded.initial_params[k], v)
        assert loaded.initial_params[k].dtype == np.float32
    assert loaded.training_graph == pkg.training_graph and loaded.inference_graph == pkg.inference_graph
    assert loaded.optimizer == pkg.optimizer and loaded.preprocessing == pkg.preprocessing


def test_digest_depends_on_content_only():
    _, da = encode_package(_package(), KEY)
    _, db = encode_package(_package(), SigningKey(bytes(32)))  # other signer, same content
    assert da == db
    _, dc = encode_package(_package(optimizer={"name": "sgd", "lr": 0.1}), KEY)
    assert dc != da
    params = _package().initial_params
    params["fc.bias"] = params["fc.bias"] + 1e-6
    _, dd = encode_package(_package(initial_params=params), KEY)
    assert dd != da


def test_wrong_key_is_refused():
    data, _ = encode_package(_package(), KEY)
    with pytest.raises(PackageError, match="not signed by the pinned aggregator key") as exc:
        decode_package(data, SigningKey(bytes(32)).verify_key)
    assert exc.value.reason == "unknown-key"


def test_unsigned_package_is_refused():
    pkg = _package()
    body = cbor2.dumps(modelpkg._content(pkg), canonical=True)
    with pytest.raises(PackageError) as exc:
        decode_package(body, KEY.verify_key)
    assert exc.value.reason == "not-signed"


@pytest.mark.parametrize("where", ["content-start", "content-middle", "content-end"])
def test_tampered_content_is_refused(where):
    data, _ = encode_package(_package(), KEY)
    envelope_len = len(data) - len(cbor2.dumps(modelpkg._content(_package()), canonical=True))
    pos = {"content-start": envelope_len, "content-middle": (envelope_len + len(data)) // 2,
           "content-end": len(data) - 1}[where]
    bad = bytearray(data)
    bad[pos] ^= 0x01
    with pytest.raises(PackageError) as exc:
        decode_package(bytes(bad), KEY.verify_key)
    assert exc.value.reason == "digest-mismatch"


def test_tampered_envelope_is_refused():
    data, _ = encode_package(_package(), KEY)
    envelope_len = len(data) - len(cbor2.dumps(modelpkg._content(_package()), canonical=True))
    assert envelope_len > 100
    for pos in range(envelope_len):  # every byte of the signed envelope
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(PackageError):
            decode_package(bytes(bad), KEY.verify_key)


def test_other_signed_message_is_not_a_package():
    msg = wire.sign({"v": 1, "type": "task"}, KEY, wire.key_id(KEY.verify_key))
    with pytest.raises(PackageError, match="not a model package"):
        decode_package(msg, KEY.verify_key)


def test_signed_but_malformed_content_is_refused_naming_the_field():
    content = modelpkg._content(_package())
    content["preprocessing"] = {"input_shape": "4"}
    body = cbor2.dumps(content, canonical=True)
    payload = {"v": 1, "type": "model-package", "format": 1, "name": "tiny",
               "content_sha256": modelpkg.content_digest(body), "content_bytes": len(body)}
    data = wire.sign(payload, KEY, wire.key_id(KEY.verify_key)) + body
    with pytest.raises(PackageError, match=r"preprocessing.input_shape") as exc:
        decode_package(data, KEY.verify_key)
    assert exc.value.reason == "bad-content"


def test_writer_refuses_parameters_that_do_not_match_the_specs():
    with pytest.raises(PackageError, match=r"fc.bias has shape \(4,\), spec says \(3,\)"):
        encode_package(_package(initial_params={"fc.weight": np.zeros((3, 4), np.float32),
                                                "fc.bias": np.zeros(4, np.float32)}), KEY)
    with pytest.raises(PackageError, match="optimizer"):
        encode_package(_package(optimizer={"name": "lbfgs"}), KEY)


def test_missing_file_error_names_it(tmp_path):
    with pytest.raises(PackageError, match=r"missing\.flpkg: cannot read"):
        load_package(tmp_path / "missing.flpkg", KEY.verify_key)


def test_preprocess_normalises_and_checks_shape():
    pkg = _package()
    out = pkg.preprocess(np.full((2, 4), 0.75, np.float32))
    np.testing.assert_allclose(out, 1.0)
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match=r"per-sample shape \(5,\)"):
        pkg.preprocess(np.zeros((2, 5), np.float32))


def test_optional_fields_round_trip_and_are_absent_by_default(tmp_path):
    plain = modelpkg._content(_package())
    assert "labels" not in plain and "buffers" not in plain and "evaluation" not in plain["graphs"]
    stats = {"bn.running_mean": np.arange(3, dtype=np.float32)}
    pkg = _package(labels={"dtype": "float32", "shape": [3, 2, 2]}, buffer_names=["bn.running_mean"],
                   buffer_policy="local", local_buffers=stats, evaluation_graph=b"evaluation-graph-bytes",
                   num_classes=1)
    path = tmp_path / "local.flpkg"
    write_package(path, pkg, KEY)
    loaded = load_package(path, KEY.verify_key)
    assert loaded.labels == {"dtype": "float32", "shape": [3, 2, 2]} and not loaded.class_labels
    assert loaded.label_shape == (3, 2, 2) and loaded.num_classes == 1
    assert loaded.buffer_policy == "local" and loaded.buffer_names == ["bn.running_mean"]
    np.testing.assert_array_equal(loaded.local_buffers["bn.running_mean"], stats["bn.running_mean"])
    assert loaded.evaluation_graph == b"evaluation-graph-bytes"
    assert loaded.trainable_names == ["fc.weight", "fc.bias"]


def test_aggregated_buffers_are_parameters_the_optimiser_leaves_alone():
    rng = np.random.default_rng(1)
    params = {**_package().initial_params, "bn.running_var": rng.random(3).astype(np.float32)}
    pkg = _package(param_specs=[*_package().param_specs, ParamSpec("bn.running_var", (3,))], initial_params=params,
                   buffer_names=["bn.running_var"])
    data, _ = encode_package(pkg, KEY)
    loaded = decode_package(data, KEY.verify_key)
    assert [s.name for s in loaded.param_specs] == ["fc.weight", "fc.bias", "bn.running_var"]
    assert loaded.trainable_names == ["fc.weight", "fc.bias"] and loaded.buffer_policy == "aggregate"


@pytest.mark.parametrize("over,match", [
    ({"buffer_names": ["bn.running_mean"]}, r"aggregated buffers \['bn.running_mean'\] are not in params"),
    ({"buffer_names": ["fc.bias"], "buffer_policy": "local", "local_buffers": {"fc.bias": np.zeros(3, np.float32)}},
     "local buffers must be outside params"),
    ({"buffer_names": ["x"], "buffer_policy": "fedbn"}, "buffers.policy must be one of"),
    ({"labels": {"dtype": "float64", "shape": []}}, "labels.dtype must be one of"),
    ({"labels": {"dtype": "int64", "shape": [0]}}, "labels must be"),
    ({"optimizer": {"name": "sgd", "lr": 0.05, "max_grad_norm": 0}}, "'max_grad_norm' must be a finite number > 0"),
    ({"optimizer": {"name": "sgd", "lr": 0.05, "max_grad_norm": float("inf")}},
     "'max_grad_norm' must be a finite number > 0"),
])
def test_bad_optional_fields_are_refused(over, match):
    with pytest.raises(PackageError, match=match):
        encode_package(_package(**over), KEY)


NAN, INF = float("nan"), float("inf")
ADAMW = {"name": "adamw", "lr": 0.001, "betas": [0.9, 0.999], "weight_decay": 0.01}
PREPROCESSING = {"input_shape": [4], "mean": 0.5, "std": 0.25, "input_range": [0.0, 1.0]}
INSANE_NUMBERS = [
    *[("optimizer", {**ADAMW, "lr": v}, "optimizer field 'lr' must be a number in (0, 1000]")
      for v in (NAN, INF, 0, -0.1, 1e300, 1001)],
    *[("optimizer", {**ADAMW, "momentum": v}, "optimizer field 'momentum' must be a number in [0, 1)")
      for v in (NAN, 1.0, -0.5, [0.9])],
    *[("optimizer", {**ADAMW, "weight_decay": v}, "optimizer field 'weight_decay' must be a number in [0, 1000]")
      for v in (NAN, -INF, -0.01, -(2**63), 1e19)],
    *[("optimizer", {**ADAMW, "eps": v}, "optimizer field 'eps' must be a number in (0, 1000]")
      for v in (NAN, 0.0, 1e30)],
    *[("optimizer", {**ADAMW, "betas": v}, "optimizer field 'betas' must be two numbers in [0, 1)")
      for v in ([0.9], [NAN, 0.999], [0.9, 1.0], [0.9, INF], 0.9)],
    ("optimizer", {**ADAMW, "dampening": NAN}, "optimizer field 'dampening' must be a finite number"),
    *[("preprocessing", {**PREPROCESSING, "mean": v}, "preprocessing field 'mean' must be a number in [-1e+06, 1e+06]")
      for v in (NAN, INF, -INF, 1e39, "0.5", 1e30)],
    *[("preprocessing", {**PREPROCESSING, "std": v}, "preprocessing field 'std' must be a number in [1e-06, 1e+06]")
      for v in (NAN, INF, 0.0, -1.0, 1e-40, 1e-30, 1e7)],
    *[("preprocessing", {**PREPROCESSING, "input_range": v},
       "preprocessing field 'input_range' must be two numbers [low, high] in [-1e+06, 1e+06]")
      for v in ([1.0, 0.0], [0.0, NAN], [0.0], [0.0, INF], [0.0, 1e30])],
    # Finite, and past any real model: each failed every round in the trainer (docs/package.md, "Bounds").
    ("preprocessing", {**PREPROCESSING, "input_shape": [2**62]},
     "preprocessing.input_shape [4611686018427387904] holds 4611686018427387904 values per sample, more than the "
     "268435456 (2^28)"),
    ("preprocessing", {**PREPROCESSING, "input_shape": [3, 2**14, 2**14]},
     "preprocessing.input_shape [3, 16384, 16384] holds 805306368 values per sample"),
    ("labels", {"dtype": "float32", "shape": [2**20, 2**20]}, "labels.shape [1048576, 1048576] holds"),
    ("num_classes", 2**40, "num_classes must be in [2, 16777216] (2^24), got 1099511627776"),
    # Taken when made, refused by every device (CBOR true, 3.0): checked as the decoder reads it, at both ends.
    ("num_classes", True, "num_classes must be in [2, 16777216] (2^24), got True (not an integer)"),
    ("num_classes", 3.0, "num_classes must be in [2, 16777216] (2^24), got 3.0 (not an integer)"),
    ("detection", {"kind": "centre-heatmap", "stride": 2**40, "classes": 1},
     "detection field 'stride' must be at most 4096, got 1099511627776"),
    ("detection", {"kind": "centre-heatmap", "stride": 4, "classes": 2**30},
     "detection field 'classes' must be at most 16777216, got 1073741824"),
]


def signed_content(content: dict, key: SigningKey = KEY) -> bytes:
    """A package of ``content`` as it stands, signed by the aggregator ``key``: what an aggregator that does not check
    (or a hostile one holding the key) would serve."""
    body = cbor2.dumps(content, canonical=True)
    payload = {"v": 1, "type": "model-package", "format": 1, "name": "tiny",
               "content_sha256": modelpkg.content_digest(body), "content_bytes": len(body)}
    return wire.sign(payload, key, wire.key_id(key.verify_key)) + body


def signed_unchecked(pkg: ModelPackage, key: SigningKey = KEY) -> bytes:
    """``pkg`` signed without the checks encode_package makes (see :func:`signed_content`)."""
    return signed_content(modelpkg._content(pkg), key)


@pytest.mark.parametrize("field, spec, match", INSANE_NUMBERS)
def test_a_package_whose_numbers_a_device_cannot_train_with_is_refused_naming_the_field(field, spec, match):
    """NaN, infinities and numbers out of the trainer's range or past any real model (docs/package.md, "Bounds"), in
    the optimiser, the preprocessing, the labels, the classes or the detection layout: refused when
    the package is made, and refused by a device (bad-content, naming the field) when a signed one arrives all the
    same, before it is kept or trained on."""
    with pytest.raises(PackageError, match=re.escape(match)):
        encode_package(_package(**{field: spec}), KEY)
    content = {**modelpkg._content(_package()), field: spec}  # signed all the same
    with pytest.raises(PackageError, match=re.escape(f"package from the aggregator: {match}")) as refused:
        decode_package(signed_content(content), KEY.verify_key, origin="package from the aggregator")
    assert refused.value.reason == "bad-content"
    assert refused.value.digest == modelpkg.content_digest(cbor2.dumps(content, canonical=True))


def test_only_a_refusal_of_content_that_matched_its_signed_digest_names_that_digest():
    """A device does not download again a package refused for its content (the digest names it); a refusal of the
    envelope or of content that does not match the signed digest (a transfer gone wrong) names none."""
    data = bytearray(signed_unchecked(_package(optimizer={"name": "sgd", "lr": float("nan")})))
    with pytest.raises(PackageError) as other_key:
        decode_package(bytes(data), SigningKey(bytes(32)).verify_key)
    data[-1] ^= 1
    with pytest.raises(PackageError) as damaged:
        decode_package(bytes(data), KEY.verify_key)
    assert (other_key.value.digest, damaged.value.reason, damaged.value.digest) == (b"", "digest-mismatch", b"")


def test_a_package_whose_reading_runs_out_of_memory_is_not_refused_for_its_content(monkeypatch):
    """Memory short on the device while it reads a good package (cbor2's C decoder raises MemoryError) is the
    device's trouble, not the content's: refused as bad-content naming the digest, the agent never downloaded it
    again while tasks named it (appliance/agent.py, Agent._ensure_package), and skipped every round on it."""
    data, digest = encode_package(_package(), KEY)

    def out_of_memory(body):
        raise MemoryError

    monkeypatch.setattr(modelpkg.cbor2, "loads", out_of_memory)
    with pytest.raises(MemoryError):
        decode_package(data, KEY.verify_key)
    monkeypatch.undo()
    assert decode_package(data, KEY.verify_key).digest == digest  # taken once memory allows


def test_the_numbers_every_package_has_used_are_still_taken():
    for optimizer in ({"name": "sgd"}, {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
                                       "max_grad_norm": 5.0}, {"name": "momentum", "lr": 1}, ADAMW):
        for preprocessing in ({"input_shape": [4]}, {**PREPROCESSING, "mean": -3, "std": 255}):
            data, _ = encode_package(_package(optimizer=optimizer, preprocessing=preprocessing), KEY)
            assert decode_package(data, KEY.verify_key).optimizer == optimizer


def test_a_single_class_needs_target_labels():
    content = modelpkg._content(_package())
    content["num_classes"] = 1
    with pytest.raises(PackageError, match=re.escape("num_classes must be in [2, 16777216]")):
        decode_package(signed_content(content), KEY.verify_key)


@pytest.mark.parametrize("place", ["optimizer", "input_shape", "param_shape", "class_names"])
def test_an_integer_of_thousands_of_digits_anywhere_is_refused_as_bad_content(place):
    """A CBOR bignum past Python's 4,300-digit limit: the error naming the field raised ValueError from its repr (the
    agent's round loop takes PackageError), or the package was taken with it as an input dimension."""
    content = modelpkg._content(_package())
    huge = 10**5000
    if place == "optimizer":
        content["optimizer"]["lr"] = huge
    elif place == "input_shape":
        content["preprocessing"]["input_shape"] = [huge]
    elif place == "param_shape":
        content["params"][0]["shape"] = [huge, 4]
    else:
        content["class_names"] = ["a", "b", [huge]]
    with pytest.raises(PackageError, match="content holds an integer past 64 bits") as refused:
        decode_package(signed_content(content), KEY.verify_key)
    assert refused.value.reason == "bad-content"

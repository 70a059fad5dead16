"""The reference models' ONNX training graphs against torch autograd, and the export refusing a wrong graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="torch (a tools/dev dependency) is needed to check gradients")

from appliance.modelpkg import PackageError, load_package  # noqa: E402
from flctl import model, refmodels  # noqa: E402


def _params(spec: refmodels.ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in refmodels.torch_module(spec).named_parameters()}


def _batch_scaled(graph: bytes) -> bytes:
    """The known export bug: gradients of a *sum* loss next to a *mean* loss (scaled by the batch size)."""
    m = onnx.load_from_string(graph)
    for node in m.graph.node:
        if node.output[0] == "dlogits":
            assert node.op_type == "Div"
            node.op_type = "Identity"
            del node.input[1]
    return m.SerializeToString()


@pytest.mark.parametrize("key", sorted(refmodels.MODELS))
def test_reference_graphs_match_torch_autograd(key):
    spec = refmodels.MODELS[key]
    for seed in (0, 1):
        report = model.check_against_torch(
            spec, refmodels.training_graph(spec), refmodels.inference_graph(spec), _params(spec, seed), seed=seed
        )
        assert report.batch_sizes == model.CHECK_BATCH_SIZES
        assert max(report.max_grad_error.values()) < 1e-4
        assert set(report.max_grad_error) == set(refmodels.param_shapes(spec))


@pytest.mark.parametrize("key", sorted(refmodels.MODELS))
def test_graphs_take_parameters_as_inputs_with_a_dynamic_batch(key):
    spec = refmodels.MODELS[key]
    g = onnx.load_from_string(refmodels.training_graph(spec)).graph
    inputs = [i.name for i in g.input]
    assert inputs == ["input", "labels", *refmodels.param_shapes(spec)]
    assert not g.initializer or all(t.name not in inputs for t in g.initializer)
    assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert [o.name for o in g.output] == ["loss", *("grad:" + n for n in refmodels.param_shapes(spec))]
    assert onnx.load_from_string(refmodels.training_graph(spec)).opset_import[0].version <= 21


@pytest.mark.parametrize("key", sorted(refmodels.MODELS))
def test_gradient_scaled_by_batch_size_is_refused(key):
    spec = refmodels.MODELS[key]
    bad = _batch_scaled(refmodels.training_graph(spec))
    with pytest.raises(model.GradientCheckError, match=r"gradient of .* differs from torch autograd"):
        model.check_against_torch(spec, bad, refmodels.inference_graph(spec), _params(spec))


def test_batch_scaled_gradient_agrees_at_batch_one_so_one_size_is_not_enough():
    spec = refmodels.MLP
    bad = _batch_scaled(refmodels.training_graph(spec))
    # the bug is invisible at batch size 1: this is why the check uses several sizes
    model.check_against_torch(spec, bad, refmodels.inference_graph(spec), _params(spec), batch_sizes=(1,))


def test_export_with_a_wrong_graph_writes_nothing(tmp_path, monkeypatch, capsys):
    key_file = tmp_path / "aggregator.key"
    key_file.write_text("11" * 32 + "\n")
    good = refmodels.training_graph
    monkeypatch.setattr(refmodels, "training_graph", lambda spec: _batch_scaled(good(spec)))
    out = tmp_path / "cnn.flpkg"
    parser = _parser()
    args = parser.parse_args(["model", "export", "--model", "cnn", "--out", str(out), "--key", str(key_file)])
    assert args.func(args) == 1
    assert not out.exists()
    err = capsys.readouterr().err
    assert "differs from torch autograd" in err and "no package written" in err


def test_finite_difference_check_catches_the_scaled_graph_without_torch(tmp_path):
    pkg, _ = model.build_reference_package("mlp")
    assert model.check_finite_differences(pkg) < 0.05
    bad = type(pkg)(**{**pkg.__dict__, "training_graph": _batch_scaled(pkg.training_graph)})
    with pytest.raises(model.GradientCheckError, match="finite"):
        model.check_finite_differences(bad)


def test_export_inspect_verify_cli(tmp_path, capsys):
    key_file = tmp_path / "aggregator.key"
    key_file.write_text("22" * 32 + "\n")
    pub_file = tmp_path / "aggregator.pub"
    from nacl.signing import SigningKey

    pub_file.write_text(bytes(SigningKey(bytes.fromhex("22" * 32)).verify_key).hex() + "\n")
    out = tmp_path / "mlp.flpkg"
    parser = _parser()
    run = lambda *a: (lambda ns: ns.func(ns))(parser.parse_args(list(a)))  # noqa: E731
    assert run("model", "export", "--model", "mlp", "--out", str(out), "--key", str(key_file)) == 0
    pkg = load_package(out, SigningKey(bytes.fromhex("22" * 32)).verify_key)
    assert pkg.name == "digits-mlp"
    assert run("model", "inspect", str(out), "--pub", str(pub_file)) == 0
    assert "digits-mlp" in capsys.readouterr().out
    assert run("model", "verify", str(out), "--pub", str(pub_file)) == 0
    assert "matches the torch reference" in capsys.readouterr().out
    other = tmp_path / "other.pub"
    other.write_text(bytes(SigningKey(bytes.fromhex("33" * 32)).verify_key).hex() + "\n")
    assert run("model", "verify", str(out), "--pub", str(other)) == 1
    assert "not signed by the pinned aggregator key" in capsys.readouterr().err
    with pytest.raises(PackageError):
        load_package(out, SigningKey(bytes.fromhex("33" * 32)).verify_key)


def _parser():
    import argparse

    parser = argparse.ArgumentParser(prog="flctl")
    model.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser

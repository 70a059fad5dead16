"""`flctl model export --torch` beyond the example networks: the layer coverage, the batch-norm statistics
policies, frozen parameters, a loss of one's own, unsupported ops, and the command line with inspect/verify."""

from __future__ import annotations

import argparse
import json
import textwrap

import numpy as np
import onnx
import pytest
from agent_harness import small_package
from nacl.signing import SigningKey

torch = pytest.importorskip("torch", reason="torch (a tools/dev dependency) exports the models")

from aggregator.strategies.fedavg import FedAvg  # noqa: E402
from appliance.modelpkg import load_package, write_package  # noqa: E402
from appliance.trainer import Trainer  # noqa: E402
from flctl.model import add_parser  # noqa: E402
from flctl.model.build import PackageOptions, package_from_graphs  # noqa: E402
from flctl.model.check import check_export  # noqa: E402
from flctl.model.errors import UnsupportedOpError  # noqa: E402
from flctl.model.losses import resolve_loss  # noqa: E402
from flctl.model.torch_export import export_graphs  # noqa: E402

SHAPE = (3, 16, 16)
KEY_HEX = "44" * 32
KEY = SigningKey(bytes.fromhex(KEY_HEX))

# A module with the layers docs/models.md lists and the examples do not use (bicubic upsampling too).
# tests/test_model_export.py covers depthwise convolutions, batch norm, ReLU6, adaptive pooling and dropout
# (MobileNetV2), max-pooling, bilinear upsampling, transposed convolution, concat and group norm (U-Net).
COVERAGE_NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Coverage(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.AvgPool2d(2)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.gn = nn.GroupNorm(2, 8)
            self.up = nn.Upsample(scale_factor=2, mode="nearest")
            self.smooth_up = nn.Upsample(scale_factor=2, mode="bicubic", align_corners=False)
            self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.ln = nn.LayerNorm([8, 8, 8])
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.ReLU(), nn.Dropout(0.5),
                                      nn.Linear(8, 3))

        def forward(self, x):
            x = nn.functional.silu(self.bn(self.stem(x)))
            y = nn.functional.hardswish(self.gn(self.grouped(self.pool(x))))
            z = self.down(self.up(y) + self.smooth_up(y) + x)
            z = z * torch.sigmoid(z)
            return self.head(self.ln(z))


    def coverage():
        return Coverage()


    def smooth_l1(outputs, labels):
        """A target per output, and a column that doubles the weight of some samples (as a detector's loss
        weighs positions with an object): its .float() makes torch.export insert a dtype assertion."""
        weight = 1.0 + (labels[:, 3:] > 0.5).float()
        return (nn.functional.smooth_l1_loss(outputs, labels[:, :3], reduction="none") * weight).mean()


    smooth_l1.label_shape = (4,)


    class CumMax(nn.Module):
        def forward(self, x):
            return torch.cummax(x, dim=1).values


    def cummax_net():
        return nn.Sequential(nn.Linear(4, 4), CumMax(), nn.Linear(4, 2))


    class Warp(nn.Module):
        """A fixed affine warp by grid sampling: forward lowers to ONNX GridSample, its backward does not."""

        def __init__(self):
            super().__init__()
            theta = torch.tensor([[[0.9, 0.1, 0.0], [-0.1, 0.9, 0.0]]])
            self.register_buffer("grid", nn.functional.affine_grid(theta, [1, 2, 16, 16], align_corners=False))

        def forward(self, x):
            return nn.functional.grid_sample(x, self.grid.expand(x.shape[0], -1, -1, -1), align_corners=False)


    def warp_net():
        return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), Warp(), nn.Flatten(), nn.Linear(2 * 16 * 16, 2))
''')


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The module above, importable as ``test_models`` (as a user's models.py beside the command would be)."""
    import importlib
    import sys

    where = tmp_path_factory.mktemp("models")
    (where / "test_models.py").write_text(COVERAGE_NET)
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module("test_models"), where
    finally:
        sys.path.remove(str(where))
        sys.modules.pop("test_models", None)


@pytest.fixture(scope="module")
def coverage(models):
    module, _ = models
    torch.manual_seed(0)
    model = module.coverage()
    loss = resolve_loss("cross-entropy")
    return model, loss, export_graphs(model, loss, SHAPE)


def test_the_listed_layers_export_and_match_torch_autograd(coverage):
    model, loss, graphs = coverage
    report = check_export(model, loss, graphs, SHAPE)
    assert list(report.max_grad_error) == [n for n, _ in model.named_parameters()]
    assert sorted(graphs.buffers) == ["bn.running_mean", "bn.running_var"]
    ops = {n.op_type for n in onnx.load_from_string(graphs.training).graph.node}
    assert {"Conv", "ConvTranspose", "AveragePool", "Sigmoid"} <= ops


def _data(n: int, brightness: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.clip(rng.normal(brightness, 0.1, (n, *SHAPE)), 0, 1).astype(np.float32)
    return x, rng.integers(0, 3, n).astype(np.int64)


def test_aggregated_running_statistics_are_averaged_by_sample_count(coverage):
    _, loss, graphs = coverage
    pkg = package_from_graphs(graphs, loss, SHAPE, PackageOptions(name="coverage"))
    assert "bn.running_mean" in {s.name for s in pkg.param_specs}
    assert "bn.running_mean" not in pkg.trainable_names
    deltas, stats = [], []
    for n, brightness in ((64, 0.2), (192, 0.8)):  # a dark camera with few frames, a bright one with many
        x, y = _data(n, brightness, seed=n)
        result = Trainer(pkg).train(pkg.initial_params, x, y, epochs=2, batch_size=32, lr=0.01, measure=False)
        deltas.append((result.delta, n))
        stats.append(pkg.initial_params["bn.running_mean"] + result.delta["bn.running_mean"])
    assert not np.allclose(stats[0], stats[1], atol=1e-3)  # each device's statistics follow its own data
    fedavg = FedAvg()
    names = [s.name for s in pkg.param_specs]
    fedavg.start_round(sum(s.size for s in pkg.param_specs))
    for delta, n in deltas:
        fedavg.add(np.concatenate([delta[k].ravel() for k in names]), n)
    mean = fedavg.mean_delta()
    offset = sum(s.size for s in pkg.param_specs[: names.index("bn.running_mean")])
    merged = pkg.initial_params["bn.running_mean"] + mean[offset : offset + 8]
    np.testing.assert_allclose(merged, (64 * stats[0] + 192 * stats[1]) / 256, rtol=1e-5, atol=1e-6)


def test_local_running_statistics_stay_on_the_device(coverage, tmp_path):
    _, loss, graphs = coverage
    pkg = package_from_graphs(graphs, loss, SHAPE, PackageOptions(name="coverage", buffer_policy="local"))
    path = tmp_path / "local.flpkg"
    write_package(path, pkg, KEY)
    pkg = load_package(path, KEY.verify_key)
    assert not {"bn.running_mean", "bn.running_var"} & {s.name for s in pkg.param_specs}
    x, y = _data(96, 0.8, seed=1)
    trainer = Trainer(pkg)
    result = trainer.train(pkg.initial_params, x, y, epochs=2, batch_size=32, lr=0.01)
    assert set(result.delta) == set(pkg.trainable_names)  # the update carries no statistics
    mean = trainer.local_buffers["bn.running_mean"]
    assert not np.allclose(mean, pkg.local_buffers["bn.running_mean"])  # estimated from this device's frames
    new = {k: pkg.initial_params[k] + result.delta[k] for k in result.delta}
    assert trainer.evaluate(new, x, y)["loss"] != pytest.approx(Trainer(pkg).evaluate(new, x, y)["loss"])


def test_an_op_without_onnx_lowering_is_named_with_its_module(models):
    module, _ = models
    with pytest.raises(UnsupportedOpError, match=r"unsupported op aten\.cummax .*\(in 1 \(CumMax\)\)"):
        export_graphs(module.cummax_net(), resolve_loss("cross-entropy"), (4,))


def test_a_backward_op_without_onnx_lowering_names_the_forward_module(models):
    module, _ = models
    with pytest.raises(UnsupportedOpError, match=r"aten\.grid_sampler_2d_backward \(in 1 \(Warp\)\)"):
        export_graphs(module.warp_net(), resolve_loss("cross-entropy"), SHAPE)


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="flctl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", *argv])
    return args.func(args)


def test_export_cli_with_frozen_layers_local_statistics_and_own_loss(models, tmp_path, monkeypatch, capsys):
    _, where = models
    monkeypatch.chdir(where)  # PACKAGE.MODULE resolves from the current directory, as with python -m
    key = tmp_path / "aggregator.key"
    key.write_text(KEY_HEX + "\n")
    out = tmp_path / "head.flpkg"
    assert _run("export", "--torch", "test_models:coverage", "--input-shape", "3,16,16", "--loss",
                "test_models:smooth_l1", "--trainable", "head", "--bn-stats", "local", "--out", str(out),
                "--key", str(key)) == 0
    printed = capsys.readouterr().out
    assert "frozen (baked into the graphs, not sent): stem.weight, stem.bias" in printed
    pkg = load_package(out, KEY.verify_key)
    assert [s.name for s in pkg.param_specs] == ["head.4.weight", "head.4.bias"]  # all an update carries
    assert pkg.labels == {"dtype": "float32", "shape": [4]} and pkg.name == "coverage"
    training = onnx.load_from_string(pkg.training_graph).graph
    assert [o.name for o in training.output if o.name.startswith("grad:")] == ["grad:head.4.weight",
                                                                                 "grad:head.4.bias"]
    assert "stem.weight" in {t.name for t in training.initializer}  # a constant of the graph
    x = np.random.default_rng(0).random((40, *SHAPE), dtype=np.float32)
    y = np.random.default_rng(1).random((40, 4), dtype=np.float32)
    result = Trainer(pkg).train(pkg.initial_params, x, y, epochs=3, batch_size=8, lr=0.05)
    assert set(result.delta) == {"head.4.weight", "head.4.bias"}
    assert result.metrics["loss_after"] < result.metrics["loss_before"]

    pub = tmp_path / "aggregator.pub"
    pub.write_text(bytes(KEY.verify_key).hex() + "\n")
    assert _run("inspect", str(out), "--pub", str(pub)) == 0
    text = capsys.readouterr().out
    assert "labels: float32 target, 4" in text and "running statistics kept on the device (local): 16" in text
    assert "ops: " in text and "Conv" in text
    assert _run("inspect", str(out), "--pub", str(pub), "--json") == 0
    described = json.loads(capsys.readouterr().out)
    assert described["trainable_parameters"] == 8 * 3 + 3
    assert {"Conv", "Sigmoid"} <= set(described["graphs"]["inference"]["ops"])
    assert described["graphs"]["training"]["opset"] <= 18 and described["graphs"]["training"]["ir_version"] <= 9
    assert _run("verify", str(out), "--pub", str(pub)) == 0
    assert "gradients match finite differences" in capsys.readouterr().out


def test_export_cli_names_the_unsupported_op_and_writes_nothing(models, tmp_path, monkeypatch, capsys):
    _, where = models
    monkeypatch.chdir(where)
    key = tmp_path / "aggregator.key"
    key.write_text(KEY_HEX + "\n")
    out = tmp_path / "cummax.flpkg"
    assert _run("export", "--torch", "test_models:cummax_net", "--input-shape", "4", "--out", str(out),
                "--key", str(key)) == 1
    err = capsys.readouterr().err
    assert "unsupported op aten.cummax" in err and "1 (CumMax)" in err and "no package written" in err
    assert "Traceback" not in err and not out.exists()


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)  # a branch on the data: not one graph


def test_control_flow_on_the_data_is_refused_in_one_line():
    from flctl.model.errors import ExportError

    with pytest.raises(ExportError, match=r"torch\.export cannot trace the model with its loss") as exc:
        export_graphs(_DataDependent(), resolve_loss("cross-entropy"), (4,))
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("argv,message", [
    (["--torch", "no_such_module:make"], "cannot import no_such_module"),
    (["--torch", "test_models:no_such_factory"], "test_models has no no_such_factory"),
    (["--torch", "test_models"], "expected PACKAGE.MODULE:NAME"),
    (["--torch", "test_models:coverage", "--loss", "hinge"], "unknown loss 'hinge'"),
    (["--torch", "test_models:coverage", "--trainable", "neck"], "--trainable 'neck' matches no parameter"),
])
def test_export_cli_refuses_bad_references_in_one_line(models, tmp_path, monkeypatch, capsys, argv, message):
    _, where = models
    monkeypatch.chdir(where)
    key = tmp_path / "aggregator.key"
    key.write_text(KEY_HEX + "\n")
    out = tmp_path / "x.flpkg"
    assert _run("export", *argv, "--input-shape", "3,16,16", "--out", str(out), "--key", str(key)) == 1
    err = capsys.readouterr().err
    assert message in err and "no package written" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("option", ["--lr", "--max-grad-norm", "--mean", "--std"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_export_cli_refuses_a_number_no_device_would_take_before_exporting(tmp_path, capsys, option, value):
    out = tmp_path / "x.flpkg"
    with pytest.raises(SystemExit) as exited:
        _run("export", "--torch", "test_models:coverage", "--input-shape", "3,16,16", f"{option}={value}",
             "--out", str(out), "--key", str(tmp_path / "aggregator.key"))
    assert exited.value.code == 2 and not out.exists()
    assert f"argument {option}: '{value}': expected a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "1e300", "expected a number in [0, 1000]"), ("--mean", "1e30", "expected a number in [-1e+06, 1e+06]"),
    ("--std", "1e-30", "expected a number in [1e-06, 1e+06]"),
    ("--input-shape", "3,65536,65536", "12884901888 values per sample, more than the 268435456 (2^28)"),
])
def test_export_cli_refuses_a_number_past_any_real_model_before_exporting(tmp_path, capsys, option, value, message):
    """Finite and absurd: signed, such a package failed every round on every device (docs/package.md, "Bounds")."""
    out = tmp_path / "x.flpkg"
    shape = [] if option == "--input-shape" else ["--input-shape", "3,16,16"]
    with pytest.raises(SystemExit) as exited:
        _run("export", "--torch", "test_models:coverage", *shape, f"{option}={value}", "--out", str(out),
             "--key", str(tmp_path / "aggregator.key"))
    assert exited.value.code == 2 and not out.exists()
    assert f"argument {option}: '{value}': {message}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_signed_package_whose_graph_is_not_onnx_is_named_in_one_line(command, tmp_path, capsys):
    """The signature vouches for who made a package, not that its graphs are models: inspect and verify ended in a
    protobuf or onnxruntime traceback."""
    pub = tmp_path / "aggregator.pub"
    pub.write_text(bytes(KEY.verify_key).hex() + "\n")
    bad = small_package(tmp_path / "not-onnx.flpkg", KEY)  # its graphs are placeholder bytes
    assert _run(command, str(bad), "--pub", str(pub)) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"flctl model {command}: " in error
    assert "graph" in error and ("not an ONNX model" in error or "does not load in onnxruntime" in error)

"""`flctl model export --torch`: ordinary torch networks become packages whose graphs match torch autograd and
train on the device side (stock onnxruntime, numpy, no torch).

Each network is exported once per module (tracing costs tens of CPU seconds) and shared by the tests.
FL_TRAINER_PYTHON runs the device side with another interpreter, e.g. a venv with onnxruntime 1.18.0 (Yocto
scarthgap's) and numpy 1.26, plus cbor2 and pynacl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from nacl.signing import SigningKey

torch = pytest.importorskip("torch", reason="torch (a tools/dev dependency) exports the models")

from appliance.modelpkg import load_package, write_package  # noqa: E402
from appliance.synthetic import SyntheticCamera  # noqa: E402
from flctl.model import examples  # noqa: E402
from flctl.model.build import PackageOptions, package_from_graphs  # noqa: E402
from flctl.model.check import EXPORT_CHECK_BATCH_SIZES, check_export  # noqa: E402
from flctl.model.errors import GradientCheckError  # noqa: E402
from flctl.model.losses import resolve_loss  # noqa: E402
from flctl.model.torch_export import IR_VERSION, OPSET, export_graphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 32, 32)
KEY = SigningKey(bytes(range(32)))


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    model = examples.mobilenet_v2()
    loss = resolve_loss("cross-entropy")
    return model, loss, export_graphs(model, loss, SHAPE)


def train_on_device(package: Path, x: np.ndarray, y: np.ndarray, tmp_path: Path, epochs: int = 4) -> dict:
    """tests/device_training.py in a child process: per-epoch losses, whether torch got imported."""
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    python = os.environ.get("FL_TRAINER_PYTHON", sys.executable)
    out = subprocess.run(
        [python, str(ROOT / "tests" / "device_training.py"), str(package), bytes(KEY.verify_key).hex(), str(data),
         str(epochs)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _graph(data: bytes) -> onnx.ModelProto:
    return onnx.load_from_string(data)


def test_mobilenet_v2_graphs_match_torch_autograd(mobilenet):
    model, loss, graphs = mobilenet
    report = check_export(model, loss, graphs, SHAPE, seed=1)
    assert report.batch_sizes == EXPORT_CHECK_BATCH_SIZES
    params = [n for n, _ in model.named_parameters()]
    stats = [n for n, _ in model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    assert list(report.max_grad_error) == params and list(graphs.params) == params
    assert sorted(report.max_buffer_error) == sorted(stats) and len(stats) == 2 * 13  # every batch norm
    assert max(report.max_grad_error.values()) < 1e-2
    training = _graph(graphs.training)
    assert [i.name for i in training.graph.input] == ["input", "labels", *params, *graphs.buffers]
    assert [o.name for o in training.graph.output] == [
        "loss", "logits", *(f"grad:{n}" for n in params), *(f"new:{n}" for n in graphs.buffers)]
    assert training.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch dimension
    for g in (training, _graph(graphs.evaluation), _graph(graphs.inference)):
        assert g.opset_import[0].version <= OPSET and g.ir_version <= IR_VERSION <= 9
        assert not {t.name for t in g.graph.initializer} & set(params)  # parameters are inputs, fed each step
    depthwise = [n for n in training.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert depthwise, "the depthwise convolutions are exported as grouped Conv nodes"
    assert [i.name for i in _graph(graphs.inference).graph.input] == ["input", *params, *graphs.buffers]


def _scale_output(graph: bytes, output: str, factor: float) -> bytes:
    """The graph with ``output`` multiplied by ``factor`` (a gradient gone wrong)."""
    model = onnx.load_from_string(graph)
    for node in model.graph.node:
        node.output[:] = [f"{o}.raw" if o == output else o for o in node.output]
        node.input[:] = [f"{o}.raw" if o == output else o for o in node.input]
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, np.float32), "wrong_factor"))
    model.graph.node.append(onnx.helper.make_node("Mul", [f"{output}.raw", "wrong_factor"], [output]))
    return model.SerializeToString()


def test_a_wrong_gradient_is_refused_naming_it(mobilenet):
    model, loss, graphs = mobilenet
    name = "2.block.1.0.weight"  # a depthwise convolution's weight
    bad = type(graphs)(**{**graphs.__dict__, "training": _scale_output(graphs.training, f"grad:{name}", 2.0)})
    with pytest.raises(GradientCheckError, match=rf"batch 2: gradient of {name} differs from torch autograd by"):
        check_export(model, loss, bad, SHAPE)


def test_mobilenet_v2_trains_on_the_device_without_torch(mobilenet, tmp_path):
    _, loss, graphs = mobilenet
    pkg = package_from_graphs(graphs, loss, SHAPE, PackageOptions(name="mobilenet-v2", mean=0.4, std=0.25))
    path = tmp_path / "mobilenet.flpkg"
    write_package(path, pkg, KEY)
    assert load_package(path, KEY.verify_key).buffer_names == list(graphs.buffers)
    x, y = SyntheticCamera(0, seed=1).sample(256)  # traffic frames, 4 classes
    result = train_on_device(path, x, y, tmp_path)
    losses = result["losses"]
    assert not result["torch_imported"]
    assert losses[-1] < 0.9 * losses[0], losses
    assert set(result["updated"]) == set(pkg.initial_params)  # weights and running statistics moved
    assert 0.0 <= result["evaluation"]["accuracy"] <= 1.0


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = examples.unet()
    loss = resolve_loss("cross-entropy")
    return model, loss, export_graphs(model, loss, SHAPE)


def test_unet_graphs_match_torch_autograd(unet):
    model, loss, graphs = unet
    report = check_export(model, loss, graphs, SHAPE, seed=1)
    assert list(report.max_grad_error) == [n for n, _ in model.named_parameters()]
    assert max(report.max_grad_error.values()) < 1e-2
    assert graphs.labels.dtype == "int64" and graphs.labels.shape == (32, 32)  # a class per pixel
    assert graphs.output_shape == (2, 32, 32)
    ops = {n.op_type for n in _graph(graphs.training).graph.node}
    assert {"MaxPool", "ConvTranspose", "Concat", "Conv"} <= ops


def test_unet_trains_on_the_device_without_torch(unet, tmp_path):
    _, loss, graphs = unet
    options = PackageOptions(name="unet", mean=0.4, std=0.25, class_names=["background", "bright"])
    pkg = package_from_graphs(graphs, loss, SHAPE, options)
    path = tmp_path / "unet.flpkg"
    write_package(path, pkg, KEY)
    x, _ = SyntheticCamera(1, seed=2).sample(128)
    y = (x[:, 0] > 0.5).astype(np.int64)  # per-pixel classes: bright (vehicles, lights) or not
    result = train_on_device(path, x, y, tmp_path, epochs=3)
    assert not result["torch_imported"]
    assert result["losses"][-1] < 0.7 * result["losses"][0], result["losses"]
    assert result["evaluation"]["accuracy"] > 0.8  # per pixel


def test_export_cli_writes_nothing_when_a_gradient_disagrees(mobilenet, tmp_path, monkeypatch, capsys):
    import argparse

    from flctl.model import add_parser, torch_export

    _, _, graphs = mobilenet
    name = "4.block.2.weight"
    bad = type(graphs)(**{**graphs.__dict__, "training": _scale_output(graphs.training, f"grad:{name}", 1.01)})
    monkeypatch.setattr(torch_export, "export_graphs", lambda *args, **kwargs: bad)
    key = tmp_path / "aggregator.key"
    key.write_text("55" * 32 + "\n")
    out = tmp_path / "mobilenet.flpkg"
    parser = argparse.ArgumentParser(prog="flctl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["model", "export", "--torch", "flctl.model.examples:mobilenet_v2", "--input-shape",
                              "1,32,32", "--out", str(out), "--key", str(key)])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert f"gradient of {name} differs from torch autograd" in err and "no package written" in err
    assert not out.exists()

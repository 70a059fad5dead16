"""The traffic detector (flctl.model.detector) goes the general export path: its graphs match torch autograd,
`flctl model export --torch` writes a package that says it is a detector, and it trains on the device side
(stock onnxruntime and numpy in a child process, no torch) on synthetic frames with targets built from boxes.

The network is exported once for the module (tracing costs tens of CPU seconds) and shared by the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

torch = pytest.importorskip("torch", reason="torch (a tools/dev dependency) exports the models")

from appliance.detection import DetectionSpec, encode_targets  # noqa: E402
from appliance.identity import write_key_file  # noqa: E402
from appliance.modelpkg import load_package, write_package  # noqa: E402
from appliance.synthetic import SyntheticCamera  # noqa: E402
from appliance.training_job import NotEnoughData, TrainJob, run_train_job  # noqa: E402
from flctl.cli import main as flctl  # noqa: E402
from flctl.model import build  # noqa: E402
from flctl.model.build import PackageOptions, package_from_graphs  # noqa: E402
from flctl.model.check import check_export  # noqa: E402
from flctl.model.detector import centre_net  # noqa: E402
from flctl.model.losses import resolve_loss  # noqa: E402
from flctl.model.torch_export import export_graphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 32, 32)
KEY = SigningKey(bytes(range(32)))
LOSS = "flctl.model.detector:centre_net_loss"


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = centre_net()
    loss = resolve_loss(LOSS)
    return model, loss, export_graphs(model, loss, SHAPE)


def _package(detector):
    model, loss, graphs = detector
    options = PackageOptions(name="traffic-detector", class_names=["vehicle"], mean=0.4, std=0.25,
                             optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.0},
                             detection=dict(model.detection))
    return package_from_graphs(graphs, loss, SHAPE, options)


def test_detector_graphs_match_torch_autograd(detector):
    model, loss, graphs = detector
    report = check_export(model, loss, graphs, SHAPE, seed=1)
    assert list(report.max_grad_error) == [n for n, _ in model.named_parameters()]
    assert max(report.max_grad_error.values()) < 1e-2
    # labels: heatmap, size (2), offset (2), mask; outputs: heatmap, size, offset; a 16x16 grid (stride 2)
    assert graphs.labels.dtype == "float32" and graphs.labels.shape == (6, 16, 16)
    assert graphs.output_shape == (5, 16, 16)
    assert 5_000 < sum(v.size for v in graphs.params.values()) < 100_000


def test_flctl_export_writes_a_detector_package(detector, tmp_path, monkeypatch, capsys):
    # The CLI's own path (factory, loss by reference, options); the already traced graphs stand in for a second
    # trace, so this checks what the command adds: the model's detection layout and the class names.
    model, loss, graphs = detector
    monkeypatch.setattr("flctl.model.torch_export.export_graphs", lambda *a, **k: graphs)
    monkeypatch.setattr(build, "check_export", lambda *a, **k: check_export(model, loss, graphs, SHAPE, (2,)))
    key = tmp_path / "aggregator.key"
    write_key_file(key, bytes(KEY), 0o600)
    out = tmp_path / "detector.flpkg"
    code = flctl(["model", "export", "--torch", "flctl.model.detector:centre_net", "--input-shape", "1,32,32",
                  "--loss", LOSS, "--classes", "vehicle", "--name", "traffic-detector", "--out", str(out),
                  "--key", str(key)])
    assert code == 0, capsys.readouterr().err
    pkg = load_package(out, KEY.verify_key)
    assert pkg.detection == {"kind": "centre-heatmap", "stride": 2, "classes": 1}
    assert pkg.class_names == ["vehicle"] and pkg.num_classes == 1
    spec = DetectionSpec.from_package(pkg)
    assert spec.grid == (16, 16) and spec.label_channels == 6


def _documented_detector_exports() -> dict[str, list[str]]:
    """docs/models.md's `flctl model export` commands of the detector, as a shell splits them, by their --out."""
    import shlex

    text = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    commands = {}
    for block in text.split("```")[1::2]:
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("flctl model export --torch flctl.model.detector:centre_net"):
                argv = shlex.split(command, comments=True)[1:]
                commands[argv[argv.index("--out") + 1]] = argv
    return commands


def test_the_documented_detector_export_writes_the_package_the_demo_trains(detector, tmp_path, monkeypatch, capsys):
    """A user who copies docs/models.md's detector export gets `flctl demo --model detector`'s package: its name,
    task, class, normalisation, clipped optimiser and detection layout (the trace is the module's, as above)."""
    from flctl import demo_detector

    model, loss, graphs = detector
    monkeypatch.setattr("flctl.model.torch_export.export_graphs", lambda *a, **k: graphs)
    monkeypatch.setattr(build, "check_export", lambda *a, **k: check_export(model, loss, graphs, SHAPE, (2,)))
    write_key_file(tmp_path / "aggregator.key", bytes(KEY), 0o600)
    monkeypatch.chdir(tmp_path)
    exports = _documented_detector_exports()
    clipped, unclipped = exports["detector.flpkg"], exports["noclip.flpkg"]
    without_clip = [a for a in clipped if a not in ("--max-grad-norm", "20")]
    assert unclipped == [("noclip.flpkg" if a == "detector.flpkg" else a) for a in without_clip], \
        "docs/models.md's unclipped detector export is not the clipped one without --max-grad-norm"
    assert flctl(clipped) == 0, capsys.readouterr().err
    pkg = load_package(tmp_path / "detector.flpkg", KEY.verify_key)
    demo = package_from_graphs(graphs, loss, SHAPE,
                               replace(demo_detector.detector_options(), detection=dict(model.detection)))
    for field in ("name", "task", "class_names", "preprocessing", "detection"):
        assert getattr(pkg, field) == getattr(demo, field), field
    assert {"weight_decay": 0.0, **pkg.optimizer} == demo.optimizer  # no weight_decay: SGD's default, 0


def test_detector_trains_on_the_device_without_torch(detector, tmp_path):
    pkg = _package(detector)
    path = tmp_path / "detector.flpkg"
    write_package(path, pkg, KEY)
    spec = DetectionSpec.from_package(pkg)
    frames, boxes = [], []
    for camera in range(4):
        x, _, b = SyntheticCamera(camera, seed=3).sample_with_boxes(64)
        frames.append(x)
        boxes += b
    data = tmp_path / "data.npz"
    np.savez(data, x=np.concatenate(frames), y=encode_targets(spec, boxes))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    python = os.environ.get("FL_TRAINER_PYTHON", sys.executable)
    out = subprocess.run(
        [python, str(ROOT / "tests" / "device_training.py"), str(path), bytes(KEY.verify_key).hex(), str(data), "3"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["torch_imported"]
    losses = result["losses"]
    assert losses[-1] < 0.75 * losses[0], losses
    assert set(result["updated"]) == set(pkg.initial_params)


def test_the_reference_detector_clips_each_step_so_a_steep_round_still_lowers_its_loss(detector):
    """At the package's own lr 0.05, a round on camera 2's frames unclipped takes steps of gradient norm in the
    hundreds and ends with a higher loss than it began (3.4 -> 7.0; FedAvg of such rounds left every heatmap dead,
    docs/models.md "Gradient clipping"). The demo's package clips each step to 20, and the same round lowers it."""
    from appliance.trainer import Trainer
    from flctl import demo_detector

    model, loss, graphs = detector
    pkg = package_from_graphs(graphs, loss, SHAPE,
                              replace(demo_detector.detector_options(), detection=dict(model.detection)))
    assert pkg.optimizer == {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "max_grad_norm": 20.0}
    x, _, boxes = SyntheticCamera(2, seed=1).sample_with_boxes(256)
    y = encode_targets(DetectionSpec.from_package(pkg), boxes)
    trainer = Trainer(pkg)

    def round_losses(optimizer):
        m = trainer.train(pkg.initial_params, x, y, epochs=1, batch_size=32, lr=0.05, seed=102,
                          optimizer=optimizer).metrics
        return m["loss_before"], m["loss_after"]

    before, clipped = round_losses(pkg.optimizer)
    assert clipped < before
    unclipped_optimizer = {k: v for k, v in pkg.optimizer.items() if k != "max_grad_norm"}
    assert round_losses(unclipped_optimizer)[1] > 1.5 * before

def _job(path: Path, pkg, source: str, tmp_path: Path) -> TrainJob:
    return TrainJob(package_path=str(path), aggregator_key=bytes(KEY.verify_key), params=dict(pkg.initial_params),
                    source=source, state_dir=str(tmp_path), samples=192, synthetic_camera=3, seed=5, epochs=2,
                    batch_size=32, learning_rate=0.01, prox_mu=0.0, threads=1)  # fmt: skip


def test_a_round_of_the_training_job_builds_targets_from_boxes_and_reports_detection_quality(detector, tmp_path):
    pkg = _package(detector)
    path = tmp_path / "detector.flpkg"
    write_package(path, pkg, KEY)
    result = run_train_job(_job(path, pkg, "synthetic", tmp_path))
    m = result.metrics
    assert result.num_samples == 192 and m["loss_after"] < m["loss_before"]
    assert {"centre_precision", "centre_recall", "centre_f1", "count_mae"} <= set(m)
    assert m["centre_f1"] > 0.5  # two epochs on one camera's frames already find most vehicles there
    with pytest.raises(NotEnoughData, match="0 frames with pseudo-boxes in the buffer"):
        run_train_job(_job(path, pkg, "cameras", tmp_path))  # tests/test_detector_cameras.py trains on them


def test_the_demo_scores_a_detector_and_draws_its_boxes(detector, tmp_path):
    from appliance.trainer import Trainer
    from flctl import demo_detector

    pkg = _package(detector)
    trainer = Trainer(pkg)
    held = demo_detector.held_out(2, 12, sample_seed=999)
    overall, per_camera = demo_detector.scores(trainer, dict(pkg.initial_params), held)
    assert {"map50", "map50_95", "centre_f1", "count_mae"} <= set(overall) and len(per_camera) == 2
    assert overall["centre_f1"] == 0.0  # untrained: every heatmap at the 0.1 prior, below the 0.3 threshold
    picture = demo_detector.write_picture(trainer, dict(pkg.initial_params), held, tmp_path / "d.png", "v0")
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 10_000


def test_the_fl_bench_compares_fedavg_with_central_training_round_by_round(detector):
    import importlib.util

    spec = importlib.util.spec_from_file_location("detector_fl", ROOT / "bench" / "detector_fl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pkg = _package(detector)
    rows = bench.run(pkg, cameras=2, rounds=1, frames=64, epochs=1, batch=32, lr=0.01)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["fedavg_map50"] == rows[0]["central_map50"]  # both start from the package's parameters
    assert rows[1]["central_map50"] > rows[0]["central_map50"]

"""A signed, well-formed package the device's data cannot train is refused when a task names it, before any
training: counted under fl_agent_models_refused_total{reason="unfit-for-device"} and named in the log, as other
refused packages are. It was taken, and every round then failed in the trainer as `trainer-failed`: the fleet saw
a failing device, not a package that does not fit it (appliance/package_fit.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from agent_harness import FakeAggregator, run_agent_against, sample, small_package
from nacl.signing import SigningKey

from appliance.modelpkg import ModelPackage, write_package
from appliance.wire import ParamSpec

UNFIT = {"reason": "unfit-for-device"}


def _refused_or_trained(agent) -> bool:
    return (sample(agent, "fl_agent_models_refused_total", UNFIT) >= 2
            or sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) >= 1)


async def _refusal(tmp_path: Path, package: Path, key: SigningKey, source: str, caplog) -> tuple[FakeAggregator, str]:
    fake = FakeAggregator(key, package)
    with caplog.at_level(logging.ERROR, logger="fl_agent"):
        agent = await run_agent_against(fake, tmp_path, until=_refused_or_trained, source=source, at_most=60)
    assert sample(agent, "fl_agent_models_refused_total", UNFIT) >= 2
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 0 and not fake.updates
    # Refused again at each retry from the stored copy: downloaded once, kept (it is not the content's fault).
    assert fake.package_downloads == 1
    assert (tmp_path / "state" / "models" / f"{fake.package.digest.hex()}.flpkg").exists()
    lines = [r.getMessage() for r in caplog.records if "refused the model from the aggregator" in r.getMessage()]
    assert lines
    return fake, lines[0]


async def test_a_package_for_other_inputs_than_the_devices_frames_is_refused_naming_both(tmp_path, caplog):
    key = SigningKey.generate()
    package = small_package(tmp_path / "imagenet.flpkg", key, name="imagenet-sized", input_shape=(3, 224, 224))
    _, line = await _refusal(tmp_path, package, key, "synthetic", caplog)
    assert "imagenet-sized: package needs 3x224x224 inputs; this device's frames are 1x32x32" in line


async def test_a_package_of_fewer_classes_than_the_devices_labels_is_refused_naming_both(tmp_path, caplog):
    key = SigningKey.generate()
    package = small_package(tmp_path / "three.flpkg", key, name="three-classes", num_classes=3)
    _, line = await _refusal(tmp_path, package, key, "cameras", caplog)
    assert ("three-classes: package has 3 classes; this device's cameras labels run 0..3, so it needs "
            "num_classes >= 4") in line


def _two_class_detector(path: Path, key: SigningKey) -> Path:
    """A detector of two classes (placeholder graphs): the cameras' pseudo-boxes carry no class."""
    write_package(path, ModelPackage(
        name="two-class-detector", param_specs=[ParamSpec("w", (2,))], initial_params={"w": np.zeros(2, np.float32)},
        training_graph=b"graph", inference_graph=b"graph", optimizer={"name": "sgd", "lr": 0.05},
        preprocessing={"input_shape": [1, 32, 32]}, num_classes=2, class_names=["car", "truck"],
        labels={"dtype": "float32", "shape": [7, 16, 16]},
        detection={"kind": "centre-heatmap", "stride": 2, "classes": 2},
    ), key)  # fmt: skip
    return path


async def test_a_package_refused_for_the_devices_source_is_taken_after_the_source_changes(tmp_path, caplog):
    """The refusal depends on [data] source, so the package is not remembered as bad: on synthetic frames the same
    stored package goes on to the trainer (whose placeholder graphs then fail), with no download."""
    key = SigningKey.generate()
    package = _two_class_detector(tmp_path / "detector.flpkg", key)
    fake, line = await _refusal(tmp_path, package, key, "cameras", caplog)
    assert "package detects 2 classes; the cameras' pseudo-boxes are moving blobs with no class" in line

    agent = await run_agent_against(fake, tmp_path, until=_refused_or_trained, source="synthetic", at_most=60)
    assert sample(agent, "fl_agent_models_refused_total", UNFIT) == 0
    assert sample(agent, "fl_agent_rounds_skipped_total", {"reason": "trainer-failed"}) == 1
    assert fake.package_downloads == 1

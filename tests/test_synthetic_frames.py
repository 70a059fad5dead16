"""Synthetic traffic frames: shapes, determinism, non-IID cameras, and learnability by the reference CNN."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.synthetic import NUM_CLASSES, SyntheticCamera, evaluation_set


def test_frames_have_the_model_input_shape_and_range():
    x, y = SyntheticCamera(0, seed=1).sample(50)
    assert x.shape == (50, 1, 32, 32) and x.dtype == np.float32
    assert y.shape == (50,) and y.dtype == np.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert set(np.unique(y)) <= set(range(NUM_CLASSES))
    assert x.std() > 0.02  # not blank frames


def test_same_camera_and_seed_give_the_same_frames():
    a = SyntheticCamera(2, seed=5).sample(20)
    b = SyntheticCamera(2, seed=5).sample(20)
    c = SyntheticCamera(2, seed=6).sample(20)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # the camera itself (style, static background) does not depend on the seed
    assert SyntheticCamera(2, seed=5).style == SyntheticCamera(2, seed=6).style


def test_cameras_are_non_iid():
    hists = np.array([SyntheticCamera(i).label_histogram(600) for i in range(8)])
    # label skew: some camera is mostly empty road, another mostly busy
    assert hists[:, 0].max() > 0.5 and hists[:, 3].max() > 0.3
    assert hists[:, 0].min() < 0.2
    styles = [SyntheticCamera(i).style for i in range(8)]
    assert len({round(s.angle, 3) for s in styles}) == 8
    assert any(s.night for s in styles) and not all(s.night for s in styles)
    means = [SyntheticCamera(i, seed=0).sample(50)[0].mean() for i in range(8)]
    assert max(means) - min(means) > 0.15  # lighting differs


def test_evaluation_set_mixes_cameras_and_differs_from_training_frames():
    x, y = evaluation_set(90, cameras=range(3), sample_seed=1)
    assert x.shape == (90, 1, 32, 32) and y.shape == (90,)
    assert len(np.unique(y)) >= 3
    train_x, _ = SyntheticCamera(0, seed=1).sample(30)
    assert not np.array_equal(x[:30], train_x)
    with pytest.raises(ValueError, match="at least one camera"):
        evaluation_set(10, cameras=[])


def test_reference_cnn_learns_the_task_well_above_chance():
    pytest.importorskip("torch", reason="torch (a tools/dev dependency) builds the reference package")
    from appliance.trainer import Trainer
    from flctl.model import build_reference_package

    pkg, _ = build_reference_package("cnn")
    xs, ys = zip(*(SyntheticCamera(c, seed=11).sample(200) for c in range(8)), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    xe, ye = evaluation_set(800, cameras=range(8))
    majority = np.bincount(ye).max() / len(ye)
    trainer = Trainer(pkg, threads=1)
    result = trainer.train(pkg.initial_params, x, y, epochs=6, batch_size=32, lr=0.05, seed=0)
    params = {k: pkg.initial_params[k] + result.delta[k] for k in result.delta}
    acc = trainer.evaluate(params, xe, ye)["accuracy"]
    assert acc > max(0.6, majority + 0.2), f"held-out accuracy {acc:.3f} (majority class {majority:.3f})"


@pytest.mark.slow
def test_reference_cnn_reaches_70_percent_on_a_couple_thousand_frames():
    """The figure docs/models.md quotes: 8 cameras x 300 frames, 10 epochs, held-out frames of all cameras."""
    pytest.importorskip("torch", reason="torch (a tools/dev dependency) builds the reference package")
    from appliance.trainer import Trainer
    from flctl.model import build_reference_package

    pkg, _ = build_reference_package("cnn")
    xs, ys = zip(*(SyntheticCamera(c, seed=1).sample(300) for c in range(8)), strict=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    xe, ye = evaluation_set(2000, cameras=range(8))
    trainer = Trainer(pkg, threads=1)
    result = trainer.train(pkg.initial_params, x, y, epochs=10, batch_size=32, lr=0.05, seed=0)
    params = {k: pkg.initial_params[k] + result.delta[k] for k in result.delta}
    acc = trainer.evaluate(params, xe, ye)["accuracy"]
    assert acc > 0.7, f"held-out accuracy {acc:.3f}"

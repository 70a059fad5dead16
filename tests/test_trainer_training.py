"""The on-device trainer: onnxruntime training graph + numpy optimisers, checked against torch.optim."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (a tools/dev dependency) builds the reference packages")

from appliance.trainer import Trainer  # noqa: E402
from flctl import model, refmodels  # noqa: E402


@pytest.fixture(scope="module")
def mlp():
    pkg, _ = model.build_reference_package("mlp", seed=3)
    return pkg


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def _torch_steps(pkg, params, x, y, steps, lr, opt_spec, prox_mu=0.0):
    m = refmodels.torch_module(refmodels.MLP)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.from_numpy(params[name]))
    base = {n: p.detach().clone() for n, p in m.named_parameters()}
    name = opt_spec["name"]
    if name == "adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=opt_spec.get("weight_decay", 0.01))
    else:
        opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=opt_spec.get("momentum", 0.0),
                              weight_decay=opt_spec.get("weight_decay", 0.0))
    xt = torch.from_numpy(pkg.preprocess(x))
    yt = torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(xt), yt)
        if prox_mu:
            loss = loss + prox_mu / 2 * sum(((p - base[n]) ** 2).sum() for n, p in m.named_parameters())
        loss.backward()
        if "max_grad_norm" in opt_spec:
            torch.nn.utils.clip_grad_norm_(m.parameters(), opt_spec["max_grad_norm"])
        opt.step()
    return {n: (p.detach() - base[n]).numpy() for n, p in m.named_parameters()}


@pytest.mark.parametrize(
    "opt_spec,prox_mu",
    [
        ({"name": "sgd"}, 0.0),
        ({"name": "sgd", "momentum": 0.9, "weight_decay": 1e-3}, 0.0),
        ({"name": "momentum", "momentum": 0.9}, 0.5),
        ({"name": "adamw", "weight_decay": 0.01}, 0.0),
        ({"name": "adamw", "weight_decay": 0.0}, 0.1),
        ({"name": "sgd", "momentum": 0.9, "weight_decay": 1e-3, "max_grad_norm": 0.1}, 0.5),
        ({"name": "adamw", "weight_decay": 0.01, "max_grad_norm": 0.1}, 0.0),
    ],
)
def test_updates_match_torch_optim(mlp, digits, opt_spec, prox_mu):
    x, y = digits[0][:64], digits[1][:64]
    steps, lr = 5, 0.05 if opt_spec["name"] != "adamw" else 0.01
    # one full batch per epoch: the same gradient steps torch takes on the whole batch
    result = Trainer(mlp).train(mlp.initial_params, x, y, epochs=steps, batch_size=64, lr=lr, prox_mu=prox_mu,
                                optimizer=opt_spec)
    expected = _torch_steps(mlp, mlp.initial_params, x, y, steps, lr, opt_spec, prox_mu)
    for name, d in expected.items():
        np.testing.assert_allclose(result.delta[name], d, rtol=2e-3, atol=2e-6, err_msg=name)
    assert result.metrics["steps"] == steps


def test_gradient_clipping_bounds_every_step(mlp, digits):
    """With max_grad_norm, plain SGD moves the parameters by at most lr * max_grad_norm a step, however steep
    the batch; without it the same steps go further."""
    x, y = digits[0][:64], digits[1][:64]
    steps, lr, clip = 4, 0.05, 0.01

    def moved(spec):
        delta = Trainer(mlp).train(mlp.initial_params, x, y, epochs=steps, batch_size=64, lr=lr, optimizer=spec).delta
        return float(np.sqrt(sum(np.vdot(d, d) for d in delta.values())))

    assert moved({"name": "sgd", "max_grad_norm": clip}) <= steps * lr * clip * (1 + 1e-4)
    assert moved({"name": "sgd"}) > 10 * steps * lr * clip
    with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
        Trainer(mlp).train(mlp.initial_params, x, y, epochs=1, batch_size=64, lr=lr,
                           optimizer={"name": "sgd", "max_grad_norm": 0})


def test_training_lowers_the_loss_and_learns_digits(mlp, digits):
    x, y = digits
    trainer = Trainer(mlp, threads=1)
    result = trainer.train(mlp.initial_params, x[:1200], y[:1200], epochs=3, batch_size=32, lr=0.05, seed=1)
    m = result.metrics
    assert m["loss_after"] < 0.5 * m["loss_before"]
    assert m["accuracy_after"] > 0.9
    assert result.num_samples == 1200
    new = {k: mlp.initial_params[k] + result.delta[k] for k in result.delta}
    held_out = trainer.evaluate(new, x[1200:], y[1200:])
    assert held_out["accuracy"] > 0.85
    assert np.mean(trainer.predict(new, x[1200:]) == y[1200:]) == pytest.approx(held_out["accuracy"])
    assert held_out["loss"] < trainer.evaluate(mlp.initial_params, x[1200:], y[1200:])["loss"]


def test_fedprox_keeps_the_update_close_to_the_global_model(mlp, digits):
    x, y = digits[0][:256], digits[1][:256]
    plain = Trainer(mlp).train(mlp.initial_params, x, y, epochs=3, batch_size=32, lr=0.05, seed=0)
    prox = Trainer(mlp).train(mlp.initial_params, x, y, epochs=3, batch_size=32, lr=0.05, seed=0, prox_mu=5.0)
    norm = lambda d: np.sqrt(sum(float((v**2).sum()) for v in d.values()))  # noqa: E731
    assert norm(prox.delta) < 0.8 * norm(plain.delta)


def test_same_seed_same_update_and_inputs_untouched(mlp, digits):
    x, y = digits[0][:100], digits[1][:100]
    params = {k: v.copy() for k, v in mlp.initial_params.items()}
    a = Trainer(mlp).train(params, x, y, epochs=2, batch_size=16, lr=0.05, seed=7)  # 100 = 6*16 + a tail of 4
    b = Trainer(mlp, threads=2).train(params, x, y, epochs=2, batch_size=16, lr=0.05, seed=7)
    for k in params:
        np.testing.assert_array_equal(params[k], mlp.initial_params[k])
        np.testing.assert_allclose(a.delta[k], b.delta[k], rtol=1e-4, atol=1e-6)
    assert a.metrics["steps"] == 14
    c = Trainer(mlp).train(params, x, y, epochs=2, batch_size=16, lr=0.05, seed=8)
    assert any(not np.allclose(a.delta[k], c.delta[k]) for k in params)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_bad_inputs_are_refused_with_the_problem_named(mlp, digits):
    x, y = digits[0][:10], digits[1][:10]
    t = Trainer(mlp)
    p = mlp.initial_params
    with pytest.raises(ValueError, match=r"labels must be in 0..9"):
        t.train(p, x, np.full(10, 12), epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="10 inputs but 9 labels"):
        t.train(p, x, y[:9], epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match=r"per-sample shape \(8, 8\)"):
        t.train(p, x.reshape(10, 8, 8), y, epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match=r"missing \['fc2.bias'\]"):
        t.train({k: v for k, v in p.items() if k != "fc2.bias"}, x, y, epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="learning rate"):
        t.train(p, x, y, epochs=1, batch_size=4, lr=float("nan"))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        t.train(p, x * 1e30, y, epochs=3, batch_size=4, lr=1e30)

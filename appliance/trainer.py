"""Local training on the device: a model package's training graph on the stock onnxruntime, and a numpy
optimiser.

The training graph maps (input, labels, parameters...) -> (loss, gradient per parameter); the optimiser (SGD,
momentum, AdamW, plus the FedProx proximal term) updates the parameters in numpy. Each step reuses the same
buffers: parameters, gradients and the batch are numpy arrays that onnxruntime reads and writes in place
through an IOBinding, so a step allocates nothing in Python beyond onnxruntime's own arena.

Running statistics (batch norm) are graph inputs too; the training graph outputs their new values, which are
copied over the old ones after each step, untouched by the optimiser. Under the package's "aggregate" policy
they are parameters (they travel in the update and the aggregator averages them by sample count); under
"local" they stay on the device, in :attr:`Trainer.local_buffers` (FedBN).

Works with onnxruntime >= 1.18 and numpy >= 1.26 (only long-standing APIs are used).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from appliance.modelpkg import BUFFER_PREFIX, ModelPackage
from appliance.training_result import TrainResult


def _session(graph: bytes, threads: int, spin: bool) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # A memory pattern is one block planned per input shape (full batch, tail batch, evaluation batch) and
    # kept for the session's life; without it intermediates come from the arena and are reused across shapes.
    # Measured with the reference CNN: 3.5 MB less peak RSS, no measurable cost in samples/s (docs/budgets.md).
    so.enable_mem_pattern = False
    # Spinning worker threads burn the cgroup's CPU quota while they wait; off unless asked for.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


class Optimizer:
    """SGD / momentum / AdamW over named float32 arrays, updated in place, with the FedProx term
    ``mu * (w - w_global)`` added to each gradient. Matches torch.optim's update rules (SGD with L2 weight
    decay and dampening 0; AdamW with decoupled weight decay).

    ``max_grad_norm`` clips each step's gradient (the loss's, FedProx term included) to that global L2 norm
    first, as ``torch.nn.utils.clip_grad_norm_`` does. One unlucky batch of a skewed camera then cannot throw
    the model out of its basin: without it the reference CNN diverged (loss NaN, or held-out accuracy
    collapsing) in about one demo run of three at its learning rate (docs/models.md, "Gradient clipping").
    """

    def __init__(self, spec: Mapping[str, Any], params: Mapping[str, np.ndarray]):
        self.name = str(spec.get("name", "sgd"))
        self.momentum = float(spec.get("momentum", 0.9 if self.name == "momentum" else 0.0))
        default_wd = 0.01 if self.name == "adamw" else 0.0
        self.weight_decay = float(spec.get("weight_decay", default_wd))
        betas = spec.get("betas", [0.9, 0.999])
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(spec.get("eps", 1e-8))
        clip = spec.get("max_grad_norm")
        self.max_grad_norm = None if clip is None else float(clip)
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"optimizer {self.name}: max_grad_norm must be a positive number, got {clip!r}")
        if self.name not in ("sgd", "momentum", "adamw"):
            raise ValueError(f"unknown optimizer {self.name!r}; expected sgd, momentum or adamw")
        if not (0.0 <= self.momentum < 1.0 and 0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"optimizer {self.name}: momentum and betas must be in [0, 1)")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer {self.name}: weight_decay must be >= 0, got {self.weight_decay}")
        self.t = 0
        self._scratch = {k: np.empty_like(v) for k, v in params.items()}
        uses_velocity = self.name == "adamw" or self.momentum > 0
        self._m = {k: np.zeros_like(v) for k, v in params.items()} if uses_velocity else {}
        self._v = {k: np.zeros_like(v) for k, v in params.items()} if self.name == "adamw" else {}

    def step(
        self,
        params: Mapping[str, np.ndarray],
        grads: Mapping[str, np.ndarray],
        lr: float,
        prox_mu: float = 0.0,
        global_params: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """One update. ``grads`` are modified (they are the step's scratch gradients)."""
        self.t += 1
        adamw = self.name == "adamw"
        if adamw:
            c1 = 1.0 - self.beta1**self.t
            c2 = 1.0 - self.beta2**self.t
            step_size = lr / c1
            inv_sqrt_c2 = 1.0 / math.sqrt(c2)
        if prox_mu > 0.0 and global_params is not None:
            for name, w in params.items():
                tmp = self._scratch[name]
                np.subtract(w, global_params[name], out=tmp)
                tmp *= prox_mu
                grads[name] += tmp
        if self.max_grad_norm is not None:
            self._clip(grads)
        for name, w in params.items():
            g = grads[name]
            tmp = self._scratch[name]
            if adamw:
                if self.weight_decay > 0.0:
                    w *= 1.0 - lr * self.weight_decay
                m, v = self._m[name], self._v[name]
                m *= self.beta1
                np.multiply(g, 1.0 - self.beta1, out=tmp)
                m += tmp
                v *= self.beta2
                np.multiply(g, g, out=tmp)
                tmp *= 1.0 - self.beta2
                v += tmp
                np.sqrt(v, out=tmp)
                tmp *= inv_sqrt_c2
                tmp += self.eps
                np.divide(m, tmp, out=tmp)
                tmp *= step_size
                w -= tmp
                continue
            if self.weight_decay > 0.0:
                np.multiply(w, self.weight_decay, out=tmp)
                g += tmp
            if self.momentum > 0.0:
                buf = self._m[name]
                if self.t == 1:
                    buf[...] = g
                else:
                    buf *= self.momentum
                    buf += g
                g = buf
            np.multiply(g, lr, out=tmp)
            w -= tmp

    def _clip(self, grads: Mapping[str, np.ndarray]) -> None:
        """Scale ``grads`` in place to a global L2 norm of at most ``max_grad_norm`` (torch's 1e-6 included)."""
        norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
        coef = self.max_grad_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads.values():
                g *= np.float32(coef)


class Trainer:
    """Runs ``package``'s graphs with ``threads`` onnxruntime threads (from the CPU budget)."""

    def __init__(self, package: ModelPackage, threads: int = 1, *, spin: bool = False):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.package = package
        self.threads = threads
        self.spin = spin
        self._train_sess: ort.InferenceSession | None = None
        self._infer_sess: ort.InferenceSession | None = None
        self._eval_sess: ort.InferenceSession | None = None
        io = package.io
        self._input, self._labels = io["input"], io["labels"]
        self._loss, self._logits, self._grad_prefix = io["loss"], io["logits"], io["grad_prefix"]
        self._label_dtype = np.int64 if package.class_labels else np.float32
        #: Running statistics kept on this device (the "local" buffer policy); updated by :meth:`train`.
        self.local_buffers = {k: v.astype(np.float32, copy=True) for k, v in package.local_buffers.items()}

    @property
    def training_session(self) -> ort.InferenceSession:
        if self._train_sess is None:
            self._train_sess = _session(self.package.training_graph, self.threads, self.spin)
        return self._train_sess

    @property
    def inference_session(self) -> ort.InferenceSession:
        if self._infer_sess is None:
            self._infer_sess = _session(self.package.inference_graph, self.threads, self.spin)
        return self._infer_sess

    @property
    def evaluation_session(self) -> ort.InferenceSession:
        """(input, labels, parameters) -> (loss, logits) in eval mode; only packages that carry the graph."""
        if self._eval_sess is None:
            self._eval_sess = _session(self.package.evaluation_graph, self.threads, self.spin)
        return self._eval_sess

    # -- checks -------------------------------------------------------------------------------------

    def _params(self, params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A private float32 copy of ``params`` in spec order, checked against the package's specs."""
        specs = self.package.param_specs
        if set(params) != {s.name for s in specs}:
            missing = sorted({s.name for s in specs} - set(params))
            extra = sorted(set(params) - {s.name for s in specs})
            raise ValueError(f"{self.package.name}: parameters missing {missing}, unexpected {extra}")
        out = {}
        for s in specs:
            arr = np.array(params[s.name], dtype=np.float32, order="C", copy=True)
            if arr.shape != s.shape:
                raise ValueError(f"{self.package.name}: parameter {s.name} has shape {arr.shape}, needs {s.shape}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{self.package.name}: parameter {s.name} holds NaN or Inf")
            out[s.name] = arr
        return out

    def _data(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        y = np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        if len(y) == 0:
            raise ValueError("no samples: x and y are empty")
        shape = self.package.label_shape
        if self.package.class_labels:
            if y.shape[1:] != shape or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"labels must be an integer array shaped (N, {', '.join(map(str, shape))}), got "
                                 f"{y.dtype} with shape {y.shape}" if shape else
                                 f"labels must be a 1-D integer array, got {y.dtype} with shape {y.shape}")
            if y.min() < 0 or y.max() >= self.package.num_classes:
                raise ValueError(f"labels must be in 0..{self.package.num_classes - 1}, got {y.min()}..{y.max()}")
        else:
            if y.shape[1:] != shape or not np.issubdtype(y.dtype, np.number):
                raise ValueError(f"labels must be numbers shaped (N, {', '.join(map(str, shape))}), got {y.dtype} "
                                 f"with shape {y.shape}")
            if not np.isfinite(y).all():
                raise ValueError("labels hold NaN or Inf")
        # Normalised batch by batch into the step's buffer: no normalised copy of the whole data set.
        return self.package.check_inputs(x), np.ascontiguousarray(y, dtype=self._label_dtype)

    # -- evaluation ---------------------------------------------------------------------------------

    def _evaluate_prepared(
        self, params: Mapping[str, np.ndarray], xp: np.ndarray, y: np.ndarray, batch_size: int = 128
    ) -> dict[str, float]:
        """Mean loss (and accuracy, for class labels) in eval mode: with the package's evaluation graph when
        it has one (any loss), else softmax cross-entropy computed here from the inference graph's logits."""
        graph_loss = bool(self.package.evaluation_graph)
        sess = self.evaluation_session if graph_loss else self.inference_session
        feeds = {**params, **self.local_buffers}
        total_loss = 0.0
        correct = 0
        buf = np.empty((min(batch_size, len(y)), *xp.shape[1:]), dtype=np.float32)
        for start in range(0, len(y), batch_size):
            yb = y[start : start + batch_size]
            xb = self.package.preprocess_into(xp[start : start + batch_size], buf[: len(yb)])
            if graph_loss:
                loss, logits = sess.run([self._loss, self._logits], {self._input: xb, self._labels: yb, **feeds})
                total_loss += float(loss) * len(yb)
            else:
                (logits,) = sess.run([self._logits], {self._input: xb, **feeds})
                shifted = logits - logits.max(axis=1, keepdims=True)
                logsumexp = np.log(np.exp(shifted).sum(axis=1))
                total_loss += float((logsumexp - shifted[np.arange(len(yb)), yb]).sum())
            if self.package.class_labels:
                correct += int((logits.argmax(axis=1) == yb).sum())
        metrics = {"loss": total_loss / len(y)}
        if self.package.class_labels:
            metrics["accuracy"] = correct / y.size  # per sample, or per pixel for per-pixel classes
        return metrics

    def evaluate(self, params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Mean loss of ``params`` on (x, y) in eval mode, and accuracy when labels are class indices."""
        xp, yp = self._data(x, y)
        return self._evaluate_prepared(self._params(params), xp, yp)

    def outputs(self, params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """The model's raw outputs (logits, heatmaps...) for inputs ``x`` in ``input_range``."""
        p = self._params(params)
        xp = self.package.preprocess(x)
        (logits,) = self.inference_session.run([self._logits], {self._input: xp, **p, **self.local_buffers})
        return logits

    def predict(self, params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
        """Class index per input (per pixel for per-pixel classes)."""
        return self.outputs(params, x).argmax(axis=1)

    # -- training -----------------------------------------------------------------------------------

    def train(
        self,
        params: Mapping[str, np.ndarray],
        x: np.ndarray,
        y: np.ndarray,
        epochs: int,
        batch_size: int,
        lr: float,
        prox_mu: float = 0.0,
        seed: int = 0,
        *,
        optimizer: Mapping[str, Any] | None = None,
        measure: bool = True,
    ) -> TrainResult:
        """Train from ``params`` (not modified) on (x, y); returns the delta and metrics.

        ``optimizer`` overrides the package's optimiser spec. ``measure`` adds loss/accuracy on the training
        data before and after (one forward pass each, with the inference graph).
        """
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"learning rate must be a positive number, got {lr}")
        if not (math.isfinite(prox_mu) and prox_mu >= 0):
            raise ValueError(f"prox_mu must be >= 0, got {prox_mu}")
        started = time.perf_counter()
        base = self._params(params)
        xp, yp = self._data(x, y)
        n = len(yp)
        work = {k: v.copy() for k, v in base.items()}
        metrics: dict[str, float] = {}
        batch = min(batch_size, n)
        # The measuring passes run in training-sized batches: the inference session's arena grows to the
        # largest batch it has run and keeps that memory, so a bigger evaluation batch raises the peak.
        if measure:
            before = self._evaluate_prepared(base, xp, yp, batch)
            metrics.update({f"{k}_before": v for k, v in before.items()})

        sess = self.training_session
        binding = sess.io_binding()
        # Running statistics: the aggregated ones are among the parameters, the local ones this trainer's own.
        stats = {k: work[k] for k in self.package.buffer_names if k in work} or self.local_buffers
        for name, w in {**work, **stats}.items():  # onnxruntime reads them in place: the optimiser updates them
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(w))
        trained = {k: work[k] for k in self.package.trainable_names}
        grads = {k: np.empty_like(v) for k, v in trained.items()}
        grad_values = {k: ort.OrtValue.ortvalue_from_numpy(g) for k, g in grads.items()}
        new_stats = {k: np.empty_like(v) for k, v in stats.items()}
        for name, value in new_stats.items():
            binding.bind_ortvalue_output(BUFFER_PREFIX + name, ort.OrtValue.ortvalue_from_numpy(value))
        loss = np.zeros((), dtype=np.float32)
        loss_value = ort.OrtValue.ortvalue_from_numpy(loss)
        opt = Optimizer(optimizer if optimizer is not None else self.package.optimizer, trained)

        xbuf = np.empty((batch, *xp.shape[1:]), dtype=np.float32)
        ybuf = np.empty((batch, *yp.shape[1:]), dtype=yp.dtype)
        full = (ort.OrtValue.ortvalue_from_numpy(xbuf), ort.OrtValue.ortvalue_from_numpy(ybuf))
        tail = n % batch
        xtail, ytail = xbuf[:tail], ybuf[:tail]
        part = (ort.OrtValue.ortvalue_from_numpy(xtail), ort.OrtValue.ortvalue_from_numpy(ytail)) if tail else None

        binding.bind_ortvalue_output(self._loss, loss_value)
        for name, gv in grad_values.items():
            binding.bind_ortvalue_output(self._grad_prefix + name, gv)

        normalise = self.package.preprocess_into
        rng = np.random.default_rng(seed)
        loop_started = time.perf_counter()
        steps = 0
        epoch_loss = 0.0
        global_params = {k: base[k] for k in trained} if prox_mu > 0 else None
        for _ in range(epochs):
            order = rng.permutation(n)
            epoch_loss = 0.0
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                k = len(idx)
                if k == batch:
                    xb, yb, (xv, yv) = xbuf, ybuf, full
                else:
                    xb, yb, (xv, yv) = xtail, ytail, part
                np.take(xp, idx, axis=0, out=xb)
                np.take(yp, idx, axis=0, out=yb)
                normalise(xb, xb)
                binding.bind_ortvalue_input(self._input, xv)
                binding.bind_ortvalue_input(self._labels, yv)
                sess.run_with_iobinding(binding)
                step_loss = float(loss)
                if not math.isfinite(step_loss):
                    raise FloatingPointError(
                        f"{self.package.name}: loss became {step_loss} at step {steps + 1}; lower the learning rate"
                    )
                epoch_loss += step_loss * k
                opt.step(trained, grads, lr, prox_mu, global_params)
                for name, value in new_stats.items():
                    np.copyto(stats[name], value)
                steps += 1
        train_seconds = time.perf_counter() - loop_started
        metrics["train_loss"] = epoch_loss / n
        metrics["steps"] = float(steps)
        if measure:
            after = self._evaluate_prepared(work, xp, yp, batch)
            metrics.update({f"{k}_after": v for k, v in after.items()})
        delta = {k: work[k] - base[k] for k in work}
        seconds = time.perf_counter() - started
        metrics["samples_per_second"] = n * epochs / train_seconds if train_seconds > 0 else 0.0
        return TrainResult(delta=delta, num_samples=n, metrics=metrics, seconds=seconds)

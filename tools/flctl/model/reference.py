"""The two reference models (flctl.model.refmodels: hand-written graphs) as checked packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from nacl.signing import SigningKey

from appliance.modelpkg import ModelPackage, write_package
from appliance.wire import ParamSpec
from flctl.model import refmodels
from flctl.model.check import CheckReport, check_against_torch


def build_reference_package(model: str, seed: int = 0) -> tuple[ModelPackage, CheckReport]:
    """Build and check a reference model package (unsigned). Raises GradientCheckError on a mismatch."""
    import torch

    if model not in refmodels.MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(refmodels.MODELS)}")
    spec = refmodels.MODELS[model]
    torch.manual_seed(seed)
    module = refmodels.torch_module(spec)
    refmodels.init_parameters(module, seed)
    params = {k: v.detach().numpy().astype(np.float32).copy() for k, v in module.named_parameters()}
    training, inference = refmodels.training_graph(spec), refmodels.inference_graph(spec)
    report = check_against_torch(spec, training, inference, params, seed=seed)
    pkg = ModelPackage(
        name=spec.name,
        param_specs=[ParamSpec(n, tuple(s)) for n, s in refmodels.param_shapes(spec).items()],
        initial_params=params,
        training_graph=training,
        inference_graph=inference,
        optimizer=dict(spec.optimizer),
        preprocessing=dict(spec.preprocessing),
        num_classes=spec.num_classes,
        task=spec.task,
        class_names=list(spec.class_names),
    )
    return pkg, report


def export_reference_package(model: str, out: Path, key: SigningKey, seed: int = 0) -> bytes:
    """Build, check, sign with the aggregator ``key`` and write a reference package; returns its digest."""
    pkg, _ = build_reference_package(model, seed)
    return write_package(out, pkg, key)

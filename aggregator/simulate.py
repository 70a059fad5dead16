"""Synthetic models and simulated devices, for benchmarks, tests and load checks on loopback.

A synthetic package stands in for a real model package (appliance/modelpkg.py) where only the parameter
layout matters: the aggregator never runs the model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import numpy as np
from nacl.signing import SigningKey

from aggregator.models import ServedPackage
from appliance import wire
from appliance.wire import ParamSpec


@dataclass(frozen=True)
class SyntheticPackage:
    """Satisfies :class:`aggregator.models.PackageInfo`."""

    name: str
    digest: bytes
    param_specs: list[ParamSpec]
    initial_params: dict[str, np.ndarray]


def synthetic_package(parameters: int, tensors: int = 2, seed: int = 0) -> ServedPackage:
    """A model of ``parameters`` float32 values split over ``tensors`` tensors (the last one 1-D)."""
    if parameters < tensors or tensors < 1:
        raise ValueError(f"need at least one parameter per tensor ({parameters} parameters, {tensors} tensors)")
    sizes = [parameters // tensors] * tensors
    sizes[-1] += parameters - sum(sizes)
    specs = []
    for i, size in enumerate(sizes):
        if i < tensors - 1 and size % 10 == 0:
            specs.append(ParamSpec(f"layer{i}.weight", (size // 10, 10)))
        else:
            specs.append(ParamSpec(f"layer{i}.bias" if i == tensors - 1 else f"layer{i}.weight", (size,)))
    rng = np.random.default_rng(seed)
    initial = {s.name: rng.normal(0, 0.05, s.shape).astype(np.float32) for s in specs}
    raw = json.dumps(
        {"synthetic": True, "seed": seed, "specs": [[s.name, list(s.shape)] for s in specs]}, sort_keys=True
    ).encode()
    info = SyntheticPackage(
        name=f"synthetic-{parameters}", digest=hashlib.sha256(raw).digest(), param_specs=specs, initial_params=initial
    )
    return ServedPackage(info=info, raw=raw)


@dataclass
class SimulatedDevice:
    """A device key and the ability to sign updates for a task."""

    key: SigningKey = field(default_factory=SigningKey.generate)

    @property
    def device_id(self) -> str:
        return wire.key_id(self.key.verify_key)

    @property
    def public_key_hex(self) -> str:
        return bytes(self.key.verify_key).hex()

    def update(
        self,
        task: wire.Task,
        tensors: dict[str, np.ndarray],
        num_samples: int = 32,
        metrics: dict[str, float] | None = None,
        encoding: str = "float32",
        created_at: int | None = None,
    ) -> bytes:
        """A signed upload body answering ``task`` with the delta ``tensors``."""
        update = wire.Update(
            device_id=self.device_id,
            round_id=task.round_id,
            model_version=task.model_version,
            base_digest=task.model_digest,
            num_samples=num_samples,
            tensors=tensors,
            metrics=metrics or {},
            encoding=encoding,
            created_at=int(time.time()) if created_at is None else created_at,
        )
        return wire.encode_update(update, self.key)


def random_delta(specs: list[ParamSpec], rng: np.random.Generator, scale: float = 0.01) -> dict[str, np.ndarray]:
    return {s.name: (rng.standard_normal(s.shape, dtype=np.float32) * np.float32(scale)) for s in specs}

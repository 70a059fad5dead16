"""Secure rounds on a real aggregator on loopback, played by simulated devices with the agent's own client
(appliance/secagg_client.py), one phase at a time so a test can stop any device after any phase."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from aggregator_harness import Harness, running

from aggregator.rounds import RoundPolicy, TrainingPlan
from aggregator.secagg_round import SecAggConfig
from appliance import wire
from appliance.secagg_client import SecureRound, Transport

CLIP = 1.0


@contextlib.asynccontextmanager
async def secure_running(state_dir: Path, devices: int = 4, parameters: int = 50, round_timeout: float = 60,
                         phase_timeout: float = 10, **overrides: Any) -> AsyncIterator[Harness]:
    """An aggregator whose rounds are secure, with ``devices`` enrolled devices (all of them the goal)."""
    overrides.setdefault("policy", RoundPolicy(min_clients=2, goal_clients=devices, round_timeout=round_timeout))
    overrides.setdefault("secure_aggregation", SecAggConfig(phase_timeout=phase_timeout))
    async with running(state_dir, devices=devices, parameters=parameters, plan=TrainingPlan(clip_norm=CLIP),
                       **overrides) as h:
        yield h


def transport(h: Harness) -> Transport:
    return Transport(str(h.client.server.make_url("")).rstrip("/"), h.client.session, h.key.verify_key)


def secure_rounds(h: Harness, task: wire.Task) -> list[SecureRound]:
    return [SecureRound(transport(h), task, d.device_id, d.key) for d in h.devices]


def flat_delta(h: Harness, scale: float = 0.01) -> np.ndarray:
    return np.concatenate([v.ravel() for v in h.delta(scale).values()]).astype(np.float32)


PHASES = ("advertise", "join", "share", "receive")


async def until_masked(rounds: list[SecureRound], stop_after: str = "receive") -> None:
    """Every device through advertise, roster (join), share and the check of its routed shares (receive), one phase
    at a time; ``stop_after`` names the last phase to play, so a test can act on the aggregator between two."""
    for phase in PHASES[: PHASES.index(stop_after) + 1]:
        await asyncio.gather(*(getattr(r, phase)() for r in rounds))


def expected_mean(deltas: list[np.ndarray], samples: list[int]) -> np.ndarray:
    weights = np.array(samples, dtype=np.float64)
    return (sum(w * d.astype(np.float64) for w, d in zip(weights, deltas, strict=True)) / weights.sum())

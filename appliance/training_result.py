"""What a local training run returns, in a module of its own.

The result crosses from the trainer child back to the agent by pickling, and unpickling imports the
class's module: defined beside the trainer, it made the agent process import onnxruntime (~45 MB resident)
for a dataclass. Here it needs numpy alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainResult:
    """What one round of local training produced. ``delta`` is new minus base parameters."""

    delta: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

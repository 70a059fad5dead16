"""Column-chunked access to a round's updates, so rules that need all updates at once stay memory-bounded.

Each update is a flat float32 delta (usually a view of a memory-mapped spool segment). :meth:`UpdateSet.chunks`
yields an ``(n_updates, columns)`` matrix for successive column ranges, sized so one matrix stays under a byte
budget whatever the number of updates.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass
class UpdateSet:
    """A round's accepted updates: one delta vector and one weight (sample count) each."""

    deltas: Sequence[np.ndarray]
    weights: np.ndarray
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    def __post_init__(self) -> None:
        self.weights = np.asarray(self.weights, dtype=np.float64)
        if len(self.deltas) != len(self.weights):
            raise ValueError(f"{len(self.deltas)} deltas but {len(self.weights)} weights")
        sizes = {len(d) for d in self.deltas}
        if len(sizes) > 1:
            raise ValueError(f"deltas of different sizes {sorted(sizes)}")
        self.size = sizes.pop() if sizes else 0

    def __len__(self) -> int:
        return len(self.deltas)

    def columns_per_chunk(self) -> int:
        return max(1, self.chunk_bytes // (4 * max(1, len(self.deltas))))

    def chunks(self, rows: Sequence[int] | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, matrix)`` over all columns; ``rows`` picks a subset of updates (default all)."""
        picked = list(range(len(self.deltas))) if rows is None else list(rows)
        step = self.columns_per_chunk()
        buffer = np.empty((len(picked), min(step, self.size)), dtype=np.float32)
        for start in range(0, self.size, step):
            stop = min(start + step, self.size)
            matrix = buffer[:, : stop - start]
            for i, row in enumerate(picked):
                matrix[i] = self.deltas[row][start:stop]
            yield start, stop, matrix

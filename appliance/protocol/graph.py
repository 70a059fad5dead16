"""Who masks with whom: the SecAgg+ neighbour graph (Bell et al. 2020), or everyone (Bonawitz et al. 2017).

A round's devices are numbered 0..n-1 (their order in the roster). With k neighbours each, the graph is a
Harary graph on a random ring: the devices are placed on a ring in the order of SHA-256(seed || index as
4 bytes big-endian), and each is joined to the k/2 nearest on either side. That makes a k-regular graph
that neither the aggregator nor any device picks alone (the seed is the digest of the roster, see
:mod:`appliance.protocol.secagg`), and every device can compute it from the roster.

A device masks with, and shares its secrets among, its k neighbours only, so its work grows with k, not n.
k about 2 log2 n keeps the sum private and recoverable with high probability under the dropout rates and
collusion bounds Bell et al. analyse; k >= n-1 is the complete graph of the original protocol.
"""

from __future__ import annotations

import hashlib
import math


def default_neighbours(n: int) -> int:
    """k = 2 * ceil(log2 n) (an even number), or n-1 when that is fewer: the complete graph."""
    if n < 2:
        return 0
    return min(n - 1, 2 * math.ceil(math.log2(n)))


def effective_neighbours(n: int, requested: int | None) -> int:
    """The degree actually used: ``requested`` (None or 0: :func:`default_neighbours`) rounded up to even, at
    most n-1 (the complete graph). A ring joins k/2 devices on each side, so an odd k is rounded up."""
    if n < 2:
        return 0
    if requested is None or requested == 0:
        return default_neighbours(n)
    if requested < 0:
        raise ValueError(f"the number of neighbours must be positive, got {requested}")
    k = requested + (requested % 2)
    return n - 1 if k >= n - 1 else k


def ring_order(n: int, seed: bytes) -> list[int]:
    """The devices 0..n-1 in their order on the ring."""
    return sorted(range(n), key=lambda i: hashlib.sha256(seed + i.to_bytes(4, "big")).digest())


def neighbours(n: int, k: int, seed: bytes) -> list[list[int]]:
    """Each device's neighbours (sorted indices, never itself) in the k-regular graph of ``seed``."""
    if k >= n - 1:
        return [[j for j in range(n) if j != i] for i in range(n)]
    if k % 2:
        raise ValueError("an incomplete ring graph needs an even number of neighbours")
    order = ring_order(n, seed)
    position = {device: p for p, device in enumerate(order)}
    out = []
    for i in range(n):
        p = position[i]
        out.append(sorted(order[(p + step) % n] for d in range(1, k // 2 + 1) for step in (d, -d)))
    return out

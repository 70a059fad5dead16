"""Flower's server-side FedAvg, timed: the peer bench/aggregator.py sets against our upload path.

Runs in Flower's own interpreter (a venv with flwr, which pins protobuf and grpc versions the project's venv
should not be forced onto), where this project is not installed: so it imports the standard library, numpy
and flwr, and nothing else (tests/test_bench_aggregator.py checks it).

    FLOWER_VENV/bin/python bench/flower_fedavg.py PARAMETERS CLIENTS     # prints one JSON line
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import flwr
import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.strategy import FedAvg


def flower_fedavg(parameters: int, clients: int, seed: int = 0) -> dict[str, Any]:
    """``FedAvg.aggregate_fit`` (in-place aggregation, the default) over ``clients`` results of ``parameters``
    float32 values in Flower's wire form, from the list of results to the aggregate."""
    sizes = [parameters // 2, parameters - parameters // 2]  # the synthetic model's two tensors
    rng = np.random.default_rng(seed)
    pool = [[rng.normal(0, 0.01, s).astype(np.float32) for s in sizes] for _ in range(4)]
    results = []
    for i in range(clients):
        wire_form = ndarrays_to_parameters(pool[i % len(pool)])
        # each client's bytes are its own object, as they are when they arrive from the network
        wire_form.tensors = [bytes(bytearray(t)) for t in wire_form.tensors]
        results.append((None, FitRes(Status(Code.OK, ""), wire_form, int(rng.integers(1, 100)), {})))
    started = time.perf_counter()
    aggregated, _ = FedAvg().aggregate_fit(1, results, [])
    seconds = time.perf_counter() - started
    if aggregated is None:
        raise RuntimeError("Flower's FedAvg returned no aggregate")
    return {"seconds": seconds, "updates_per_s": clients / seconds,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "version": flwr.__version__}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not all(a.isdigit() and int(a) > 0 for a in argv):
        print("usage: flower_fedavg.py PARAMETERS CLIENTS (positive integers)", file=sys.stderr)
        return 2
    print(json.dumps(flower_fedavg(int(argv[0]), int(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

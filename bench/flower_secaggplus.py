"""Flower's SecAgg+ round (``SecAggPlusWorkflow`` + ``secaggplus_mod``), timed: run by bench/secagg.py in Flower's
own interpreter (a venv with ``pip install 'flwr[simulation]'``), so it needs nothing of this project.

Flower's simulation engine (Ray) runs N ClientApps on ``--actors`` actors; each client returns a fixed random
update of P float32 parameters; the ServerApp runs FedAvg under SecAgg+ (Flower's legacy API, the only one it
exists for) for one warm-up round and ``--rounds`` timed ones. Prints one JSON line: the timed rounds' wall
times (the fit workflow, from the first message to the aggregate).

    python bench/flower_secaggplus.py --clients 100 --params 1000000 --shares 15 --threshold 8
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--shares", type=int, required=True, help="num_shares (the client itself included)")
    parser.add_argument("--threshold", type=int, required=True, help="reconstruction_threshold")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    update = np.random.default_rng(0).normal(0, 0.01, args.params).astype(np.float32)

    class Client(NumPyClient):
        def fit(self, parameters, config):
            return [parameters[0] + update], 1, {}

    client_app = ClientApp(client_fn=lambda context: Client().to_client(), mods=[secaggplus_mod])
    server_app = ServerApp()
    seconds: list[float] = []
    secagg = SecAggPlusWorkflow(num_shares=args.shares, reconstruction_threshold=args.threshold)

    def timed_fit(grid, context):
        started = time.perf_counter()
        secagg(grid, context)
        seconds.append(time.perf_counter() - started)

    @server_app.main()
    def run(grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_fit_clients=args.clients, min_available_clients=args.clients,
                          initial_parameters=ndarrays_to_parameters([np.zeros(args.params, np.float32)]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1 + args.rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 2 / args.actors}, "init_args": {"num_cpus": 2}})
    print(json.dumps({"clients": args.clients, "params": args.params, "round_seconds": seconds[1:]}), flush=True)


if __name__ == "__main__":
    main()

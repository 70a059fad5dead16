"""Flower's SecAgg+ round (``SecAggPlusWorkflow`` + ``secaggplus_mod``), timed: run by bench/secagg.py in Flower's
own interpreter (a venv with ``pip install 'flwr[simulation]'``), so it needs nothing of this project.

Flower's simulation engine (Ray) runs N ClientApps on ``--actors`` actors; each client returns a fixed random
update of P float32 parameters; the ServerApp runs FedAvg under SecAgg+ (Flower's legacy API, the only one it
exists for) for one warm-up round and ``--rounds`` timed ones; with ``--plain``, FedAvg's rounds without SecAgg+,
the same simulation otherwise (its message passing, the model sent to every client, the aggregation). Prints one
JSON line: the timed rounds' wall times (the fit workflow, from the first message to the aggregate) and their CPU
times: user + system time of the whole process tree (this ServerApp, Ray's GCS, raylet and workers, the actors
running the ClientApps), read from /proc before and after each round. ``--cpus 1`` pins the tree to one CPU (every
thread of this process, then Ray's processes inherit the affinity) and gives Ray one CPU, so one actor runs every
client: its wall time is then a one-core round.

    python bench/flower_secaggplus.py --clients 100 --params 1000000 --shares 15 --threshold 8 --cpus 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.simulation import run_simulation
from proctree import pin_threads  # bench/proctree.py, beside this script: nothing else of the project


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """User + system CPU seconds of ``root`` and all its living descendants (and of the children they reaped), by
    part: ``serverapp`` (``root``), ``actors`` (Ray's workers, named ``ray::...``: the ClientApps) and ``ray`` (the
    rest: GCS, raylet, dashboard, log monitor)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parent_of, cpu, name = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        parent_of[int(entry.name)] = int(fields[1])
        name[int(entry.name)] = stat[stat.index("(") + 1 : stat.rindex(")")]
        cpu[int(entry.name)] = sum(int(f) for f in fields[11:15]) / ticks  # utime, stime, cutime, cstime
    parts = {"serverapp": 0.0, "actors": 0.0, "ray": 0.0}
    for pid in cpu:
        p = pid
        while p not in (0, 1, root) and p in parent_of:
            p = parent_of[p]
        if p == root:
            part = "serverapp" if pid == root else "actors" if name[pid].startswith("ray::") else "ray"
            parts[part] += cpu[pid]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--params", type=int, required=True)
    parser.add_argument("--shares", type=int, required=True, help="num_shares (the client itself included)")
    parser.add_argument("--threshold", type=int, required=True, help="reconstruction_threshold")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="the same rounds without SecAgg+: Flower's default fit "
                        "workflow and no client mod (what Flower's round costs without secure aggregation)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs for Ray (and, if fewer than this machine's, the "
                        "ones the process tree is pinned to)")
    args = parser.parse_args()
    if args.cpus < len(os.sched_getaffinity(0)):
        pin_threads(set(sorted(os.sched_getaffinity(0))[: args.cpus]))
    update = np.random.default_rng(0).normal(0, 0.01, args.params).astype(np.float32)

    class Client(NumPyClient):
        def fit(self, parameters, config):
            return [parameters[0] + update], 1, {}

    client_app = ClientApp(client_fn=lambda context: Client().to_client(), mods=[] if args.plain else [secaggplus_mod])
    server_app = ServerApp()
    seconds: list[float] = []
    cpu_seconds: list[dict[str, float]] = []
    fit = default_fit_workflow if args.plain else SecAggPlusWorkflow(num_shares=args.shares,
                                                                     reconstruction_threshold=args.threshold)

    def timed_fit(grid, context):
        started, cpu_started = time.perf_counter(), tree_cpu_seconds(os.getpid())
        fit(grid, context)
        seconds.append(time.perf_counter() - started)
        cpu_ended = tree_cpu_seconds(os.getpid())
        cpu_seconds.append({part: round(cpu_ended[part] - cpu_started[part], 2) for part in cpu_ended})

    @server_app.main()
    def run(grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_fit_clients=args.clients, min_available_clients=args.clients,
                          initial_parameters=ndarrays_to_parameters([np.zeros(args.params, np.float32)]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=1 + args.rounds), strategy=strategy)
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": args.cpus / args.actors},
                                   "init_args": {"num_cpus": args.cpus}})
    print(json.dumps({"clients": args.clients, "params": args.params, "actors": args.actors, "cpus": args.cpus,
                      "plain": args.plain,
                      "round_seconds": seconds[1:], "round_cpu_seconds": cpu_seconds[1:]}), flush=True)


if __name__ == "__main__":
    main()

"""Prometheus metrics of the agent, ``fl_agent_*``.

Labels stay low-cardinality: never a device id (Prometheus knows the target), only bounded reasons. Counters
that live in other modules (the outbox's, the cameras') are read at scrape time by a collector, so those
modules stay free of Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance import __version__

TRAIN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class Reading:
    """A value read from another module at scrape time."""

    name: str
    doc: str
    kind: str  # "counter" or "gauge"
    read: Callable[[], float | Mapping[str, float]]
    label: str = "reason"


class ModuleCollector(Collector):
    """Turns ``Reading`` callbacks into metric families at scrape time."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def add(self, reading: Reading) -> None:
        self.readings.append(reading)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for r in self.readings:
            value = r.read()
            family_type = CounterMetricFamily if r.kind == "counter" else GaugeMetricFamily
            if isinstance(value, Mapping):
                family = family_type(r.name, r.doc, labels=[r.label])
                for label, v in sorted(value.items()):
                    family.add_metric([label], float(v))
            else:
                family = family_type(r.name, r.doc, value=float(value))
            yield family


@dataclass
class AgentMetrics:
    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.info = Info("fl_agent_build", "fl-agent version", registry=r)
        self.info.info({"version": __version__})
        self.rounds_joined = Counter(
            "fl_agent_rounds_joined", "Rounds taken part in: task received, signed model accepted", registry=r
        )
        self.rounds = Counter("fl_agent_rounds", "Rounds this device trained and queued an update for", registry=r)
        self.rounds_completed = Counter(
            "fl_agent_rounds_completed", "Rounds whose update the aggregator acknowledged with a receipt", registry=r
        )
        self.rounds_skipped = Counter(
            "fl_agent_rounds_skipped", "Rounds not trained, by reason", ["reason"], registry=r
        )
        self.training_seconds = Histogram(
            "fl_agent_training_seconds", "Wall time of one local training run", buckets=TRAIN_BUCKETS, registry=r
        )
        self.samples = Counter("fl_agent_training_samples", "Samples trained on (summed over epochs)", registry=r)
        self.train_loss = Gauge("fl_agent_train_loss", "Mean training loss of the last local run", registry=r)
        self.update_bytes = Counter("fl_agent_update_bytes", "Bytes of signed updates queued", registry=r)
        self.trainer_kills = Counter(
            "fl_agent_trainer_killed", "Trainer child processes killed, by cause", ["cause"], registry=r
        )
        self.models_refused = Counter(
            "fl_agent_models_refused", "Model releases or packages refused, by reason", ["reason"], registry=r
        )
        self.aggregator_errors = Counter(
            "fl_agent_aggregator_errors", "Failed exchanges with the aggregator", ["operation"], registry=r
        )
        self.round = Gauge("fl_agent_round", "Round id of the last task received", registry=r)
        self.model_version = Gauge("fl_agent_model_version", "Global model version in use", registry=r)
        self.budget_cpus = Gauge("fl_agent_budget_cpus", "CPU quota of the agent's cgroup (0: none)", registry=r)
        self.budget_memory = Gauge(
            "fl_agent_budget_memory_bytes", "memory.max of the agent's cgroup (0: none)", registry=r
        )
        self.budget_advisory = Gauge(
            "fl_agent_budget_advisory", "1 when budgets cannot be enforced (no delegated cgroup v2)", registry=r
        )
        self.trainer_threads = Gauge("fl_agent_trainer_threads", "Threads the trainer is allowed", registry=r)
        self.clock_offset = Gauge(
            "fl_agent_clock_offset_seconds",
            "Aggregator time minus this device's clock, learnt from signed tasks (positive: the device is behind; "
            "0 while the device clock agrees with the tasks; NaN before the first task)",
            registry=r,
        )
        self.pressure_pause = Counter(
            "fl_agent_pressure_pause_seconds", "Time training waited for memory pressure to fall", registry=r
        )
        self.modules = ModuleCollector()
        r.register(self.modules)

    def serve(self, listen: str) -> None:
        """Expose /metrics on ``HOST:PORT`` in a daemon thread (prometheus-client's own server)."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)

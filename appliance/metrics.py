"""Prometheus metrics of the agent, ``fl_agent_*``.

Labels stay low-cardinality: never a device id (Prometheus knows the target), only bounded reasons. Counters
that live in other modules (the outbox's, the cameras') are read at scrape time by a collector, so those
modules stay free of Prometheus.

Every label value the code uses is declared below and its series created at start, at 0: a counter's first
event is then an increase that ``rate()`` and ``increase()`` see, and an alert on a reason works from the first
scrape. tests/test_metrics_initialised.py holds the code to these tuples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from appliance import __version__
from appliance.config import ConfigError
from appliance.metrics_web import MetricsServer, WebConfigError, load_web_config, start_metrics_server
from appliance.outbox import UNREADABLE
from appliance.package_fit import UNFIT_REASON
from appliance.reasons import DECODER_REASONS, PACKAGE_REASONS, UPDATE_REFUSAL_REASONS
from appliance.storage_errors import STORAGE_REASONS

TRAIN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# The label values of each labelled counter, by metric name.
# A round given up because the data partition refused what it had to store counts under the storage reason.
ROUND_SKIP_REASONS = ("deadline-passed", "no-data", "trainer-failed", "trainer-killed", *STORAGE_REASONS)
TRAINER_KILL_CAUSES = ("oom", "signal")
# A refused package or release: what the decoder and the package reader raise, the agent's own checks
# that the package and the release are the ones the task names, and that the package fits the device's data.
MODEL_REFUSAL_REASONS = (*DECODER_REASONS, *PACKAGE_REASONS, "wrong-package", "wrong-model", UNFIT_REASON)
AGGREGATOR_OPERATIONS = ("task", "heartbeat")
# The aggregator's reasons, the outbox's own ("corrupt": stored bytes that no longer match their digest;
# UNREADABLE: a file the card failed to read READ_ATTEMPTS times in a row, set aside) and the client's for a
# refusal that names none ("unknown").
UPDATE_REJECTION_REASONS = (*UPDATE_REFUSAL_REASONS, "corrupt", UNREADABLE, "unknown")
# The outbox counts a failed send under the exception's class name; the agent's send raises only this one.
DELIVERY_FAILURE_REASONS = ("AggregatorUnavailable",)
# A receipt that does not verify against the pinned key, or a verified one that names another update.
RECEIPT_REFUSAL_REASONS = ("unverified", "wrong-update")
LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "fl_agent_rounds_skipped": ROUND_SKIP_REASONS,
    "fl_agent_trainer_killed": TRAINER_KILL_CAUSES,
    "fl_agent_models_refused": MODEL_REFUSAL_REASONS,
    "fl_agent_aggregator_errors": AGGREGATOR_OPERATIONS,
    "fl_agent_updates_rejected": UPDATE_REJECTION_REASONS,
    "fl_agent_delivery_failures": DELIVERY_FAILURE_REASONS,
    "fl_agent_receipts_refused": RECEIPT_REFUSAL_REASONS,
    "fl_agent_storage_errors": STORAGE_REASONS,
}


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
                known = dict.fromkeys(LABEL_VALUES.get(r.name, ()), 0)  # reported at 0 before their first count
                for label, v in sorted({**known, **value}.items()):
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
        self.last_round_timestamp = Gauge(
            "fl_agent_last_round_timestamp_seconds",
            "When the aggregator acknowledged this device's last update (the receipt's time, in the aggregator's "
            "clock; 0: never)",
            registry=r,
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
        self.receipts_refused = Counter(
            "fl_agent_receipts_refused",
            "Receipts refused (not verified by the pinned key, or naming another update), by reason; "
            "the update stays in the outbox",
            ["reason"],
            registry=r,
        )
        self.aggregator_errors = Counter(
            "fl_agent_aggregator_errors", "Failed exchanges with the aggregator", ["operation"], registry=r
        )
        self.storage_errors = Counter(
            "fl_agent_storage_errors",
            "Writes the data partition refused (full, read-only, failing), by reason; the agent went on",
            ["reason"],
            registry=r,
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
        for counter, values in (
            (self.rounds_skipped, ROUND_SKIP_REASONS),
            (self.trainer_kills, TRAINER_KILL_CAUSES),
            (self.models_refused, MODEL_REFUSAL_REASONS),
            (self.receipts_refused, RECEIPT_REFUSAL_REASONS),
            (self.aggregator_errors, AGGREGATOR_OPERATIONS),
            (self.storage_errors, STORAGE_REASONS),
        ):
            for value in values:
                counter.labels(value)  # the series exists, at 0, from the first scrape

    def count_storage_failure(self, reason: str, *, round_given_up: bool) -> None:
        """A write the data partition refused (``reason``: one of STORAGE_REASONS); when the round was given up
        for it, also a round skipped for that reason."""
        self.storage_errors.labels(reason).inc()
        if round_given_up:
            self.rounds_skipped.labels(reason).inc()

    def storage_errors_total(self) -> int:
        """Writes and reads the data partition refused since the agent started, whatever the reason."""
        return int(sum(self.registry.get_sample_value("fl_agent_storage_errors_total", {"reason": reason}) or 0
                       for reason in STORAGE_REASONS))

    def report_no_cameras(self) -> None:
        """Say there are no cameras (``fl_agent_cameras_present 0``) where no camera task exports the camera
        metrics: a synthetic data source, a device running without cameras."""
        self.modules.add(Reading("fl_agent_cameras_present", "Capture cameras currently present", "gauge", lambda: 0))

    def serve(self, listen: str, web_config: str = "") -> MetricsServer:
        """Expose /metrics on ``HOST:PORT`` in daemon threads; with ``web_config`` (a Prometheus web
        configuration file) over TLS and/or behind basic auth. An unusable address or file is a ConfigError."""
        try:
            web = load_web_config(Path(web_config)) if web_config else None
        except WebConfigError as exc:
            raise ConfigError(f"[metrics] web_config: {exc}") from None
        try:
            return start_metrics_server(listen, self.registry, web)
        except OSError as exc:
            raise ConfigError(f"[metrics] listen: cannot listen on {listen}: {exc.strerror or exc}") from None

"""Prometheus collectors ``fl_aggregator_*``, one CollectorRegistry per app so several apps can share a process."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from aggregator.fleet import STATES as FLEET_STATES
from aggregator.models import NO_DELTA_REASONS
from aggregator.store import SPOOL_LOSS_CAUSES
from appliance.reasons import DECODER_REASONS, UPDATE_REFUSAL_REASONS

# Every label value the code uses, declared so that each series exists (at 0) from the first scrape: a rate or an
# alert on a reason works before its first event. tests/test_metrics_initialised.py holds the code to these.
# Reasons an upload can be refused (docs/protocol.md section 9).
UPDATE_REJECT_REASONS = UPDATE_REFUSAL_REASONS
# Why an upload was answered 503 (not acknowledged: the device keeps it and sends it again after Retry-After):
# its write failed or the disk stopped answering (docs/aggregator.md "A disk that stops answering"), or async mode's
# buffer had no room.
UPDATE_UNAVAILABLE_REASONS = ("spool-unavailable", "buffer-full")
# Reasons any other request can be refused (docs/api.md); the problems middleware maps HTTP errors to the first four.
REQUEST_REJECT_REASONS = (
    "bad-request",
    "not-found",
    "method-not-allowed",
    "body-too-large",
    "bad-parameter",
    "unknown-version",
    "unknown-package",
    "unknown-round",  # GET /v1/status/rounds/{round}/devices of a round never opened
    # what the secure-aggregation routes that publish (GET /v1/secagg/...) refuse with
    "not-secure",
    "wrong-round",
    "round-closed",
    "not-in-roster",
    # what POST /v1/heartbeat refuses with (docs/protocol.md section 13), besides the decoder's reasons below
    "unsupported-media-type",
    "length-required",
    "body-timeout",
    "revoked",
    "expired",
    "stale-report",
    "too-frequent",
    *(r for r in DECODER_REASONS if r not in ("digest-mismatch", "bad-tensor", "tensor-too-large", "wrong-tensors",
                                              "wrong-shape", "not-finite")),
)
# How GET /v1/models/{version} was answered: the full model to a device that named no base, a delta, the full model
# to one that named a base (why no delta: aggregator/models.py NO_DELTA_REASONS), or 404 (no model sent).
MODEL_SENT_ANSWERS = ("full", "delta", *(f"full_{reason}" for reason in NO_DELTA_REASONS))
MODEL_DOWNLOAD_ANSWERS = (*MODEL_SENT_ANSWERS, "not_found")
# superseded: an async site's buffer still empty when its parent's next version came (nothing lost, not abandoned).
ROUND_OUTCOMES = ("published", "abandoned", "superseded")

_SIZE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROUND_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_RATIO_BUCKETS = (0.0001, 0.001, 0.01, 0.03, 0.1, 0.3, 0.5, 0.8, 0.9, 1.0)
_PARTICIPANT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
_STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89)


class AggregatorMetrics:
    """All collectors of one aggregator app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.updates_accepted = Counter(
            "fl_aggregator_updates_accepted_total", "Updates verified, spooled to disk and acknowledged", registry=r
        )
        self.updates_rejected = Counter(
            "fl_aggregator_updates_rejected_total", "Updates refused, by machine-readable reason", ["reason"],
            registry=r,
        )
        for reason in UPDATE_REJECT_REASONS:
            self.updates_rejected.labels(reason)
        self.updates_unavailable = Counter(
            "fl_aggregator_updates_unavailable_total",
            "Uploads answered 503 and not acknowledged (the device sends them again later), by reason: "
            "spool-unavailable (the disk failed the write or stopped answering), buffer-full",
            ["reason"], registry=r,
        )
        for reason in UPDATE_UNAVAILABLE_REASONS:
            self.updates_unavailable.labels(reason)
        self.disk_wait = Gauge(
            "fl_aggregator_disk_wait_seconds",
            "How long the oldest write under way on the aggregator's disk has waited (0: none); past --store-timeout "
            "uploads are refused (503 spool-unavailable) until the disk answers",
            registry=r,
        )
        self.updates_duplicate_resend = Counter(
            "fl_aggregator_updates_resent_total",
            "Identical resends of an acknowledged update, answered with the original receipt",
            registry=r,
        )
        self.requests_rejected = Counter(
            "fl_aggregator_requests_rejected_total", "Other refused requests (not uploads), by reason", ["reason"],
            registry=r,
        )
        for reason in REQUEST_REJECT_REASONS:
            self.requests_rejected.labels(reason)
        self.received_bytes = Counter(
            "fl_aggregator_received_bytes_total", "Bytes of update bodies received", registry=r
        )
        self.model_downloads = Counter(
            "fl_aggregator_model_downloads_total",
            "Model fetches (GET /v1/models/{version}), by answer: full (no base named), delta, full_<why no delta> "
            "(a base named), not_found",
            ["answer"], registry=r,
        )
        self.model_download_bytes = Counter(
            "fl_aggregator_model_download_bytes_total", "Bytes of model bodies sent (releases and deltas), by answer",
            ["answer"], registry=r,
        )
        for answer in MODEL_DOWNLOAD_ANSWERS:
            self.model_downloads.labels(answer)
        for answer in MODEL_SENT_ANSWERS:
            self.model_download_bytes.labels(answer)
        self.verify_seconds = Histogram(
            "fl_aggregator_verify_seconds", "Time to verify and decode one update", buckets=_SIZE_BUCKETS, registry=r
        )
        self.spool_lost_updates = Counter(
            "fl_aggregator_spool_lost_updates_total",
            "Acknowledged updates taken out of their round at a restart because their spooled records were not on "
            "disk (the disk lost data it had reported written), by cause",
            ["cause"], registry=r,
        )
        for cause in SPOOL_LOSS_CAUSES:
            self.spool_lost_updates.labels(cause)
        self.spool_cut_bytes = Counter(
            "fl_aggregator_spool_cut_bytes_total",
            "Bytes cut from the end of a resuming round's spool segment: appends that got no receipt, and what was "
            "left of lost records",
            registry=r,
        )
        self.spool_seconds = Histogram(
            "fl_aggregator_spool_seconds", "Time from spool request to fsync and commit", buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.aggregate_seconds = Histogram(
            "fl_aggregator_aggregate_seconds", "Time to aggregate a closed round and publish the new version",
            buckets=_SIZE_BUCKETS, registry=r,
        )
        self.round_duration = Histogram(
            "fl_aggregator_round_duration_seconds", "From a round's opening to its close", buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.round_participants = Histogram(
            "fl_aggregator_round_participants", "Accepted updates per closed round", buckets=_PARTICIPANT_BUCKETS,
            registry=r,
        )
        self.rounds = Counter(
            "fl_aggregator_rounds_total", "Rounds ended, by outcome (published, abandoned, superseded)", ["outcome"],
            registry=r,
        )
        self.publication_failures = Counter(
            "fl_aggregator_publication_failures_total",
            "Failed attempts at the steps after the commit recording a round's end, with a new version or without "
            "(the record stands; retried every 5 s)",
            registry=r,
        )
        self.last_round_timestamp = Gauge(
            "fl_aggregator_last_round_timestamp_seconds",
            "When the last round of each outcome ended (Unix time; 0: none yet)",
            ["outcome"],
            registry=r,
        )
        for outcome in ROUND_OUTCOMES:
            self.rounds.labels(outcome)
            self.last_round_timestamp.labels(outcome)
        self.current_round = Gauge("fl_aggregator_current_round", "Id of the open round (0: none)", registry=r)
        self.model_version = Gauge("fl_aggregator_model_version", "Newest published model version", registry=r)
        self.round_updates = Gauge(
            "fl_aggregator_round_updates", "Updates accepted so far in the open round", registry=r
        )
        self.enrolled_devices = Gauge(
            "fl_aggregator_enrolled_devices", "Devices enrolled and not revoked", registry=r
        )
        self.waiting_clients = Gauge(
            "fl_aggregator_task_waiters", "Clients long-polling for a task", registry=r
        )
        self.dp_epsilon = Gauge(
            "fl_aggregator_dp_epsilon",
            "Differential privacy spent (epsilon at the configured delta; 0 without DP): the published models, and "
            "distributed-DP sums unmasked but not published",
            registry=r,
        )
        self.uploads_active = Gauge(
            "fl_aggregator_uploads_active", "Upload bodies being read or checked (each holds an upload slot)",
            registry=r,
        )
        self.uploads_waiting = Gauge(
            "fl_aggregator_uploads_waiting", "Signed uploads waiting for an upload slot (all slots are taken)",
            registry=r,
        )
        self.update_norm_ratio = Histogram(
            "fl_aggregator_update_norm_ratio", "Accepted updates' L2 norm as a fraction of the round's norm bound",
            buckets=_RATIO_BUCKETS, registry=r,
        )
        self.update_staleness = Histogram(
            "fl_aggregator_update_staleness",
            "Async mode: versions published between an accepted update's base model and the buffer it counts in",
            buckets=_STALENESS_BUCKETS, registry=r,
        )
        self.fleet_devices = Gauge(
            "fl_aggregator_fleet_devices",
            "Enrolled keys by state: devices active (a heartbeat within the last hour) or silent, behind (a model more "
            "than 2 versions old) and throttled (by cpu.max, memory.max or an OOM retry) counting active devices; site "
            "aggregators (enroll --site) site_active (a forward within the last hour, or two round timeouts if longer) "
            "or site_silent",
            ["state"], registry=r,
        )
        for state in FLEET_STATES:
            self.fleet_devices.labels(state)
        self.fleet_reports = Counter(
            "fl_aggregator_fleet_reports_total", "Device heartbeats accepted (POST /v1/heartbeat)", registry=r
        )
        self.versions_per_hour = Gauge(
            "fl_aggregator_versions_per_hour", "Model versions published in the last hour (async mode; 0 otherwise)",
            registry=r,
        )

    def model_download(self, answer: str, body: bytes | None) -> None:
        """Count an answer to GET /v1/models/{version} (one of MODEL_DOWNLOAD_ANSWERS) and the bytes of the model
        it sent (None: not_found, nothing sent)."""
        self.model_downloads.labels(answer).inc()
        if body is not None:
            self.model_download_bytes.labels(answer).inc(len(body))

    def downlink(self, encoding: str) -> dict[str, Any]:
        """The downlink since start, from the model download counters (``downlink`` of GET /v1/status): downloads
        and body bytes of the full models sent (answers ``full`` and ``full_*``), of the deltas (the steps of
        ``encoding``, the aggregator's --downlink) and by answer."""
        downloads, sent = _by_answer(self.model_downloads), _by_answer(self.model_download_bytes)
        answers = {a: {"downloads": downloads.get(a, 0), "bytes": sent.get(a, 0)} for a in MODEL_DOWNLOAD_ANSWERS}
        full = [answers[a] for a in MODEL_SENT_ANSWERS if a != "delta"]
        return {"encoding": encoding,
                "full": {"downloads": sum(f["downloads"] for f in full), "bytes": sum(f["bytes"] for f in full)},
                "delta": answers["delta"], "answers": answers}

    def set_fleet(self, counts: dict[str, int]) -> None:
        """The fleet gauges from :meth:`aggregator.fleet.Fleet.counts` (set at each scrape)."""
        for state in FLEET_STATES:
            self.fleet_devices.labels(state).set(counts[state])

    def round_ended(self, outcome: str, at: float) -> None:
        """Count a round that ended at ``at`` (Unix time) with ``outcome`` (one of ROUND_OUTCOMES)."""
        self.rounds.labels(outcome).inc()
        self.last_round_timestamp.labels(outcome).set(at)


def _by_answer(counter: Counter) -> dict[str, int]:
    """A counter's values by its ``answer`` label (its ``_total`` samples)."""
    return {sample.labels["answer"]: int(sample.value) for family in counter.collect() for sample in family.samples
            if sample.name.endswith("_total")}

"""/metrics after a round: every fl_aggregator_* family present, promtool-clean, values matching what happened."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from aggregator_harness import run, running
from prometheus_client.parser import text_string_to_metric_families

FAMILIES = {
    "fl_aggregator_updates_accepted", "fl_aggregator_updates_rejected", "fl_aggregator_updates_resent",
    "fl_aggregator_requests_rejected", "fl_aggregator_received_bytes", "fl_aggregator_verify_seconds",
    "fl_aggregator_spool_seconds", "fl_aggregator_aggregate_seconds", "fl_aggregator_round_duration_seconds",
    "fl_aggregator_round_participants", "fl_aggregator_rounds", "fl_aggregator_current_round",
    "fl_aggregator_model_version", "fl_aggregator_round_updates", "fl_aggregator_enrolled_devices",
    "fl_aggregator_task_waiters",
}


def test_metrics_after_a_round(tmp_path: Path) -> None:
    async def go() -> str:
        async with running(tmp_path, devices=2) as h:
            task = await h.task()
            sent = 0
            for device in h.devices:
                body = device.update(task, h.delta())
                sent += len(body)
                assert (await h.upload(body))[0] == 200
            status, problem = await h.upload(b"\x00")
            assert status == 400
            assert await h.task(after=task.round_id, wait=10) is not None
            response = await h.client.get("/metrics")
            assert response.status == 200 and response.content_type == "text/plain"
            text = await response.text()
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            assert {f.name for f in text_string_to_metric_families(text)} >= FAMILIES
            assert samples[("fl_aggregator_updates_accepted_total", ())] == 2
            assert samples[("fl_aggregator_received_bytes_total", ())] == sent + 1
            assert samples[("fl_aggregator_updates_rejected_total", (("reason", problem["reason"]),))] == 1
            assert samples[("fl_aggregator_verify_seconds_count", ())] == 2
            assert samples[("fl_aggregator_aggregate_seconds_count", ())] == 1
            assert samples[("fl_aggregator_round_participants_sum", ())] == 2
            assert samples[("fl_aggregator_current_round", ())] == task.round_id + 1
            assert samples[("fl_aggregator_model_version", ())] == 1
            assert samples[("fl_aggregator_enrolled_devices", ())] == 2
            return text

    text = run(go())
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr

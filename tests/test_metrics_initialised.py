"""Every labelled counter of both sides has its series, at 0, from the first scrape, and the code uses no label
value that is not declared: a rate or an alert on a reason works before its first event (a series that appears
at 1 hides that first event from rate() and increase()).

Two kinds of check: a fresh agent's and a fresh aggregator's scrape hold each declared series at 0, and a scan
of the code finds every label value it can count (literal ``.labels(...)`` arguments, the reasons the decoder,
the package reader and the aggregator raise) among the declared ones.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from nacl.signing import SigningKey
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.app import _HTTP_REASONS, AggregatorConfig, make_app
from aggregator.metrics import (
    MODEL_DOWNLOAD_ANSWERS,
    MODEL_SENT_ANSWERS,
    REQUEST_REJECT_REASONS,
    ROUND_OUTCOMES,
    UPDATE_REJECT_REASONS,
    UPDATE_UNAVAILABLE_REASONS,
)
from aggregator.simulate import synthetic_package
from appliance import wire
from appliance.agent import Agent, ModelRefused
from appliance.budget import Budget
from appliance.config import load_config
from appliance.identity import write_aggregator_key
from appliance.metrics import LABEL_VALUES, MODEL_REFUSAL_REASONS, AgentMetrics
from appliance.reasons import DECODER_REASONS, SECAGG_REASONS

REPO = Path(__file__).resolve().parent.parent
ADVISORY = Budget(None, 1, None, None, False, True, "test: no cgroup")


# -- helpers ---------------------------------------------------------------------------------------------


def scrape(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family name -> {labels: value} of the counter samples (``_total``) and gauges of an exposition."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        series = out.setdefault(family.name, {})
        for s in family.samples:
            if family.type != "counter" or s.name.endswith("_total"):
                series[tuple(sorted(s.labels.items()))] = s.value
    return out


def promtool_check(text: str) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator:
    agents: list[Agent] = []

    def make(source: str = "synthetic") -> Agent:
        state = tmp_path / f"state-{len(agents)}"
        write_aggregator_key(state, SigningKey.generate().verify_key)
        config = tmp_path / f"agent-{len(agents)}.toml"
        config.write_text(
            '[aggregator]\nurl = "http://127.0.0.1:9"\nallow_plain_http = true\n'
            f'[agent]\nstate_dir = "{state}"\n[metrics]\nlisten = ""\n[data]\nsource = "{source}"\n'
        )
        agents.append(Agent(load_config(config), budget=ADVISORY))
        return agents[-1]

    yield make
    for agent in agents:
        agent.sandbox.close()


def _literal_values(node: ast.expr) -> list[str] | None:
    """The strings an argument can be when it is written out (a literal, or ``a if c else b`` of literals)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        body, orelse = _literal_values(node.body), _literal_values(node.orelse)
        return body + orelse if body is not None and orelse is not None else None
    return None


def _calls(paths: list[Path], names: set[str]) -> Iterator[tuple[Path, ast.Call, ast.FunctionDef | None]]:
    """Calls of a function or method named in ``names``, with the function they are written in."""
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in names:
                inside = [f for f in functions if f.lineno <= node.lineno <= (f.end_lineno or f.lineno)]
                yield path, node, max(inside, key=lambda f: f.lineno) if inside else None


def _raised_reasons(paths: list[Path], names: set[str], position: int = 0) -> dict[str, list[str]]:
    """Literal reasons passed to the exception classes in ``names`` -> where."""
    found: dict[str, list[str]] = {}
    for path, call, _ in _calls(paths, names):
        if len(call.args) > position:
            for value in _literal_values(call.args[position]) or []:
                found.setdefault(value, []).append(f"{path.relative_to(REPO)}:{call.lineno}")
    return found


# -- the agent -------------------------------------------------------------------------------------------


def test_a_fresh_agent_has_every_labelled_series_at_zero(make_agent):
    text = generate_latest(make_agent().metrics.registry).decode()
    families = scrape(text)
    for name, values in LABEL_VALUES.items():
        series = families[name]
        labels = {k for key in series for k, _ in key}
        assert len(labels) == 1, f"{name}: one label expected, found {labels}"
        label = labels.pop()
        missing = [v for v in values if series.get(((label, v),)) != 0.0]
        assert not missing, f"{name}: no series at 0 for {missing}"
    empty = [name for name, series in families.items() if not series]
    assert not empty, f"families without a sample on a fresh agent (declare their label values): {empty}"
    assert families["fl_agent_cameras_present"] == {(): 0.0}, "a synthetic source has no cameras: say 0"
    assert families["fl_agent_last_round_timestamp_seconds"] == {(): 0.0}
    promtool_check(text)


def test_with_cameras_the_camera_task_alone_exports_cameras_present(make_agent):
    """The camera task registers the camera metrics; the agent must not add a second fl_agent_cameras_present."""
    text = generate_latest(make_agent("cameras").metrics.registry).decode()
    assert "fl_agent_cameras_present" not in text


def test_every_label_value_the_agent_counts_is_declared():
    metrics = AgentMetrics()
    names = {attr: c.describe()[0].name for attr, c in vars(metrics).items() if hasattr(c, "labels")}
    # Label values that come from a variable: where each vocabulary is checked.
    dynamic = {"fl_agent_models_refused": "test_every_model_refusal_reason_is_declared"}
    problems = []
    sources = [p for p in sorted((REPO / "appliance").rglob("*.py")) if p.name != "metrics.py"]
    for path, call, _ in _calls(sources, {"labels"}):
        where = f"{path.relative_to(REPO)}:{call.lineno}"
        target = call.func.value if isinstance(call.func, ast.Attribute) else None
        if not isinstance(target, ast.Attribute) or target.attr not in names:
            problems.append(f"{where}: .labels() on something other than an AgentMetrics counter")
            continue
        name = names[target.attr]
        for arg in call.args:
            values = _literal_values(arg)
            if values is None:
                if name not in dynamic:
                    problems.append(f"{where}: {name} counts a computed label value: declare its vocabulary")
            else:
                problems += [f"{where}: {name}{{{v}}} is not declared" for v in values if v not in LABEL_VALUES[name]]
    assert not problems, "\n".join(problems)


def test_every_model_refusal_reason_is_declared():
    """models_refused counts the reason of a ProtocolError or PackageError raised while fetching and checking a
    package or release: whatever the agent's modules raise."""
    # appliance/protocol/ holds secure aggregation's messages, whose reasons are SECAGG_REASONS, and the model
    # downlink (downlink.py), whose reasons are a model's.
    downlink = REPO / "appliance" / "protocol" / "downlink.py"
    agent_side = [p for p in sorted((REPO / "appliance").rglob("*.py")) if "protocol" not in p.parts or p == downlink]
    raised = _raised_reasons(agent_side, {"ProtocolError", "PackageError"})
    undeclared = {r: where for r, where in raised.items() if r not in MODEL_REFUSAL_REASONS}
    assert not undeclared, f"reasons raised but not in MODEL_REFUSAL_REASONS: {undeclared}"
    protocol = [p for p in sorted((REPO / "appliance" / "protocol").rglob("*.py")) if p != downlink]
    secagg = _raised_reasons(protocol, {"ProtocolError"})
    assert set(secagg) <= set(DECODER_REASONS + SECAGG_REASONS), set(secagg) - set(DECODER_REASONS + SECAGG_REASONS)
    decoder = _raised_reasons([REPO / "appliance" / "wire.py", REPO / "appliance" / "cbor_reader.py"],
                              {"ProtocolError"})
    assert set(decoder) <= set(DECODER_REASONS), set(decoder) - set(DECODER_REASONS)


def test_every_reason_the_outbox_gives_a_rejection_is_declared():
    outbox = [REPO / "appliance" / "outbox.py"]
    reasons = _raised_reasons(outbox, {"_rejected", "_set_aside"}, position=1)
    for path, call, _ in _calls(outbox, {"in_thread"}):  # in_thread(self._rejected, entry, reason, detail)
        if len(call.args) > 2 and isinstance(call.args[0], ast.Attribute) and call.args[0].attr == "_rejected":
            for value in _literal_values(call.args[2]) or []:
                reasons.setdefault(value, []).append(f"{path.relative_to(REPO)}:{call.lineno}")
    assert reasons and set(reasons) <= set(LABEL_VALUES["fl_agent_updates_rejected"]), reasons


async def test_a_package_that_does_not_verify_is_counted_and_the_agent_goes_on(make_agent):
    """A package the aggregator serves that fails to load was a PackageError nobody caught: it ended the round
    loop and with it the agent. It is a refused model like a bad release: counted by reason, retried later."""
    agent = make_agent()

    class ServesGarbage:
        async def package_bytes(self, digest: bytes) -> bytes:
            return b"not a model package"

    task = wire.Task(round_id=1, model_version=0, model_digest=bytes(32), package_digest=bytes(32),
                     deadline=int(agent.clock.now()) + 600)
    with pytest.raises(ModelRefused):  # what the round loop retries after a backoff of the task's own
        await agent._round(ServesGarbage(), task)
    refused = {s.labels["reason"]: s.value for s in agent.metrics.models_refused.collect()[0].samples
               if s.name.endswith("_total") and s.value}
    assert sum(refused.values()) == 1 and set(refused) <= set(MODEL_REFUSAL_REASONS), refused
    assert not (agent.state_dir / "models").exists() or not any((agent.state_dir / "models").iterdir())


# -- the aggregator --------------------------------------------------------------------------------------


async def _aggregator_metrics(tmp_path: Path, requests: list[tuple[str, str]] = ()) -> str:
    app = make_app(AggregatorConfig(state_dir=tmp_path, package=synthetic_package(10), key=SigningKey.generate()))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        for method, path in requests:
            await client.request(method, path)
        response = await client.get("/metrics")
        return await response.text()


async def test_a_fresh_aggregator_has_every_labelled_series_at_zero(tmp_path):
    text = await _aggregator_metrics(tmp_path)
    families = scrape(text)
    for name, label, values in [
        ("fl_aggregator_updates_rejected", "reason", UPDATE_REJECT_REASONS),
        ("fl_aggregator_updates_unavailable", "reason", UPDATE_UNAVAILABLE_REASONS),
        ("fl_aggregator_requests_rejected", "reason", REQUEST_REJECT_REASONS),
        ("fl_aggregator_rounds", "outcome", ROUND_OUTCOMES),
        ("fl_aggregator_last_round_timestamp_seconds", "outcome", ROUND_OUTCOMES),
        ("fl_aggregator_model_downloads", "answer", MODEL_DOWNLOAD_ANSWERS),
        ("fl_aggregator_model_download_bytes", "answer", MODEL_SENT_ANSWERS),
    ]:
        missing = [v for v in values if families[name].get(((label, v),)) != 0.0]
        assert not missing, f"{name}: no series at 0 for {missing}"
    promtool_check(text)


def test_every_reason_the_aggregator_refuses_with_is_declared():
    sources = sorted((REPO / "aggregator").rglob("*.py"))
    raised = _raised_reasons(sources, {"ProtocolError"})
    decoder = _raised_reasons([REPO / "appliance" / "wire.py", REPO / "appliance" / "cbor_reader.py"],
                              {"ProtocolError"})
    problems = [f"{r} ({where[0]}): not in UPDATE_REJECT_REASONS" for r, where in {**decoder, **raised}.items()
                if r not in UPDATE_REJECT_REASONS]
    for _, call, function in _calls([REPO / "aggregator" / "app.py"], {"Problem"}):
        status = call.args[0].value if isinstance(call.args[0], ast.Constant) else None
        upload = function is not None and function.name == "post_update"
        declared = UPDATE_REJECT_REASONS if upload else REQUEST_REJECT_REASONS
        for reason in _literal_values(call.args[1]) or []:
            if upload and status == 503 and reason not in UPDATE_UNAVAILABLE_REASONS:
                problems.append(f"app.py:{call.lineno}: {reason} not in UPDATE_UNAVAILABLE_REASONS")
            if (status is None or status < 500) and reason not in declared:
                problems.append(f"app.py:{call.lineno}: {reason} not in {'UPDATE' if upload else 'REQUEST'}"
                                "_REJECT_REASONS")
    problems += [f"_HTTP_REASONS: {r}" for r in _HTTP_REASONS.values() if r not in REQUEST_REJECT_REASONS]
    assert not problems, "\n".join(problems)


async def test_a_request_to_the_upload_path_that_is_no_upload_counts_as_a_request(tmp_path):
    """DELETE /v1/updates is no upload: it was counted among refused uploads, under a reason no upload has."""
    families = scrape(await _aggregator_metrics(tmp_path, [("DELETE", "/v1/updates")]))
    assert families["fl_aggregator_requests_rejected"][(("reason", "method-not-allowed"),)] == 1
    assert set(families["fl_aggregator_updates_rejected"]) == {(("reason", r),) for r in UPDATE_REJECT_REASONS}

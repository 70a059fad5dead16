"""Aggregator tree on loopback: a city aggregator and two site aggregators (site mode, aggregator/upstream.py),
two simulated devices per site. The city's model must equal FedAvg over all the devices' updates; a site whose
devices miss its quorum forwards nothing and the city goes on without it."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from aggregator import cli
from aggregator.app import SERVICES
from aggregator.registry import Enrolment
from aggregator.rounds import DEFAULT_MAX_SAMPLES, RoundPolicy, TrainingPlan
from aggregator.simulate import SimulatedDevice
from aggregator.upstream import TASKS_DIR, UpstreamConfig
from appliance import modelpkg, wire
from flctl.ports import free_port
from tests.aggregator_harness import Harness, run, running, site_task, tiny_package, wait_until


@contextlib.asynccontextmanager
async def tree(
    tmp: Path, city_timeout: float = 60.0, site_timeout: float = 60.0, city_plan: TrainingPlan | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> AsyncIterator[tuple[Harness, list[Harness]]]:
    """A city with two sites enrolled as sites (``enroll --site``); each site has two enrolled devices and follows
    the city. City and sites hold devices to ``max_samples``."""
    city_key = SigningKey.generate()
    site_keys = [SigningKey.generate(), SigningKey.generate()]
    async with running(
        tmp / "city", key=city_key, enrolled=[],
        policy=RoundPolicy(min_clients=1, goal_clients=2, round_timeout=city_timeout, max_samples=max_samples),
        plan=city_plan or TrainingPlan(),
    ) as city:
        city.app[SERVICES].registry.enroll(Enrolment(wire.key_id(k.verify_key), bytes(k.verify_key), site=True)
                                           for k in site_keys)
        upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
        async with contextlib.AsyncExitStack() as stack:
            sites = [
                await stack.enter_async_context(running(
                    tmp / f"site{i}", devices=2, key=key, upstream=upstream,
                    policy=RoundPolicy(min_clients=2, goal_clients=2, round_timeout=site_timeout,
                                       max_samples=max_samples),
                ))
                for i, key in enumerate(site_keys)
            ]
            yield city, sites


def flat_fedavg(base: np.ndarray, updates: list[tuple[np.ndarray, int]]) -> np.ndarray:
    total = sum(n for _, n in updates)
    return base + sum(d.astype(np.float64) * n for d, n in updates) / total


ROOT = Path(__file__).resolve().parent.parent


def test_tree_two_rounds_equal_flat_fedavg(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with tree(tmp_path) as (city, sites):
            layout = city.engine.models.layout
            expected = city.engine.params.astype(np.float64)
            after = [0, 0]
            rng = np.random.default_rng(11)
            for version in (1, 2):
                flat: list[tuple[np.ndarray, int]] = []
                for s, site in enumerate(sites):
                    task = await site_task(site, after[s])
                    after[s] = task.round_id
                    assert task.model_version == version - 1
                    assert task.model_digest == city.engine.store.model_digest(version - 1)
                    for d, device in enumerate(site.devices):
                        delta = {spec.name: rng.normal(0, 0.05, spec.shape).astype(np.float32) for spec in site.specs}
                        samples = [17, 40, 5, 96][2 * s + d] * version
                        status, _ = await site.upload(device.update(task, delta, num_samples=samples,
                                                                    metrics={"loss": float(s + d)}))
                        assert status == 200
                        flat.append((layout.flatten(delta), samples))
                await wait_until(lambda v=version: city.engine.version == v, what=f"city version {version}")
                expected = flat_fedavg(expected, flat)
                np.testing.assert_allclose(city.engine.params, expected, rtol=1e-5, atol=1e-7)
                closed = city.engine.store.get_round(version)
                assert closed.status == "published" and closed.participants == 2
                assert closed.samples == sum(n for _, n in flat)  # the sites forwarded their devices' samples
                assert sorted(city.engine.store.round_devices(version)) == sorted(
                    wire.key_id(site.key.verify_key) for site in sites
                )
            # Each site re-publishes the city's version, signed by itself, with the same parameters and digest.
            for site in sites:
                await site_task(site, after[sites.index(site)])
                response = await site.client.get("/v1/models/2")
                release = wire.decode_model_release(await response.read(), site.key.verify_key, site.specs)
                assert release.digest == city.engine.store.model_digest(2)
                np.testing.assert_array_equal(layout.flatten(release.tensors), city.engine.params)
                row = site.engine.store.recent_rounds(5)[1]
                assert row.status == "published" and "forwarded to upstream round 2" in row.note

    run(scenario())


def test_max_samples_holds_each_device_at_its_site_and_not_the_sites_sums_at_the_city(tmp_path: Path) -> None:
    """``--max-samples 100`` on the city and the sites: a site refuses its device's claim of 101 samples, and the
    city takes each site's forward of 150 and 170 samples (the sums of its devices', from keys enrolled with
    ``enroll --site``), so its model is still FedAvg over the four devices."""

    async def scenario() -> None:
        async with tree(tmp_path, max_samples=100) as (city, sites):
            layout = city.engine.models.layout
            base = city.engine.params.astype(np.float64)
            rng = np.random.default_rng(5)
            flat: list[tuple[np.ndarray, int]] = []
            for site, samples in zip(sites, [(60, 90), (80, 90)], strict=True):
                task = await site_task(site, 0)
                delta = {spec.name: rng.normal(0, 0.05, spec.shape).astype(np.float32) for spec in site.specs}
                status, problem = await site.upload(site.devices[0].update(task, delta, num_samples=101))
                assert (status, problem["reason"]) == (422, "too-many-samples")
                for device, n in zip(site.devices, samples, strict=True):
                    delta = {spec.name: rng.normal(0, 0.05, spec.shape).astype(np.float32) for spec in site.specs}
                    status, answer = await site.upload(device.update(task, delta, num_samples=n))
                    assert status == 200, answer
                    flat.append((layout.flatten(delta), n))
            await wait_until(lambda: city.engine.version == 1, what="city version 1")
            np.testing.assert_allclose(city.engine.params, flat_fedavg(base, flat), rtol=1e-5, atol=1e-7)
            closed = city.engine.store.get_round(1)
            assert closed.status == "published" and (closed.participants, closed.samples) == (2, 320)
            assert city.rejected("too-many-samples") == 0

    run(scenario())


def test_sites_forward_in_the_encoding_the_city_asks_for(tmp_path: Path) -> None:
    """The city refuses updates in another encoding than its task's (wrong-encoding), sites included: a site
    forwards its partial mean int8-quantised when the city asks for int8, whatever its own devices use."""

    async def scenario() -> None:
        async with tree(tmp_path, city_plan=TrainingPlan(encoding="int8")) as (city, sites):
            layout = city.engine.models.layout
            base = city.engine.params.astype(np.float64)
            rng = np.random.default_rng(3)
            flat: list[tuple[np.ndarray, int]] = []
            for site in sites:
                task = await site_task(site, 0)
                assert task.encoding == "float32"  # the site's own plan, for its own devices
                for device in site.devices:
                    delta = {spec.name: rng.normal(0, 0.05, spec.shape).astype(np.float32) for spec in site.specs}
                    assert (await site.upload(device.update(task, delta, num_samples=20)))[0] == 200
                    flat.append((layout.flatten(delta), 20))
            await wait_until(lambda: city.engine.version == 1, what="city version 1")
            assert city.engine.store.get_round(1).participants == 2
            # int8 of a site mean with |x| <= ~0.2: each value within half a step (0.2 / 127 / 2) of float32
            np.testing.assert_allclose(city.engine.params, flat_fedavg(base, flat), atol=1e-3)

    run(scenario())


def test_site_without_quorum_is_a_dropout(tmp_path: Path) -> None:
    async def scenario() -> None:
        # the city's deadline must pass for the dropout, and the sites' rounds end shortly before it: long
        # enough for both sites to open their rounds and take the uploads on a loaded machine
        async with tree(tmp_path, city_timeout=12.0) as (city, sites):
            layout = city.engine.models.layout
            base = city.engine.params.astype(np.float64)
            rng = np.random.default_rng(5)
            flat: list[tuple[np.ndarray, int]] = []
            for s, site in enumerate(sites):
                task = await site_task(site, 0)
                for device in site.devices[: 2 if s == 0 else 1]:  # site 1: one update, below its quorum of 2
                    delta = {spec.name: rng.normal(0, 0.05, spec.shape).astype(np.float32) for spec in site.specs}
                    status, _ = await site.upload(device.update(task, delta, num_samples=30))
                    assert status == 200
                    if s == 0:
                        flat.append((layout.flatten(delta), 30))
            await wait_until(lambda: city.engine.version == 1, timeout=60, what="the city's deadline")
            np.testing.assert_allclose(city.engine.params, flat_fedavg(base, flat), rtol=1e-5, atol=1e-7)
            assert city.engine.store.round_devices(1) == [wire.key_id(sites[0].key.verify_key)]
            dropped = sites[1].engine.store.get_round(1)
            assert dropped.status == "abandoned" and "below the quorum" in dropped.note
            # The site that dropped out follows the city's next round on the new version.
            task = await site_task(sites[1], 1)
            assert task.model_version == 1 and task.model_digest == city.engine.store.model_digest(1)
            np.testing.assert_array_equal(sites[1].engine.params, city.engine.params)

    run(scenario())


def test_site_restart_keeps_its_round_and_forwards_once(tmp_path: Path) -> None:
    """A site killed between its devices' updates resumes the same round, still answering the same city round."""

    async def scenario() -> None:
        city_key, site_key = SigningKey.generate(), SigningKey.generate()
        devices = [SimulatedDevice(), SimulatedDevice()]
        policy = RoundPolicy(min_clients=2, goal_clients=2, round_timeout=60)
        async with running(tmp_path / "city", key=city_key, enrolled=[SimulatedDevice(key=site_key)],
                           policy=RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)) as city:
            layout = city.engine.models.layout
            base = city.engine.params.astype(np.float64)
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            deltas = [{s.name: np.full(s.shape, 0.1 * (i + 1), np.float32) for s in city.specs} for i in range(2)]
            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=policy) as site:
                task = await site_task(site, 0)
                status, _ = await site.upload(devices[0].update(task, deltas[0], num_samples=10))
                assert status == 200
            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=policy) as site:
                assert (await site_task(site, 0)).round_id == task.round_id  # the same round, not a new one
                status, _ = await site.upload(devices[1].update(task, deltas[1], num_samples=30))
                assert status == 200
                await wait_until(lambda: city.engine.version == 1, what="the city's version 1")
                expected = flat_fedavg(base, [(layout.flatten(deltas[0]), 10), (layout.flatten(deltas[1]), 30)])
                np.testing.assert_allclose(city.engine.params, expected, rtol=1e-5, atol=1e-7)
                assert city.engine.store.get_round(1).samples == 40
                assert site.engine.store.get_round(1).status == "published"

    run(scenario())


def test_a_site_restarted_after_forwarding_does_not_answer_the_same_city_round_again(tmp_path: Path) -> None:
    """The city round a site forwarded to is still open (the city waits for another site). A restarted site must
    wait for the city's next round: a second site round for the same city round would be refused upstream as a
    duplicate, and its devices' acknowledged updates lost."""

    async def scenario() -> None:
        city_key, site_key = SigningKey.generate(), SigningKey.generate()
        devices = [SimulatedDevice()]
        policy = RoundPolicy(min_clients=1, goal_clients=1, round_timeout=60)
        other_site = SimulatedDevice()
        async with running(tmp_path / "city", key=city_key, enrolled=[SimulatedDevice(key=site_key), other_site],
                           policy=RoundPolicy(min_clients=1, goal_clients=2, round_timeout=120)) as city:
            upstream = UpstreamConfig(url=str(city.client.make_url("")), key=city_key.verify_key, poll_seconds=2)
            delta = {s.name: np.full(s.shape, 0.1, np.float32) for s in city.specs}
            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=policy) as site:
                task = await site_task(site, 0)
                assert (await site.upload(devices[0].update(task, delta, num_samples=10)))[0] == 200
                await wait_until(lambda: city.engine.store.round_devices(1) == [wire.key_id(site_key.verify_key)],
                                 what="the site's forward")
            (tmp_path / "site" / TASKS_DIR / "round-x.task").write_text("left by hand")  # ignored, not fatal
            async with running(tmp_path / "site", key=site_key, enrolled=devices, upstream=upstream,
                               policy=policy) as site:
                assert await site.task(after=task.round_id, wait=4) is None  # no new round for city round 1
                assert site.engine.store.open_round() is None
                assert city.engine.store.get_round(1).status == "open"
                # the other site's update closes city round 1; the restarted site follows the city's round 2
                city_task = await city.task(after=0, wait=10)
                assert city_task is not None and city_task.round_id == 1
                assert (await city.upload(other_site.update(city_task, delta, num_samples=10)))[0] == 200
                following = await site_task(site, task.round_id)
                assert following.model_version == 1 and following.model_digest == city.engine.store.model_digest(1)

    run(scenario())


@pytest.mark.parametrize("rule", ["median", "krum", "trimmed-mean", "fedadam"])
def test_upstream_refuses_rules_that_do_not_compose(tmp_path: Path, rule: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    key = bytes(SigningKey.generate().verify_key).hex()
    code = cli.main(["serve", "--state", str(tmp_path / "site"), "--synthetic-parameters", "10",
                     "--upstream", "http://127.0.0.1:9", "--upstream-key", key, "--strategy", rule])
    assert code == 2
    err = capsys.readouterr().err
    assert "--upstream needs --strategy fedavg" in err and rule in err
    assert not (tmp_path / "site").exists()  # refused before anything was created


def test_upstream_refuses_a_server_learning_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A site's FedAvg with --server-lr would scale its devices' mean before the city averages it with other sites'
    (the root applies it, once)."""
    key = bytes(SigningKey.generate().verify_key).hex()
    code = cli.main(["serve", "--state", str(tmp_path / "site"), "--synthetic-parameters", "10",
                     "--upstream", "http://127.0.0.1:9", "--upstream-key", key, "--server-lr", "0.5"])
    assert code == 2
    assert "--server-lr does not apply with --upstream" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize(("url", "problem"), [
    ("ftp://127.0.0.1:9", "scheme 'ftp'"),
    ("127.0.0.1:9", "no scheme"),
    ("http://", "no host"),
    ("city", "no scheme"),
    ("http://:8080", "no host"),  # a port and no host: the site started and failed every poll
    ("https://user@", "no host"),
    ("http://127.0.0.1:99999", "Port out of range"),
    ("http://127.0.0.1:abc", "Port could not be cast"),
    ("http://127.0.0.1:0", "port 0"),
    ("http://[::1", "Invalid IPv6 URL"),  # a traceback, not a refusal
    ("http://127.0.0.1:9/?site=a", "a query or fragment"),  # every request went to the parent's / with ?site=a/v1/...
])
def test_an_upstream_that_is_not_an_http_url_is_refused_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str, problem: str
) -> None:
    """Refused in one line naming the option and what is wrong, before anything is created: not a site that starts
    and fails every poll."""
    key = bytes(SigningKey.generate().verify_key).hex()
    code = cli.main(["serve", "--state", str(tmp_path / "site"), "--synthetic-parameters", "10",
                     "--upstream", url, "--upstream-key", key])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--upstream must be an http:// or https:// URL, got {url!r} ({problem}" in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("url", ["http://[::1]:8080", "http://[fe80::1%25eth0]:8080", "https://city.example/fl/",
                                 "HTTP://CITY:8080", "http://city"])
def test_an_upstream_url_of_any_http_form_is_taken(url: str) -> None:
    """An IPv6 literal, a path prefix (a parent behind a reverse proxy), a scheme in capitals, the default port."""
    assert UpstreamConfig(url=url, key=SigningKey.generate().verify_key).url == url


def test_upstream_key_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["serve", "--state", str(tmp_path / "site"), "--synthetic-parameters", "10",
                     "--upstream", "http://127.0.0.1:9", "--upstream-key", str(tmp_path / "missing.pub")])
    assert code == 2
    assert "--upstream-key" in capsys.readouterr().err
    code = cli.main(["serve", "--state", str(tmp_path / "site"), "--synthetic-parameters", "10",
                     "--upstream", "http://127.0.0.1:9"])
    assert code == 2
    assert "--upstream needs --upstream-key" in capsys.readouterr().err


def test_an_https_upstream_needs_a_pinned_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = "11" * 32
    base = ["serve", "--state", str(tmp_path / "site"), "--synthetic-parameters", "10", "--upstream-key", key]
    assert cli.main([*base, "--upstream", "https://127.0.0.1:9"]) == 2
    assert "--upstream https://... needs --upstream-ca" in capsys.readouterr().err
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    assert cli.main([*base, "--upstream", "https://127.0.0.1:9", "--upstream-ca", str(tmp_path / "junk.pem")]) == 2
    assert "no PEM certificate in it" in capsys.readouterr().err
    assert cli.main([*base, "--upstream", "http://127.0.0.1:9", "--upstream-ca", str(tmp_path / "junk.pem")]) == 2
    assert "--upstream-ca goes with an https:// --upstream URL" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()  # refused before anything was created


def _serve(state: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
         *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


_CITY_TLS: ssl.SSLContext | None = None  # the real-process test's city serves https with a test certificate


def _get(url: str, timeout: float = 40) -> bytes:
    context = _CITY_TLS if url.startswith("https:") else None
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        return response.read()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        try:
            _get(url + "/healthz", timeout=2)
            return
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.mark.slow
def test_tree_of_real_processes_with_a_real_package(tmp_path: Path) -> None:
    """As a user runs it: keygen, a package signed by each aggregator, enrolment by CLI, --upstream-key FILE,
    the city on https (--tls-cert) and the site pinning its certificate (--upstream-ca)."""
    global _CITY_TLS
    pytest.importorskip("cryptography", reason="cryptography makes the city's test certificate")
    from tls_certs import self_signed

    city_state, site_state = tmp_path / "city", tmp_path / "site"
    keys = {}
    for state in (city_state, site_state):
        assert cli.main(["keygen", "--state", str(state)]) == 0
        keys[state] = SigningKey(bytes.fromhex((state / "aggregator.key").read_text().strip()))
    rng = np.random.default_rng(0)
    pkg = tiny_package()
    for state in (city_state, site_state):  # the same package, signed by each aggregator: the same digest
        modelpkg.write_package(state / "tiny.flpkg", pkg, keys[state])
    devices = [SimulatedDevice(), SimulatedDevice()]
    assert cli.main(["enroll", "--state", str(city_state), "--site",
                     (site_state / "aggregator.pub").read_text().strip()]) == 0
    assert cli.main(["enroll", "--state", str(site_state), *(d.public_key_hex for d in devices)]) == 0
    city_port, site_port = free_port(), free_port()
    city_url, site_url = f"https://127.0.0.1:{city_port}", f"http://127.0.0.1:{site_port}"
    cert, tls_key = self_signed(tmp_path)
    _CITY_TLS = ssl.create_default_context(cafile=str(cert))
    city = _serve(city_state, city_port, "--model", str(city_state / "tiny.flpkg"), "--min-clients", "1",
                  "--goal-clients", "1", "--tls-cert", str(cert), "--tls-key", str(tls_key))
    site = None
    try:
        # the site starts once the city answers: a site that finds no city backs off (up to 30 s), which could
        # outlast the task long-poll below
        _wait_healthy(city_url, city)
        site = _serve(site_state, site_port, "--model", str(site_state / "tiny.flpkg"), "--min-clients", "2",
                      "--upstream", city_url, "--upstream-key", str(city_state / "aggregator.pub"),
                      "--upstream-ca", str(cert))
        _wait_healthy(site_url, site)
        site_pub = keys[site_state].verify_key
        task = wire.decode_task(_get(site_url + "/v1/task?wait=30"), site_pub)
        city_v0 = wire.decode_model_release(_get(city_url + "/v1/models/0"), keys[city_state].verify_key)
        assert task.model_digest == city_v0.digest and task.package_digest == city_v0.package_digest
        flat = []
        for device, samples in zip(devices, (12, 36), strict=True):
            delta = {s.name: rng.normal(0, 0.1, s.shape).astype(np.float32) for s in pkg.param_specs}
            request = urllib.request.Request(site_url + "/v1/updates", data=device.update(task, delta, samples),
                                             headers={"Content-Type": wire.CONTENT_TYPE})
            wire.decode_receipt(_get_request(request), site_pub)
            flat.append((delta, samples))
        deadline = time.monotonic() + 120
        while json.loads(_get(city_url + "/v1/status"))["model"]["version"] != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        city_v1 = wire.decode_model_release(_get(city_url + "/v1/models/1"), keys[city_state].verify_key)
        for name in ("fc.weight", "fc.bias"):
            expected = city_v0.tensors[name] + sum(d[name] * n for d, n in flat) / sum(n for _, n in flat)
            np.testing.assert_allclose(city_v1.tensors[name], expected, rtol=1e-5, atol=1e-6)
        next_task = wire.decode_task(_get(site_url + f"/v1/task?after={task.round_id}&wait=30"), site_pub)
        assert next_task.model_version == 1 and next_task.model_digest == city_v1.digest
        site_v1 = wire.decode_model_release(_get(site_url + "/v1/models/1"), site_pub)
        np.testing.assert_array_equal(site_v1.tensors["fc.weight"], city_v1.tensors["fc.weight"])
    finally:
        for proc in (site, city):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)


def _get_request(request: urllib.request.Request) -> bytes:
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read()

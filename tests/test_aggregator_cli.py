"""fl-aggregator keygen / enroll / revoke / status / serve as a user runs them."""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey, VerifyKey
from tls_certs import self_signed

from aggregator.app import SERVICES
from aggregator.cli import build_parser, main, served_alone
from aggregator.registry import Enrolment, read_enrolment_file
from aggregator.rounds import RoundPolicy
from aggregator.simulate import SimulatedDevice
from aggregator.store import Store
from appliance import modelpkg, wire
from flctl.ports import free_port
from tests.aggregator_harness import run, running, tiny_package

ROOT = Path(__file__).resolve().parent.parent


def _package(key: SigningKey, path: Path) -> modelpkg.ModelPackage:
    modelpkg.write_package(path, tiny_package(), key)
    return modelpkg.load_package(path, key.verify_key)


def test_keygen_creates_a_private_key_once_and_publishes_the_public_key(tmp_path: Path, capsys) -> None:
    assert main(["keygen", "--state", str(tmp_path)]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["keygen", "--state", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == first
    assert (tmp_path / "aggregator.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "aggregator.pub").read_text().strip() == first
    assert bytes(SigningKey(bytes.fromhex((tmp_path / "aggregator.key").read_text().strip())).verify_key).hex() == first


def test_enroll_revoke_and_status(tmp_path: Path, capsys) -> None:
    main(["keygen", "--state", str(tmp_path)])
    a, b, c = SimulatedDevice(), SimulatedDevice(), SimulatedDevice()
    assert main(["enroll", "--state", str(tmp_path), a.public_key_hex, "--name", "door"]) == 0
    fleet = tmp_path / "fleet.jsonl"
    fleet.write_text(
        json.dumps({"device_id": b.device_id, "public_key": b.public_key_hex, "name": "gate"}) + "\n\n"
        + json.dumps({"device_id": c.device_id, "public_key": c.public_key_hex, "name": "yard"}) + "\n"
    )
    capsys.readouterr()
    assert main(["enroll", "--state", str(tmp_path), "--from", str(fleet), a.public_key_hex]) == 0
    out = capsys.readouterr().out
    assert f"{a.device_id} already enrolled" in out and f"{b.device_id} enrolled gate" in out
    assert main(["revoke", "--state", str(tmp_path), b.device_id]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["status", "--state", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["devices"]["enrolled"] == 2 and status["devices"]["revoked"] == 1
    # a revoked key stays revoked
    assert main(["enroll", "--state", str(tmp_path), b.public_key_hex]) == 2
    assert "revoked" in capsys.readouterr().err


def test_status_shows_which_keys_are_enrolled_as_sites(tmp_path: Path, capsys) -> None:
    main(["keygen", "--state", str(tmp_path)])
    device, site = SimulatedDevice(), SimulatedDevice()
    assert main(["enroll", "--state", str(tmp_path), device.public_key_hex, "--name", "door"]) == 0
    assert main(["enroll", "--state", str(tmp_path), "--site", site.public_key_hex, "--name", "site-a"]) == 0
    capsys.readouterr()
    assert main(["status", "--state", str(tmp_path), "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)["devices"]
    assert devices["enrolled"] == 2 and devices["sites"] == 1
    assert {d["device_id"]: d["site"] for d in devices["list"]} == {device.device_id: False, site.device_id: True}
    assert main(["status", "--state", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "devices: 2 enrolled (1 site), 0 revoked" in out
    assert f"site {site.device_id}  site-a" in out and device.device_id not in out


def test_status_of_a_state_gives_each_sites_last_forward(tmp_path: Path, capsys) -> None:
    """``status --state`` lists each site with the time and round of its newest accepted forward, or says it never
    forwarded; ``--json`` gives them as ``last_forward`` (Unix time) and ``last_forward_round``."""
    forwarding, silent = SimulatedDevice(), SimulatedDevice()

    async def forward() -> None:
        async with running(tmp_path, devices=1, policy=RoundPolicy(min_clients=1, goal_clients=3,
                                                                   round_timeout=60)) as h:
            h.app[SERVICES].registry.enroll([
                Enrolment(forwarding.device_id, bytes(forwarding.key.verify_key), "north", site=True),
                Enrolment(silent.device_id, bytes(silent.key.verify_key), "south", site=True)])
            task = await h.task()
            assert task is not None
            assert (await h.upload(forwarding.update(task, h.delta(), num_samples=10)))[0] == 200

    run(forward())
    store = Store(tmp_path)
    try:
        (accepted,) = store.round_updates(1)
    finally:
        store.close()
    capsys.readouterr()
    assert main(["status", "--state", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(accepted.accepted_at))
    assert f"  site {forwarding.device_id}  north  last forward {when}, into round 1\n" in out
    assert f"  site {silent.device_id}  south  never forwarded\n" in out
    assert main(["status", "--state", str(tmp_path), "--json"]) == 0
    listed = {d["device_id"]: d for d in json.loads(capsys.readouterr().out)["devices"]["list"]}
    assert (listed[forwarding.device_id]["last_forward"], listed[forwarding.device_id]["last_forward_round"]) == (
        accepted.accepted_at, 1)
    assert listed[silent.device_id]["last_forward"] is None and listed[silent.device_id]["last_forward_round"] is None


@pytest.mark.parametrize(("accepted_at", "receipt", "said"), [
    (1e20, b"\xa0", "last forward at an unreadable time (1e+20), into round 3"),
    (1_800_000_000.0, "a receipt stored as text", "last forward 2027-01-15 08:00:00 UTC, into round 3"),
])
def test_status_of_a_state_says_a_damaged_forward_record_in_the_sites_line(
    tmp_path: Path, capsys, accepted_at: float, receipt: bytes | str, said: str
) -> None:
    """A site's newest forward damaged in aggregator.db (a time past the calendar, a receipt stored as text): the
    site's line says what the record holds, and ``--json`` still answers, where both were a traceback."""
    main(["keygen", "--state", str(tmp_path)])
    site = SimulatedDevice()
    assert main(["enroll", "--state", str(tmp_path), "--site", site.public_key_hex, "--name", "north"]) == 0
    with sqlite3.connect(tmp_path / "aggregator.db") as db:
        db.execute("INSERT INTO updates (digest, device_id, round_id, num_samples, metrics, offset, length, receipt, "
                   "accepted_at) VALUES (?, ?, 3, 10, '{}', 0, 0, ?, ?)", (bytes(32), site.device_id, receipt,
                                                                          accepted_at))
    db.close()
    capsys.readouterr()
    assert main(["status", "--state", str(tmp_path)]) == 0
    assert f"  site {site.device_id}  north  {said}\n" in capsys.readouterr().out
    assert main(["status", "--state", str(tmp_path), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)["devices"]["list"]
    assert (listed["last_forward"], listed["last_forward_round"]) == (accepted_at, 3)


@pytest.mark.parametrize("accepted_at", [float("inf"), float("-inf")])
def test_status_json_of_a_state_with_a_forward_time_past_numbers_is_valid_json(
    tmp_path: Path, capsys, accepted_at: float
) -> None:
    """A site's forward time of infinity in aggregator.db: ``status --json`` printed ``Infinity``, which a strict
    JSON reader refuses; it now prints the value as the text ``"Infinity"`` (``"-Infinity"``), as every JSON output
    shows a number it found non-finite (appliance/strict_json.py, docs/api.md), while the text mode says "an
    unreadable time (inf)"."""
    main(["keygen", "--state", str(tmp_path)])
    site = SimulatedDevice()
    assert main(["enroll", "--state", str(tmp_path), "--site", site.public_key_hex, "--name", "north"]) == 0
    with sqlite3.connect(tmp_path / "aggregator.db") as db:
        db.execute("INSERT INTO updates (digest, device_id, round_id, num_samples, metrics, offset, length, receipt, "
                   "accepted_at) VALUES (?, ?, 3, 10, '{}', 0, 0, ?, ?)", (bytes(32), site.device_id, b"\xa0",
                                                                          accepted_at))
    db.close()
    capsys.readouterr()
    assert main(["status", "--state", str(tmp_path)]) == 0
    assert f"last forward at an unreadable time ({accepted_at!r}), into round 3\n" in capsys.readouterr().out
    assert main(["status", "--state", str(tmp_path), "--json"]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"not JSON: {constant}")

    (listed,) = json.loads(capsys.readouterr().out, parse_constant=refuse)["devices"]["list"]
    assert (listed["last_forward"], listed["last_forward_round"]) == ("Infinity" if accepted_at > 0 else "-Infinity", 3)


def test_status_lines_up_every_round_status_superseded_included(tmp_path: Path, capsys) -> None:
    """``superseded`` (10 letters, an async site's empty buffer) pushed its round's counts one column right."""
    main(["keygen", "--state", str(tmp_path)])
    store = Store(tmp_path)
    try:
        for round_id, status in enumerate(("published", "abandoned", "superseded"), start=1):
            store.insert_round(round_id, 0, 0.0, 60.0, 2)
            store.finish_round(round_id, status, 30.0, 2 if status == "published" else 0, 10, {})
    finally:
        store.close()
    capsys.readouterr()
    assert main(["status", "--state", str(tmp_path)]) == 0
    rounds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  round ")]
    assert [line.split()[3] for line in rounds] == ["superseded", "abandoned", "published"]
    assert len({line.index(" updates ") for line in rounds}) == 1, rounds


@pytest.mark.parametrize(
    "line,complaint",
    [
        ('{"device_id": "00", "public_key": "%s"}', "does not match its public key"),
        ('{"public_key": "abc"}', "not hex"),
        ('{"public_key": "%s00"}', "33 bytes"),
        ("not json", "not JSON"),
        ('["%s"]', 'expected an object with a "public_key" hex string'),
        ('{"public_key": 5}', 'expected an object with a "public_key" hex string'),
        ('{"name": "cam-1"}', 'expected an object with a "public_key" hex string'),
        ('{"public_key": "%s", "name": 42}', '"name" must be a string (the board name) or null, got 42'),
        ('{"public_key": "%s", "name": ["cam-1"]}', "or null, got ['cam-1']"),
    ],
)
def test_enroll_file_errors_name_the_line(tmp_path: Path, capsys, line: str, complaint: str) -> None:
    main(["keygen", "--state", str(tmp_path)])
    fleet = tmp_path / "fleet.jsonl"
    fleet.write_text("\n" + (line % SimulatedDevice().public_key_hex if "%s" in line else line) + "\n")
    capsys.readouterr()
    assert main(["enroll", "--state", str(tmp_path), "--from", str(fleet)]) == 2
    err = capsys.readouterr().err
    assert f"{fleet}:2" in err and complaint in err
    assert main(["status", "--state", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"]["enrolled"] == 0


def test_an_enrolment_line_whose_name_is_null_enrols_the_board_without_a_name(tmp_path: Path, capsys) -> None:
    """A null name, as a null device_id, is absent (docs/provisioning.md): it was enrolled as the text "None"."""
    main(["keygen", "--state", str(tmp_path)])
    device = SimulatedDevice()
    fleet = tmp_path / "fleet.jsonl"
    fleet.write_text(json.dumps({"device_id": None, "public_key": device.public_key_hex, "name": None}) + "\n")
    capsys.readouterr()
    assert main(["enroll", "--state", str(tmp_path), "--from", str(fleet)]) == 0
    assert "None" not in capsys.readouterr().out
    (enrolment,) = read_enrolment_file(fleet)
    assert enrolment.name == "" and enrolment.device_id == device.device_id


def test_revoke_unknown_device_and_status_of_nothing_are_clear_errors(tmp_path: Path, capsys) -> None:
    assert main(["status", "--state", str(tmp_path / "none")]) == 2
    assert "not an aggregator state directory" in capsys.readouterr().err
    main(["keygen", "--state", str(tmp_path)])
    assert main(["revoke", "--state", str(tmp_path), "ab" * 16]) == 2
    assert "no enrolled device" in capsys.readouterr().err


def test_serve_publishes_a_signed_package_and_its_initial_model(tmp_path: Path) -> None:
    state = tmp_path / "state"
    main(["keygen", "--state", str(state)])
    key = SigningKey(bytes.fromhex((state / "aggregator.key").read_text().strip()))
    pkg = _package(key, tmp_path / "tiny.flpkg")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--state", str(state), "--listen", f"127.0.0.1:{port}",
         "--model", str(tmp_path / "tiny.flpkg"), "--epochs", "3", "--encoding", "int8", "--clip-norm", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.1)
        with urllib.request.urlopen(url + "/v1/package") as r:
            assert r.read() == (tmp_path / "tiny.flpkg").read_bytes()
        with urllib.request.urlopen(url + f"/v1/packages/{pkg.digest.hex()}") as r:
            assert r.read() == (tmp_path / "tiny.flpkg").read_bytes()
        pub = VerifyKey(bytes.fromhex((state / "aggregator.pub").read_text().strip()))
        with urllib.request.urlopen(url + "/v1/task") as r:
            task = wire.decode_task(r.read(), pub)
        assert task.package_digest == pkg.digest and task.epochs == 3 and task.encoding == "int8"
        assert task.clip_norm == 2.0
        with urllib.request.urlopen(url + "/v1/status") as r:
            current = json.load(r)["current_round"]
        assert (current["max_update_norm"], current["max_update_norm_source"]) == (pytest.approx(2.2), "clip-norm")
        with urllib.request.urlopen(url + "/v1/models/latest") as r:
            release = wire.decode_model_release(r.read(), pub, pkg.param_specs)
        assert release.version == 0 and release.digest == task.model_digest
        np.testing.assert_array_equal(release.tensors["fc.weight"], pkg.initial_params["fc.weight"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_package_signed_by_another_key(tmp_path: Path) -> None:
    _package(SigningKey.generate(), tmp_path / "foreign.flpkg")
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(tmp_path / "state"), "--model",
         str(tmp_path / "foreign.flpkg"), "--listen", f"127.0.0.1:{free_port()}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert "foreign.flpkg" in done.stderr and "unknown-key" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_over_tls(tmp_path: Path) -> None:
    import ssl

    pytest.importorskip("cryptography", reason="cryptography makes the test certificate")
    cert, key = self_signed(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(tmp_path / "state"), "--listen",
         f"127.0.0.1:{port}", "--synthetic-parameters", "100", "--tls-cert", str(cert), "--tls-key", str(key)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    context = ssl.create_default_context(cafile=str(cert))
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", timeout=2, context=context) as r:
                    assert json.load(r)["status"] == "ok"
                    break
            except urllib.error.URLError as exc:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert not isinstance(exc.reason, ssl.SSLCertVerificationError), exc
                time.sleep(0.1)
        else:
            raise AssertionError("no HTTPS answer")
        with pytest.raises((OSError, http.client.HTTPException)):  # no plain HTTP on the TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_state_dir_whose_models_another_key_signed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    cmd = [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(state), "--listen",
           f"127.0.0.1:{port}", "--synthetic-parameters", "100"]
    release = state / "models" / "v00000000.release"
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Bounded only so a broken server cannot hang the run: on a loaded machine the first start can take long,
        # and going on without its release would start the second server for good (a timeout, not a refusal).
        deadline = time.monotonic() + 180
        while not release.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        first.terminate()
        first.wait(timeout=30)
    assert release.exists(), f"the first server wrote no release (exit code {first.returncode})"
    (state / "aggregator.key").unlink()  # --init makes a new key on the next start
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert "another key" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------- bad input at the door


def _serve_args(state: Path, *extra: str) -> list[str]:
    return ["serve", "--state", str(state), "--listen", f"127.0.0.1:{free_port()}", "--synthetic-parameters", "10",
            *extra]


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aggregator.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("command", ["keygen", "serve"])
@pytest.mark.parametrize("under_the_file", [False, True])
def test_a_state_path_that_is_a_file_is_refused_in_one_line(tmp_path: Path, capsys, command: str,
                                                              under_the_file: bool) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("not a directory\n")
    state = blocker / "sub" if under_the_file else blocker
    args = _serve_args(state) if command == "serve" else ["keygen", "--state", str(state)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{blocker} is not a directory" in err


@pytest.mark.parametrize("value", ["0", "-5", "1"])
def test_serve_refuses_a_synthetic_model_without_parameters(tmp_path: Path, capsys, value: str) -> None:
    main(["keygen", "--state", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--state", str(tmp_path), "--synthetic-parameters", value])
    assert exit_.value.code == 2
    assert f"--synthetic-parameters: expected at least 2 parameters, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("value", [str(2**26 + 1), str(2**63), str(2**64)])
def test_serve_refuses_a_synthetic_model_larger_than_a_package_in_one_line(tmp_path: Path, capsys, value: str) -> None:
    """2^63 parameters and up died building the model with a numpy ValueError traceback; a model package holds at
    most 2^26 float32 parameters (256 MiB), and a synthetic model stands in for one."""
    main(["keygen", "--state", str(tmp_path)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--state", str(tmp_path), "--synthetic-parameters", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--synthetic-parameters: expected at most {2**26} parameters" in err and "Traceback" not in err, err


@pytest.mark.parametrize("value", ["inf", "nan", "Infinity", "ten"])
@pytest.mark.parametrize("option", ["--round-timeout", "--update-window", "--lr", "--prox-mu", "--clip-norm",
                                    "--store-timeout"])
def test_serve_refuses_a_number_past_the_finite_in_one_line(tmp_path: Path, capsys, option: str, value: str) -> None:
    """``--round-timeout inf`` (or nan) was a traceback that left an open round with an infinite deadline in
    aggregator.db, which every later start tripped over; ``--clip-norm nan`` put NaN into /v1/status, which is not
    JSON. Each is refused by the parser, naming the option, before anything is written."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--state", str(tmp_path), "--synthetic-parameters", "10", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: expected a finite number, got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["inf", "nan"])
@pytest.mark.parametrize("option", [
    "--dp-epsilon-budget", "--secagg-phase-timeout", "--server-lr", "--tau", "--dp-noise-multiplier", "--dp-delta",
    "--dp-adaptive-clip", "--dp-clip-learning-rate", "--dp-clip-count-stddev", "--secagg-threshold",
    "--max-update-norm", "--trim"])
def test_serve_refuses_inf_and_nan_for_every_number_option(tmp_path: Path, capsys, option: str, value: str) -> None:
    """``--dp-epsilon-budget inf`` and ``--secagg-phase-timeout inf`` were served, and /v1/status then printed
    Infinity, which is not JSON; ``--server-lr inf`` (or ``--tau inf``) was served and every round's model was inf,
    refused at each close. Every number option of serve is refused by the parser, naming it."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--state", str(tmp_path), "--synthetic-parameters", "10", option, value])
    assert exit_.value.code == 2
    assert f"argument {option}: expected a finite number, got {value!r}" in capsys.readouterr().err


def test_serve_refuses_a_negative_worker_count_in_one_line(tmp_path: Path, capsys) -> None:
    """``--workers -1`` was a ValueError traceback from the thread pool after the banner."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--state", str(tmp_path), "--synthetic-parameters", "10", "--workers",
                                   "-1"])
    assert exit_.value.code == 2
    assert "argument --workers: expected a non-negative integer, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1"])
def test_serve_refuses_an_update_window_that_refuses_every_update(tmp_path: Path, value: str) -> None:
    """``--update-window -1`` (or 0) was served, and every update was then refused as created too long ago."""
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(tmp_path / "state"),
         "--synthetic-parameters", "10", "--listen", f"127.0.0.1:{free_port()}", "--update-window", value],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["fl-aggregator: update-window must be positive"], done.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_serve_refuses_a_store_timeout_that_is_not_positive_in_one_line(tmp_path: Path, value: str) -> None:
    """``--store-timeout 0`` would answer every upload 503 before its write could return."""
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(tmp_path / "state"),
         "--synthetic-parameters", "10", "--listen", f"127.0.0.1:{free_port()}", "--store-timeout", value],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fl-aggregator: store-timeout must be a positive number of seconds, got {float(value)}"], done.stderr


def test_enroll_from_a_file_that_is_not_utf8_names_the_line(tmp_path: Path, capsys) -> None:
    main(["keygen", "--state", str(tmp_path)])
    fleet = tmp_path / "fleet.jsonl"
    fleet.write_bytes(json.dumps({"public_key": SimulatedDevice().public_key_hex}).encode() + b"\n"
                      + b'{"public_key": "\xff\xfe", "name": "caf\xe9"}\n')
    capsys.readouterr()
    assert main(["enroll", "--state", str(tmp_path), "--from", str(fleet)]) == 2
    assert f"{fleet}:2: not UTF-8 text" in capsys.readouterr().err


SMALL_ORDER_POINTS = [
    "01" + "00" * 31,  # the neutral element
    "ec" + "ff" * 30 + "7f",  # order 2
    "00" * 32,  # order 4
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
]


@pytest.mark.parametrize("key", ["ff" * 32, *SMALL_ORDER_POINTS])
def test_enroll_refuses_bytes_that_are_not_an_ed25519_public_key(tmp_path: Path, capsys, key: str) -> None:
    main(["keygen", "--state", str(tmp_path)])
    capsys.readouterr()
    assert main(["enroll", "--state", str(tmp_path), key]) == 2
    assert f"public key {key!r} is not an Ed25519 public key" in capsys.readouterr().err
    fleet = tmp_path / "fleet.jsonl"
    fleet.write_text(json.dumps({"public_key": key}) + "\n")
    assert main(["enroll", "--state", str(tmp_path), "--from", str(fleet)]) == 2
    assert f"{fleet}:1: public key" in capsys.readouterr().err
    assert main(["status", "--state", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["devices"]["enrolled"] == 0


@pytest.mark.parametrize("exists", [False, True])
def test_serve_does_not_create_a_state_unless_asked(tmp_path: Path, exists: bool) -> None:
    state = tmp_path / "mistyped"
    if exists:
        state.mkdir()
    done = _run_cli(*_serve_args(state))  # a process: before the fix, this served
    assert done.returncode == 2
    err = done.stderr
    assert err.count("\n") == 1 and str(state) in err
    assert f"fl-aggregator keygen --state {state}" in err and "--init" in err
    assert not (state / "aggregator.key").exists() and not (state / "aggregator.db").exists()
    assert state.exists() == exists


@pytest.mark.parametrize("content,complaint", [(b"", "is empty"), (b"not a database\n" * 100, "not a database")])
def test_a_damaged_database_is_refused_not_reinitialised(tmp_path: Path, capsys, content: bytes,
                                                         complaint: str) -> None:
    main(["keygen", "--state", str(tmp_path)])
    db = tmp_path / "aggregator.db"
    db.write_bytes(content)
    capsys.readouterr()
    assert main(["status", "--state", str(tmp_path)]) == 2
    assert f"{db}" in capsys.readouterr().err
    done = _run_cli(*_serve_args(tmp_path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{db}" in done.stderr and complaint in done.stderr and "Traceback" not in done.stderr
    assert "serving" not in done.stdout
    assert db.read_bytes() == content


def test_serve_names_an_address_it_cannot_resolve(tmp_path: Path) -> None:
    main(["keygen", "--state", str(tmp_path)])
    done = _run_cli("serve", "--state", str(tmp_path), "--listen", "256.1.1.1:8080", "--synthetic-parameters", "10")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--listen 256.1.1.1:8080" in done.stderr
    assert "serving" not in done.stdout and not (tmp_path / "aggregator.db").exists()


def test_serve_reports_a_port_in_use_before_anything_else(tmp_path: Path) -> None:
    import socket

    main(["keygen", "--state", str(tmp_path)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run_cli("serve", "--state", str(tmp_path), "--listen", f"127.0.0.1:{port}",
                        "--synthetic-parameters", "10")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"--listen 127.0.0.1:{port}" in done.stderr
    assert "in use" in done.stderr
    assert "serving" not in done.stdout and "round 1" not in done.stderr
    assert not (tmp_path / "aggregator.db").exists()  # the state was not opened


def test_a_second_serve_on_a_state_already_served_is_refused_in_one_line(tmp_path: Path) -> None:
    """Two servers on one state (a unit started twice, another port, --dp-reset beside a running server) would both
    write its rounds, spool and privacy ledger. The second is refused, naming the first; once the first is gone (even
    killed with -9, which runs no clean-up), the state serves again."""
    state = tmp_path / "state"
    first = subprocess.Popen([sys.executable, "-m", "aggregator.cli", "serve", "--init", *_serve_args(state)[1:]],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert first.stdout is not None and "serving" in first.stdout.readline()  # the banner: the state is held
        second = _run_cli(*_serve_args(state))  # without the lock it serves (and times out)
        err = second.stderr
        assert second.returncode == 2 and err.count("\n") == 1, err
        assert f"{state} is already served by another fl-aggregator serve (pid {first.pid})" in err
    finally:
        first.kill()
        first.wait(timeout=30)
    with served_alone(state):  # the killed server's lock went with it
        assert (state / "serve.lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize("flag", ["--goal-clients", "--min-clients"])
def test_serve_refuses_a_round_goal_past_what_the_database_holds_in_one_line(tmp_path: Path, flag: str) -> None:
    """A round's goal (max(--goal-clients, --min-clients)) is a 64-bit integer in aggregator.db: 2^63 started the
    server, which then died at its first round with an OverflowError traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "aggregator.cli", "serve", "--init", "--state", str(tmp_path / "state"),
         "--synthetic-parameters", "10", "--listen", f"127.0.0.1:{free_port()}", flag, str(2**63)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and f"{flag[2:]} must be at most {2**63 - 1}" in done.stderr, done.stderr

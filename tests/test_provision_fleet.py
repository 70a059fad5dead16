"""`flctl provision`: fleet keys sealed at rest, enrolment file the aggregator reads, per-board config."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from flash_images import PASSPHRASE, cli
from interrupted_writes import killed_write
from nacl.signing import SigningKey

from aggregator.registry import read_enrolment_file
from appliance import identity
from appliance.config import load_config
from flctl.provision import open_fleet

pytestmark = pytest.mark.usefixtures("flctl_env")


def _provision(fleet: Path, *extra: str) -> int:
    return cli(["provision", "--fleet", str(fleet), *extra])


def test_new_fleet_has_enrolment_file_the_aggregator_reads(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "cam-1,cam-2,cam-3", "--aggregator-url", "http://10.0.2.100:8080") == 0
    lines = (fleet / "enroll.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["name"] for r in records] == ["cam-1", "cam-2", "cam-3"]
    for r in records:
        assert set(r) == {"device_id", "public_key", "name"}
    enrolments = read_enrolment_file(fleet / "enroll.jsonl")  # the aggregator's own parser
    assert [e.device_id for e in enrolments] == [r["device_id"] for r in records]
    assert len({r["device_id"] for r in records}) == 3


def test_aggregator_key_lands_in_its_state_dir_and_matches_pinned_key(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--boards", "2", "--aggregator-url", "http://agg.example:8080") == 0
    key_file = fleet / "aggregator" / "aggregator.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    agg = SigningKey(identity.read_key_file(key_file))
    assert (fleet / "aggregator.pub").read_text() == bytes(agg.verify_key).hex() + "\n"
    assert sorted(p.name for p in (fleet / "boards").iterdir()) == ["board-001", "board-002"]


def test_secret_keys_are_not_stored_in_plaintext(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a,b", "--aggregator-url", "http://10.0.2.100:8080") == 0
    opened = open_fleet(fleet, None)
    seeds = [bytes(opened.device_key(n)).hex() for n in ("a", "b")]
    agg_seed = bytes(opened.aggregator_key()).hex()
    for path in fleet.rglob("*"):
        if not path.is_file():
            continue
        text = path.read_bytes()
        for seed in seeds:
            assert seed.encode() not in text, f"device seed in plaintext in {path}"
            assert bytes.fromhex(seed) not in text
        if path != fleet / "aggregator" / "aggregator.key":
            assert agg_seed.encode() not in text, f"aggregator seed in plaintext in {path}"
    assert stat.S_IMODE((fleet / "boards" / "a" / "device.key.sealed").stat().st_mode) == 0o600


def test_rerun_adds_boards_and_keeps_existing_keys(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a,b", "--aggregator-url", "http://10.0.2.100:8080") == 0
    before = (fleet / "enroll.jsonl").read_text().splitlines()
    agg_before = (fleet / "aggregator.pub").read_text()
    assert _provision(fleet, "--names", "b,c") == 0
    after = (fleet / "enroll.jsonl").read_text().splitlines()
    assert after[:2] == before and len(after) == 3
    assert (fleet / "aggregator.pub").read_text() == agg_before


def test_wrong_passphrase_is_refused(tmp_path, monkeypatch, capsys):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://10.0.2.100:8080") == 0
    monkeypatch.setenv("FLCTL_PASSPHRASE", "not the passphrase")
    assert _provision(fleet, "--names", "b") == 1
    assert "wrong passphrase" in capsys.readouterr().err
    assert not (fleet / "boards" / "b").exists()


def test_passphrase_file_is_used(tmp_path, monkeypatch):
    monkeypatch.delenv("FLCTL_PASSPHRASE")
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n")
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://10.0.2.100:8080",
                      "--passphrase-file", str(pw)) == 0
    monkeypatch.setenv("FLCTL_PASSPHRASE", PASSPHRASE)  # the same passphrase opens it
    assert bytes(open_fleet(fleet, None).device_key("a"))


def test_no_passphrase_anywhere_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FLCTL_PASSPHRASE")
    assert _provision(tmp_path / "f", "--names", "a", "--aggregator-url", "http://x:1") == 1
    assert "no passphrase: pass --passphrase-file FILE or set FLCTL_PASSPHRASE" in capsys.readouterr().err


def test_tampered_sealed_key_is_detected(tmp_path, capsys):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://10.0.2.100:8080") == 0
    sealed = fleet / "boards" / "a" / "device.key.sealed"
    obj = json.loads(sealed.read_text())
    box = bytearray(bytes.fromhex(obj["box"]))
    box[-1] ^= 1
    obj["box"] = box.hex()
    sealed.write_text(json.dumps(obj))
    assert _provision(fleet, "--names", "a") == 1
    assert "wrong passphrase (or the file was altered)" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--names", "a"], "--aggregator-url is required"),
    (["--names", "Bad Name", "--aggregator-url", "http://x:1"], "board name 'Bad Name'"),
    (["--names", "a,a", "--aggregator-url", "http://x:1"], "lists a board twice"),
    (["--names", "a", "--aggregator-url", "ftp://x"], "must look like http://HOST:PORT"),
    (["--names", "a", "--aggregator-url", "http://[fd00::1"], "must look like http://HOST:PORT"),  # was a traceback
    (["--names", "a", "--aggregator-url", "http://x:99999"], "must look like http://HOST:PORT"),  # was provisioned
])
def test_bad_arguments_name_the_problem(tmp_path, capsys, args, message):
    assert _provision(tmp_path / "fleet", *args) == 1
    assert message in capsys.readouterr().err


def test_board_agent_toml_overrides_the_image_config(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://10.0.2.100:8080") == 0
    assert _provision(fleet, "--aggregator-url", "http://10.0.2.100:9090") == 0  # URL change follows
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.toml").write_bytes((fleet / "boards" / "a" / "agent.toml").read_bytes())
    base = tmp_path / "agent.toml"
    base.write_text(f'[aggregator]\nurl = "http://127.0.0.1:1"\n[agent]\nstate_dir = "{state}"\n')
    assert load_config(base).aggregator.url == "http://10.0.2.100:9090"


def test_existing_aggregator_key_is_adopted(tmp_path):
    state = tmp_path / "aggstate"
    own = SigningKey.generate()
    identity.write_key_file(state / "aggregator.key", bytes(own), 0o600)
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://x:1", "--aggregator-state",
                      str(state)) == 0
    assert (fleet / "aggregator.pub").read_text().strip() == bytes(own.verify_key).hex()
    assert not (fleet / "aggregator").exists()


def test_url_change_keeps_per_board_settings(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://10.0.2.100:8080") == 0
    toml = fleet / "boards" / "a" / "agent.toml"
    toml.write_text(toml.read_text() + 'poll_wait_seconds = 5.0\n[data]\nsource = "synthetic"\n')
    assert _provision(fleet, "--aggregator-url", "http://10.0.2.100:9090") == 0
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.toml").write_bytes(toml.read_bytes())
    base = tmp_path / "agent.toml"
    base.write_text(f'[agent]\nstate_dir = "{state}"\n')
    config = load_config(base)
    assert (config.aggregator.url, config.aggregator.poll_wait_seconds, config.data.source) == (
        "http://10.0.2.100:9090", 5.0, "synthetic")


def test_a_rerun_removes_what_a_killed_run_left_half_written(tmp_path, capsys):
    """A run killed while it wrote a board's files leaves a temp file beside them; the next run removes it and says
    so in one line, and keeps the board's files."""
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "cam-1", "--aggregator-url", "http://10.0.2.100:8080") == 0
    board = fleet / "boards" / "cam-1"
    left = killed_write(board / "agent.toml") + killed_write(fleet / "fleet.json")
    capsys.readouterr()
    assert _provision(fleet, "--names", "cam-1") == 0
    assert not any(path.exists() for path in left)
    assert "removed 2 temp files" in capsys.readouterr().err
    assert load_config(board / "agent.toml").aggregator.url == "http://10.0.2.100:8080"

"""Agent configuration: defaults, the data-partition override, and errors that name the file and the key."""

from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_and_values(tmp_path):
    cfg = load_config(
        write(
            tmp_path / "agent.toml",
            f'[agent]\nstate_dir = "{tmp_path}"\n[data]\nsource = "synthetic"\nsynthetic_camera = 0\n'
            '[aggregator]\nurl = "http://127.0.0.1:8080"\nallow_plain_http = true\n',
        )
    )
    assert cfg.data.source == "synthetic"
    assert cfg.metrics.listen == "0.0.0.0:9101"
    assert cfg.state_path == tmp_path


def test_override_on_data_partition_wins_key_by_key(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    write(state / "agent.toml", '[aggregator]\nurl = "http://10.0.2.100:8080"\nallow_plain_http = true\n')
    base = write(tmp_path / "agent.toml", f'[agent]\nstate_dir = "{state}"\n[aggregator]\npoll_wait_seconds = 5\n')
    cfg = load_config(base)
    assert cfg.aggregator.url == "http://10.0.2.100:8080"
    assert cfg.aggregator.poll_wait_seconds == 5.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agentt]\n", "unknown section [agentt]"),
        ("[agent]\nstate_dri = '/x'\n", "[agent] unknown key 'state_dri'"),
        ("[data]\nsamples_per_round = 'many'\n", "[data] samples_per_round: expected int"),
        ("[data]\nsource = 'webcam'\n", "[data] source: 'webcam' is not one of cameras, synthetic"),
        ("[data]\nsamples_per_round = 0\n", "[data] samples_per_round: must be > 0"),
        ("[aggregator]\nurl = 'ftp://x'\n", "[aggregator] url: 'ftp://x' is not an http(s) URL"),
        # a ValueError traceback at every start, not the key named
        ("[aggregator]\nurl = 'http://[fd00::1'\n",
         "[aggregator] url: 'http://[fd00::1' is not an http(s) URL with a host (Invalid IPv6"),
        # the agent started and failed every round's task request
        ("[aggregator]\nurl = 'http://agg:99999'\n",
         "[aggregator] url: 'http://agg:99999' is not an http(s) URL with a host (Port out"),
        # every request's /v1/... path landed in the query: the agent failed every round
        ("[aggregator]\nurl = 'http://agg:8080/?fleet=a'\n", "URL with a host (a query or fragment)"),
        ("[metrics]\nlisten = '9101'\n", "[metrics] listen: '9101' is not HOST:PORT"),
        ("[metrics\n", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, needle):
    path = write(tmp_path / "agent.toml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(path, override=False)
    assert str(path) in str(exc.value)
    assert needle in str(exc.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"agent\.toml: cannot read"):
        load_config(tmp_path / "agent.toml")


@pytest.mark.parametrize(
    ("aggregator", "needle"),
    [
        ('url = "http://10.0.2.100:8080"\n', "is plain HTTP: updates and models would cross the network unencrypted"),
        ('url = "https://agg.example"\n', "is https but [aggregator] ca_file is not set"),
        ('url = "https://agg.example"\nca_file = "/nonexistent/ca.pem"\n', "/nonexistent/ca.pem does not exist"),
        ('url = "https://agg.example"\nca_file = "junk.pem"\n', "junk.pem holds no PEM certificate"),
    ],
)
def test_transport_must_be_configured_explicitly(tmp_path, aggregator, needle):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    path = write(tmp_path / "agent.toml", f"[agent]\nstate_dir = \"{tmp_path}\"\n[aggregator]\n{aggregator}")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(path) in str(exc.value) and "[aggregator]" in str(exc.value)
    assert needle in str(exc.value)


def test_ca_file_is_relative_to_its_config_file_and_the_override_can_supply_it(tmp_path):
    pytest.importorskip("cryptography", reason="cryptography makes the test certificate")
    from tls_certs import self_signed

    state = tmp_path / "state"
    state.mkdir()
    cert, _key = self_signed(state)
    base = write(tmp_path / "agent.toml", f'[agent]\nstate_dir = "{state}"\n[aggregator]\nurl = "https://127.0.0.1"\n')
    write(state / "agent.toml", f'[aggregator]\nca_file = "{cert.name}"\n')
    cfg = load_config(base)
    assert cfg.aggregator.ca_file == str(cert) and not cfg.aggregator.allow_plain_http


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[agent]\nlog_level = "info"\n# caf\xe9\n')
    with pytest.raises(ConfigError, match=r"agent\.toml: not UTF-8 text"):
        load_config(path, override=False)


@pytest.mark.parametrize("command", ["run", "check-config"])
def test_fl_agent_names_a_config_that_is_not_utf8(tmp_path, capsys, command):
    from appliance.cli import main

    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.toml").write_bytes(b"[data]\nsource = \"synthetic\" # \xff\n")  # the data-partition override
    base = write(tmp_path / "agent.toml", f'[agent]\nstate_dir = "{state}"\n')
    assert main([command, "--config", str(base)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{state / 'agent.toml'}: not UTF-8 text" in err

"""The agent's metrics endpoint behind TLS and basic auth, configured the way every Prometheus exporter is: a web
configuration file (prometheus/exporter-toolkit's format, checked by ``promtool check web-config``) named by
``[metrics] web_config``. A real Prometheus server scrapes it over HTTPS with a password; a wrong password, no
password, plain HTTP and a client without the required certificate are refused; a bad file stops start-up with
one line naming the key.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest
from tls_certs import Issued, certificate

from appliance.cli import main as fl_agent
from appliance.config import ConfigError
from appliance.metrics import AgentMetrics
from appliance.metrics_web import MetricsServer
from flctl.ports import free_port

REPO = Path(__file__).resolve().parent.parent
PASSWORD = "correct horse"


@dataclass(frozen=True)
class Pki:
    ca: Issued
    server: Issued
    client_ca: Issued
    client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    ca = certificate(tmp, "ca", "fl-edge test CA", ca=True)
    client_ca = certificate(tmp, "scrapers-ca", "fl-edge scrapers CA", ca=True)
    return Pki(
        ca=ca,
        server=certificate(tmp, "server", issuer=ca, issuer_name="fl-edge test CA"),
        client_ca=client_ca,
        client=certificate(tmp, "prometheus", "prometheus", issuer=client_ca, issuer_name="fl-edge scrapers CA"),
    )


def htpasswd_hash(password: str) -> str:
    """A bcrypt hash as `htpasswd -nB` writes it ($2y$), at the lowest cost to keep the tests quick."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode().replace("$2b$", "$2y$", 1)


def web_config(directory: Path, pki: Pki, *, users: bool = True, client_certs: bool = False) -> Path:
    """A web.yml in ``directory`` whose certificate paths are relative to it, as the toolkit resolves them."""
    for issued in (pki.server, pki.client_ca):
        for path in (issued.cert, issued.key_file):
            shutil.copy(path, directory / path.name)
    text = f"tls_server_config:\n  cert_file: {pki.server.cert.name}\n  key_file: {pki.server.key_file.name}\n"
    if client_certs:
        text += f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.client_ca.cert.name}\n"
    if users:
        text += f"basic_auth_users:\n  prometheus: {htpasswd_hash(PASSWORD)}\n"
    path = directory / "web.yml"
    path.write_text(text)
    return path


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    servers: list[MetricsServer] = []

    def start(config: Path | None) -> int:
        server = AgentMetrics().serve("127.0.0.1:0", str(config) if config else "")
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(port: int, pki: Pki, *, user: str = "", password: str = "", client: Issued | None = None,
        scheme: str = "https") -> tuple[int, dict[str, str], str]:
    context = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client is not None:
        context.load_cert_chain(client.cert, client.key_file)
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/metrics")
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10, context=context if scheme == "https" else None) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_promtool_accepts_the_web_config_the_docs_show(tmp_path, pki):
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    path = web_config(tmp_path, pki, client_certs=True)
    check = subprocess.run(["promtool", "check", "web-config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_metrics_need_the_password_and_are_served_over_tls(tmp_path, pki, serve):
    port = serve(web_config(tmp_path, pki))
    status, headers, _ = get(port, pki)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert get(port, pki, user="prometheus", password="wrong")[0] == 401
    assert get(port, pki, user="someone", password=PASSWORD)[0] == 401
    status, _, body = get(port, pki, user="prometheus", password=PASSWORD)
    assert status == 200 and "fl_agent_build_info" in body
    assert get(port, pki, user="prometheus", password=PASSWORD)[0] == 200  # the remembered check answers alike
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        get(port, pki, user="prometheus", password=PASSWORD, scheme="http")


def test_client_certificates_are_required_when_the_file_says_so(tmp_path, pki, serve):
    port = serve(web_config(tmp_path, pki, users=False, client_certs=True))
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(port, pki)
    stranger = certificate(tmp_path, "stranger", "stranger")  # self-signed: not from the scrapers' CA
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        get(port, pki, client=stranger)
    assert get(port, pki, client=pki.client)[0] == 200


def test_a_client_that_stalls_its_handshake_delays_no_other_scrape(tmp_path, pki, serve):
    """The handshake runs in the connection's own thread: a silent client ties up that thread only."""
    port = serve(web_config(tmp_path, pki, users=False))
    with socket.create_connection(("127.0.0.1", port)):
        assert get(port, pki)[0] == 200


def test_without_a_web_config_the_endpoint_is_plain_http(serve, pki):
    status, _, body = get(serve(None), pki, scheme="http")
    assert status == 200 and "fl_agent_build_info" in body


def test_a_port_in_use_is_one_line_naming_the_listen_key(serve):
    port = serve(None)
    with pytest.raises(ConfigError, match=rf"^\[metrics\] listen: cannot listen on 127.0.0.1:{port}: "):
        AgentMetrics().serve(f"127.0.0.1:{port}")


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
def test_the_agent_can_listen_on_an_address_the_network_configures_later():
    """A management address is often configured after the agent starts (DHCP, a VLAN brought up later): the
    socket binds anyway (IP_FREEBIND) and serves once the address exists. Run in a network namespace of its
    own, where 192.0.2.1 (a documentation address) is configured on no interface and nothing can leave."""
    script = (
        "from appliance.metrics import AgentMetrics\n"
        "server = AgentMetrics().serve('192.0.2.1:0')\n"
        "print(server.server_address[0])\n"
    )
    run = subprocess.run(["unshare", "-n", "sh", "-c", f"ip link set lo up && {sys.executable} -c \"$0\"", script],
                         capture_output=True, text=True, cwd=REPO)
    if "unshare failed" in run.stderr or "Operation not permitted" in run.stderr:
        pytest.skip(f"no network namespace here: {run.stderr.strip()}")
    assert run.returncode == 0 and run.stdout.strip() == "192.0.2.1", run.stderr


# -- a bad web configuration stops start-up with one line --------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_server_config:\n  cert_file: server.pem\n", "tls_server_config: key_file is missing"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: nowhere.key\n", "nowhere.key does not exist"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  client_ca_file: scrapers-ca.pem\n",
         "client_ca_file is set but client_auth_type is NoClientCert"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n"
         "  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  min_version: TLS10\n",
         "min_version 'TLS10' is not one of TLS12, TLS13"),
        ("tls_server_config:\n  cert_file: server.pem\n  key_file: server.key\n  cipher_suites: [a]\n",
         "tls_server_config: cipher_suites is not supported by fl-agent"),
        ("tls_server_config:\n  cert_file: server.key\n  key_file: server.pem\n", "not a usable PEM certificate"),
        ("basic_auth_users:\n  prometheus: secret\n", "basic_auth_users: prometheus: not a bcrypt hash"),
        ("http_server_config:\n  http2: false\n", "http_server_config is not supported by fl-agent"),
        ("tls_config:\n  cert_file: x\n", "unknown key tls_config; known: basic_auth_users, tls_server_config"),
        ("basic_auth_users: [prometheus]\n", "basic_auth_users must be a mapping"),
        ("tls_server_config: {cert_file: [\n", "not valid YAML"),
    ],
)
def test_a_bad_web_config_is_one_line_naming_the_key(tmp_path, pki, capsys, text, message):
    web_config(tmp_path, pki)  # the certificate files beside it
    (tmp_path / "web.yml").write_text(text)
    config = tmp_path / "agent.toml"
    config.write_text(
        '[aggregator]\nurl = "http://127.0.0.1:9"\nallow_plain_http = true\n'
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nweb_config = "web.yml"\n'
    )
    assert fl_agent(["check-config", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fl-agent: [metrics] web_config: {tmp_path / 'web.yml'}: ")
    assert message in err


def test_check_config_accepts_a_good_web_config(tmp_path, pki, capsys):
    web_config(tmp_path, pki)
    config = tmp_path / "agent.toml"
    config.write_text(
        '[aggregator]\nurl = "http://127.0.0.1:9"\nallow_plain_http = true\n'
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[metrics]\nweb_config = "web.yml"\n'
    )
    assert fl_agent(["check-config", "--config", str(config)]) == 0, capsys.readouterr().err


# -- a real Prometheus server ------------------------------------------------------------------------------


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus package is not installed")
def test_prometheus_scrapes_the_agent_over_tls_with_basic_auth(tmp_path, pki, serve):
    """Prometheus's own scrape config (scheme https, tls_config, basic_auth) against the agent's web config: the
    job with the password is up and its series arrive; the same target with a wrong password is down."""
    port = serve(web_config(tmp_path, pki, client_certs=True))

    def job(name: str, password: str) -> str:
        return (f"  - job_name: {name}\n    scheme: https\n    tls_config:\n      ca_file: {pki.ca.cert}\n"
                f"      cert_file: {pki.client.cert}\n      key_file: {pki.client.key_file}\n"
                f"    basic_auth:\n      username: prometheus\n      password: {json.dumps(password)}\n"
                f"    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")

    config = tmp_path / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n" + job("fl-agent", PASSWORD)
                      + job("wrong-password", "guess"))
    check = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    prom_port = free_port()
    prom = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{prom_port}"
    try:
        up: dict[str, str] = {}
        built: list[dict] = []
        deadline = time.monotonic() + 120  # only keeps a broken setup from hanging the run
        while time.monotonic() < deadline and not (len(up) == 2 and built):
            try:
                up = {s["metric"]["job"]: s["value"][1] for s in query(base, "up")}
                built = query(base, 'fl_agent_build_info{job="fl-agent"}')
            except OSError:
                pass
            time.sleep(0.5)
        assert up == {"fl-agent": "1", "wrong-password": "0"}, up
        assert built, "Prometheus holds no fl_agent_build_info from the TLS scrape"
    finally:
        prom.terminate()
        prom.wait(timeout=10)

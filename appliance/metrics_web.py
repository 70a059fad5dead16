"""The agent's /metrics endpoint: plain HTTP, or HTTPS and basic auth as a Prometheus web configuration file says.

The file is the one every Prometheus exporter reads (prometheus/exporter-toolkit, ``--web.config.file``), so a
fleet's node_exporter and fl-agent share one file and one scrape config, and ``promtool check web-config``
checks it. What fl-agent applies:

    tls_server_config:
      cert_file: server.pem            # with key_file: serve HTTPS
      key_file: server.key
      client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven; default NoClientCert
      client_ca_file: scrapers-ca.pem  # the CA client certificates must chain to
      min_version: TLS12               # TLS12 (default) or TLS13; max_version likewise
    basic_auth_users:                  # user: bcrypt hash (htpasswd -nBC 10 "" | tr -d ':\\n')
      prometheus: $2y$10$...

Relative paths are relative to the file, as in the toolkit. A key fl-agent does not apply (inline certificates,
cipher suites, HTTP headers, rate limits...) is refused by name rather than ignored. The file is read at start.

PyYAML and bcrypt are imported only when a file is used, bcrypt only when it names users, so a device that
serves plain HTTP carries neither. A bcrypt check costs about 0.1 s of a core at cost 10: a (user, password)
pair already checked is remembered (by its SHA-256), and checks run one at a time, so guessing passwords cannot
take more than one core.

TLS handshakes run in each connection's thread with a timeout, so a client that connects and says nothing
delays no other scrape. On Linux the socket binds with IP_FREEBIND: ``listen`` may name a management address
that the network configures after the agent starts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("fl_agent.metrics")

# Seconds a connection may take for its TLS handshake, and then for each read or write of its request.
CONNECTION_TIMEOUT = 15.0
# Linux's IP_FREEBIND (bits/in.h); the socket module does not name it.
IP_FREEBIND = 15
REALM = "fl-agent metrics"
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version", "max_version"}
# Keys of the toolkit's format that fl-agent does not apply: refused by name.
_NOT_APPLIED = {
    "": {"http_server_config", "rate_limit"},
    "tls_server_config": {"cert", "key", "client_ca", "client_allowed_sans", "cipher_suites",
                          "prefer_server_cipher_suites", "curve_preferences"},
}
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")


class WebConfigError(ValueError):
    """The web configuration file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class WebConfig:
    """What a web configuration file asks for: a server TLS context (None: plain HTTP) and basic-auth users."""

    tls: ssl.SSLContext | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash


def load_web_config(path: Path) -> WebConfig:
    """Read and check ``path``; WebConfigError names the file and the key of the first problem."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise WebConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise WebConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    data = _mapping(path, "", {} if data is None else data)
    _check_keys(path, "", data, {"tls_server_config", "basic_auth_users"})
    tls_section = _mapping(path, "tls_server_config", data.get("tls_server_config") or {})
    users = _mapping(path, "basic_auth_users", data.get("basic_auth_users") or {})
    return WebConfig(tls=_tls_context(path, tls_section) if tls_section else None, users=_users(path, users))


def _mapping(path: Path, key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise WebConfigError(f"{path}: {key or 'the file'} must be a mapping of names")
    return value


def _check_keys(path: Path, section: str, data: dict[str, Any], known: set[str]) -> None:
    for key in data:
        where = f"{section}: {key}" if section else key
        if key in _NOT_APPLIED[section]:
            raise WebConfigError(f"{path}: {where} is not supported by fl-agent; supported: {', '.join(sorted(known))}")
        if key not in known:
            raise WebConfigError(f"{path}: unknown key {where}; known: {', '.join(sorted(known))}")


def _string(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise WebConfigError(f"{path}: tls_server_config: {key} must be a non-empty string")
    return value


def _tls_context(path: Path, tls: dict[str, Any]) -> ssl.SSLContext:
    _check_keys(path, "tls_server_config", tls, _TLS_KEYS)
    where = f"{path}: tls_server_config"
    for key in ("cert_file", "key_file"):
        if key not in tls:
            raise WebConfigError(f"{where}: {key} is missing (cert_file and key_file make the server HTTPS)")
    files = {k: path.parent / _string(path, k, tls[k]) for k in ("cert_file", "key_file", "client_ca_file") if k in tls}
    auth = tls.get("client_auth_type", "NoClientCert")
    if auth not in _CLIENT_AUTH:
        raise WebConfigError(f"{where}: client_auth_type {auth!r} is not one of {', '.join(_CLIENT_AUTH)}")
    if auth == "NoClientCert" and "client_ca_file" in files:
        raise WebConfigError(f"{where}: client_ca_file is set but client_auth_type is NoClientCert: say "
                             "RequireAndVerifyClientCert to check client certificates")
    if auth != "NoClientCert" and "client_ca_file" not in files:
        raise WebConfigError(f"{where}: client_auth_type {auth} needs client_ca_file, the CA of client certificates")
    for key, file in files.items():
        if not file.is_file():
            raise WebConfigError(f"{where}: {key} {file} does not exist")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for key, attribute in (("min_version", "minimum_version"), ("max_version", "maximum_version")):
        version = tls.get(key, "TLS12" if key == "min_version" else "TLS13")
        if version not in _TLS_VERSIONS:
            raise WebConfigError(f"{where}: {key} {version!r} is not one of {', '.join(_TLS_VERSIONS)}")
        setattr(context, attribute, _TLS_VERSIONS[version])
    if context.minimum_version > context.maximum_version:
        raise WebConfigError(f"{where}: min_version is above max_version")
    try:
        context.load_cert_chain(files["cert_file"], files["key_file"])
        if "client_ca_file" in files:
            context.load_verify_locations(cafile=files["client_ca_file"])
    except ssl.SSLError as exc:  # an OSError too: caught first
        raise WebConfigError(f"{where}: {', '.join(map(str, files.values()))}: not a usable PEM certificate and "
                             f"key ({exc.reason or exc})") from None
    except OSError as exc:
        raise WebConfigError(f"{where}: cannot read {', '.join(map(str, files.values()))}: {exc.strerror}") from None
    context.verify_mode = _CLIENT_AUTH[auth]
    return context


def _users(path: Path, users: dict[str, Any]) -> dict[str, bytes]:
    out = {}
    for user, hashed in users.items():
        if not user or ":" in user:
            raise WebConfigError(f"{path}: basic_auth_users: {user!r} is not a user name (empty, or holds ':')")
        if not isinstance(hashed, str) or not _BCRYPT_HASH.match(hashed):
            raise WebConfigError(f"{path}: basic_auth_users: {user}: not a bcrypt hash ($2y$10$ and 53 more "
                                 "characters, as `htpasswd -nBC 10 \"\" | tr -d ':\\n'` prints)")
        out[user] = hashed.encode()
    return out


class BasicAuth:
    """Checks an ``Authorization: Basic`` header against bcrypt hashes."""

    CACHE_SIZE = 64

    def __init__(self, users: dict[str, bytes]):
        import bcrypt

        self._checkpw = bcrypt.checkpw
        self.users = users
        # An unknown user costs a bcrypt check like a known one, so timing does not tell which users exist.
        self._decoy = next(iter(users.values()))
        self._checked: dict[bytes, bool] = {}
        self._lock = threading.Lock()

    def allows(self, header: str | None) -> bool:
        if not header or header[:6].lower() != "basic ":
            return False
        try:
            user_bytes, sep, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
            user = user_bytes.decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        hashed = self.users.get(user)
        key = hashlib.sha256(b"".join(len(p).to_bytes(4, "big") + p for p in (user_bytes, hashed or b"", password)))
        with self._lock:  # one bcrypt check at a time: password guessing takes one core at most
            allowed = self._checked.get(key.digest())
            if allowed is None:
                try:
                    allowed = self._checkpw(password, hashed or self._decoy) and hashed is not None
                except ValueError:  # a password bcrypt cannot take (over 72 bytes, a NUL byte)
                    allowed = False
                if len(self._checked) >= self.CACHE_SIZE:
                    self._checked.clear()
                self._checked[key.digest()] = allowed
        return allowed


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every few seconds)."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection; TLS (when ``tls`` is set) is negotiated in that thread."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily, tls: ssl.SSLContext | None):
        self.address_family = family
        self.tls = tls
        super().__init__(address, _QuietHandler)

    def server_bind(self) -> None:
        if sys.platform == "linux":
            self.socket.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        super().server_bind()

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT)
        if self.tls is None:
            super().finish_request(request, client_address)
            return
        try:
            connection = self.tls.wrap_socket(request, server_side=True)
        except OSError as exc:  # ssl.SSLError, a timeout, a reset
            log.debug("metrics: TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            super().finish_request(connection, client_address)
        finally:
            connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away or timed out: nothing to report beyond a debug line."""
        log.debug("metrics: request from %s failed: %s", client_address[0], sys.exc_info()[1])


def start_metrics_server(listen: str, registry: CollectorRegistry, web: WebConfig | None = None) -> MetricsServer:
    """Serve ``registry`` on ``HOST:PORT`` (``[::]:9101`` for IPv6) from a daemon thread; returns the server
    (``server_address`` holds the port bound, ``shutdown()`` stops it). OSError when the address is unusable."""
    host, _, port = listen.rpartition(":")
    family, _, _, _, address = socket.getaddrinfo(
        host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    metrics_app = make_wsgi_app(registry)
    auth = BasicAuth(web.users) if web is not None and web.users else None
    if auth is not None and web is not None and web.tls is None:
        log.warning("metrics: basic auth over plain HTTP sends the password in clear; add tls_server_config")

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if auth is not None and not auth.allows(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("WWW-Authenticate", f'Basic realm="{REALM}"'),
                                                ("Content-Type", "text/plain; charset=utf-8")])
            return [b"Unauthorized\n"]
        return metrics_app(environ, start_response)

    server = MetricsServer(address[:2], family, web.tls if web is not None else None)
    server.set_app(app)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server

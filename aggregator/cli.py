"""``fl-aggregator``: serve rounds, manage device enrolment, show status (docs/aggregator.md)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import math
import os
import socket
import sqlite3
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from aggregator.adaptive_clip import AdaptiveClip, AdaptiveClipError
from aggregator.buffered import STALENESS_WEIGHTINGS, BufferConfigError, BufferPolicy, check_buffered_strategy
from aggregator.privacy import MODES, DPConfig, PrivacyError, check_mode, check_private_strategy
from aggregator.privacy_restart import check_restart
from aggregator.registry import EnrolmentError, Registry, enrolment_for_key, read_enrolment_file
from aggregator.rounds import (
    DEFAULT_MAX_SAMPLES,
    DEFAULT_STORE_TIMEOUT,
    MAX_SAMPLES_LIMIT,
    STATUS_ROUND_DEVICES,
    RoundPolicy,
    TrainingPlan,
)
from aggregator.secagg_round import SecAggConfig, SecAggConfigError, check_secure_strategy, recorded_round_status
from aggregator.statuspage import downlink_text
from aggregator.store import RoundRow, Store, StoreError
from aggregator.strategies import STRATEGIES, make_strategy, option_flags, options_from_flags
from aggregator.upstream import (
    UpstreamConfig,
    UpstreamError,
    check_site_strategy,
    check_upstream_url,
    parse_upstream_key,
)
from appliance import strict_json, wire
from appliance.broken_pipe import quiet_on_broken_pipe
from appliance.client import pinned_tls_context
from appliance.identity import IdentityError, read_key_file, write_key_file
from appliance.modelpkg import MAX_PACKAGE_BYTES
from appliance.protocol.downlink import DOWNLINK_ENCODINGS

KEY_FILE = "aggregator.key"
SERVE_LOCK_FILE = "serve.lock"  # held by the one serve process of a state (served_alone)
PUB_FILE = "aggregator.pub"
LISTEN_BACKLOG = 128  # aiohttp's default
# serve's exit status when its stop left writes behind on a disk that stopped answering (named in its log)
EXIT_WRITES_LEFT_BEHIND = 3


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


def _check_state_path(state: Path) -> None:
    """``--state`` must be a directory, or a path where one can be made: name the file in the way."""
    for path in (state, *state.parents):
        if os.path.lexists(path):
            if not path.is_dir():
                raise CliError(f"--state {state}: {path} is not a directory")
            return


def init_state(state_dir: Path) -> None:
    """Create a state directory and its aggregator key (mode 0600) unless they exist: ``keygen``, ``serve --init``.

    Only these create a key: a mistyped ``--state`` must not silently give the aggregator a new identity, which
    every device pinned to the old one would refuse."""
    _check_state_path(state_dir)
    path = state_dir / KEY_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            write_key_file(path, bytes(SigningKey.generate()), 0o600)
    except OSError as exc:
        raise CliError(f"{state_dir}: cannot create the aggregator state: {exc.strerror}") from None


def load_key(state_dir: Path) -> SigningKey:
    """The aggregator's Ed25519 key (``<state>/aggregator.key``); also writes the public key to
    ``<state>/aggregator.pub`` for devices to pin."""
    _check_state_path(state_dir)
    path = state_dir / KEY_FILE
    if not os.path.exists(path):
        where = f"holds no aggregator state (no {KEY_FILE})" if os.path.isdir(state_dir) else "does not exist"
        raise CliError(f"{state_dir} {where}: create it with `fl-aggregator keygen --state {state_dir}` "
                       "(or `serve --init`), or give the --state of an existing aggregator")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CliError(f"{path}: the aggregator key is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = SigningKey(read_key_file(path))
    except IdentityError as exc:
        raise CliError(str(exc)) from None
    pub = state_dir / PUB_FILE
    raw_pub = bytes(key.verify_key)
    try:
        current = read_key_file(pub) if pub.exists() else None
    except IdentityError:
        current = None
    if current != raw_pub:
        write_key_file(pub, raw_pub, 0o644)
    return key


def bind_listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``--listen``, bound before anything else starts, so that an address that does not
    resolve or a port in use is the first and only thing the user hears. One socket per address ``host``
    resolves to, as asyncio's ``create_server`` would make."""
    where = f"--listen {host}:{port}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CliError(f"{where}: cannot resolve {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise CliError(f"{where}: cannot listen: {reason}") from None
    return sockets


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _max_samples(text: str) -> int:
    """``--max-samples``: a whole number of samples that a signed update can carry (1 to 2^31 - 1)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_SAMPLES_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a whole number of samples from 1 to {MAX_SAMPLES_LIMIT}, "
                                         f"got {text!r}")
    return value


def _finite(text: str) -> float:
    """A number option that reaches the rounds, the tasks and /v1/status: inf or nan would be a deadline no timer
    can hold, a learning rate no device can train with, and a /v1/status that is not JSON."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# A synthetic model stands in for a model package, whose float32 parameters fit in MAX_PACKAGE_BYTES (no device
# fetches a larger one); past it, 2^63 and up, building the model died with a numpy ValueError traceback.
MAX_SYNTHETIC_PARAMETERS = MAX_PACKAGE_BYTES // 4


def _synthetic_parameters(text: str) -> int:
    """A synthetic model has two tensors of at least one parameter each, and no more than a package holds."""
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 parameters, got {text}")
    if value > MAX_SYNTHETIC_PARAMETERS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SYNTHETIC_PARAMETERS} parameters (the float32 "
                                         f"values a {MAX_PACKAGE_BYTES // 2**20} MiB model package holds), got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-aggregator", description="fl-edge federated learning aggregator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the aggregator's HTTP API and its rounds")
    serve.add_argument("--state", type=Path, required=True,
                       help="state directory (key, database, spool, models), made by `keygen` or --init")
    serve.add_argument("--init", action="store_true",
                       help="create the state directory and the aggregator key if they do not exist yet")
    serve.add_argument("--listen", type=_listen, default=("127.0.0.1", 8080), help="HOST:PORT (default 127.0.0.1:8080)")
    model = serve.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, help="signed model package (built with flctl)")
    model.add_argument(
        "--synthetic-parameters", type=_synthetic_parameters, metavar="P",
        help="serve a synthetic model of P float32 parameters instead (benchmarks and load tests)",
    )
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain (enables HTTPS)")
    serve.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    serve.add_argument("--strategy", choices=sorted(STRATEGIES), default="fedavg",
                       help="; ".join(f"{name}: {cls.summary}" for name, cls in STRATEGIES.items()))
    for flag, (kind, text) in option_flags().items():  # each rule declares its own options
        serve.add_argument(flag, type=_finite if kind is float else kind, dest=_option_dest(flag), help=text)
    serve.add_argument("--mode", choices=("sync", "async"), default="sync",
                       help="sync: rounds wait for their goal or deadline; async: buffered asynchronous aggregation "
                       "(FedBuff), a new version every --buffer K updates, stale updates weighted down")
    serve.add_argument("--buffer", type=int, metavar="K", help="--mode async: publish a new version every K updates")
    serve.add_argument("--max-staleness", type=int, metavar="S",
                       help="--mode async: refuse updates based on a model more than S versions old (default 10)")
    serve.add_argument("--staleness-weight", choices=STALENESS_WEIGHTINGS,
                       help="--mode async: scale a stale update's delta by 1 (constant) or (1 + staleness)^-0.5 "
                       "(polynomial, the default)")
    serve.add_argument("--min-clients", type=int, default=2, help="quorum: fewer updates abandon the round")
    serve.add_argument("--goal-clients", type=_non_negative_int, default=0,
                       help="close the round early at this many updates (0: all enrolled devices)")
    serve.add_argument("--round-timeout", type=_finite, default=600.0, help="seconds a round collects updates")
    serve.add_argument("--rounds", type=_non_negative_int, default=0,
                       help="stop publishing after this many model versions (keeps serving); 0: no limit")
    serve.add_argument("--max-update-norm", type=_finite,
                       help="refuse deltas with a larger L2 norm, at most 1e15 (default: 1.1 x --clip-norm when set, "
                       "else max(||params||, sqrt(P)) of the round's model)")
    serve.add_argument("--max-samples", type=_max_samples, default=DEFAULT_MAX_SAMPLES, metavar="N",
                       help="refuse (422 too-many-samples) an update that claims more than N samples, its weight in "
                       f"the average (default {DEFAULT_MAX_SAMPLES}: an agent's default frame buffer; raise it for "
                       "devices that train on more). A site enrolled with `enroll --site` forwards its devices' sum "
                       "and is exempt. With --secure-aggregation the count is masked and cannot be checked: N is the "
                       "roster's weight cap instead (devices weigh min(samples, N), at most 2^20), which a device "
                       "that does not follow the protocol can exceed")
    serve.add_argument("--update-window", type=_finite, default=3600.0,
                       help="refuse updates created more than this many seconds ago")
    serve.add_argument("--store-timeout", type=_finite, default=DEFAULT_STORE_TIMEOUT, metavar="SECONDS",
                       help="on a disk that stops answering: how long an upload waits for its write, and a round's "
                       "close for the uploads still being written, before they count nowhere and are answered 503 "
                       "(not acknowledged); past it new uploads are refused at once "
                       f"(default {DEFAULT_STORE_TIMEOUT:g})")
    serve.add_argument("--epochs", type=int, default=1)
    serve.add_argument("--batch-size", type=int, default=32)
    serve.add_argument("--lr", type=_finite, default=0.05, help="device learning rate")
    serve.add_argument("--prox-mu", type=_finite, default=0.0, help="FedProx proximal term on the devices")
    serve.add_argument("--encoding", choices=wire.ENCODINGS, default="float32", help="update tensor encoding")
    serve.add_argument("--downlink", choices=DOWNLINK_ENCODINGS, default="full",
                       help="publish each version rounded to a float16, int8 or sparse step, so a device that "
                       "holds one of the last 16 versions fetches steps, not the model (default full: exact)")
    serve.add_argument("--clip-norm", type=_finite, default=0.0, help="devices clip their delta to this L2 norm")
    serve.add_argument("--dp", choices=MODES, help="differential privacy of the published models: clip, weight every "
                       "device 1 and add Gaussian noise to the sum (central), or let each device add its share of "
                       "discrete Gaussian noise inside secure aggregation (distributed) (docs/privacy.md)")
    serve.add_argument("--dp-noise-multiplier", type=_finite, metavar="Z",
                       help="--dp: noise standard deviation as a multiple of --clip-norm")
    serve.add_argument("--dp-delta", type=_finite, default=1e-5, metavar="D",
                       help="--dp: the delta epsilon is reported at (default 1e-5; must be below 1/devices)")
    serve.add_argument("--dp-epsilon-budget", type=_finite, metavar="E",
                       help="--dp: open no round that would take epsilon past E (the last model stays published)")
    serve.add_argument("--dp-adaptive-clip", type=_finite, metavar="GAMMA",
                       help="--dp central: the clip norm follows the GAMMA quantile of the devices' update norms, "
                       "starting at --clip-norm (adaptive clipping, Andrew et al. 2021; docs/privacy.md)")
    serve.add_argument("--dp-clip-learning-rate", type=_finite, metavar="ETA",
                       help="--dp-adaptive-clip: each round C <- C exp(-ETA (fraction within C - GAMMA)) (default 0.2)")
    serve.add_argument("--dp-clip-count-stddev", type=_finite, metavar="SIGMA_B",
                       help="--dp-adaptive-clip: noise std on the count of devices within C (default 5 x Z: 1 %% of "
                       "the privacy; must exceed Z / 2)")
    serve.add_argument("--dp-reset", action="store_true",
                       help="without --dp, on a state served with --dp: stop differential privacy, retiring "
                       "<state>/privacy.json to privacy-retired-<time>.json; the models published from then on carry "
                       "no DP guarantee and --dp cannot resume on this state (docs/privacy.md)")
    serve.add_argument("--secure-aggregation", action="store_true",
                       help="every round is a secure-aggregation round: the aggregator learns only the sum of the "
                       "survivors' updates (docs/aggregator.md); needs --clip-norm and fedavg, fedadam or fedyogi")
    serve.add_argument("--secagg-threshold", type=_finite, metavar="FRACTION",
                       help="--secure-aggregation: shares needed to rebuild a device's secret, as more than this "
                       "fraction of its k+1 holders (default 0.5: a strict majority)")
    serve.add_argument("--secagg-neighbours", type=int, metavar="K",
                       help="--secure-aggregation: devices each one masks with (default 2 ceil(log2 n), SecAgg+; "
                       "0: every device, the original protocol)")
    serve.add_argument("--secagg-phase-timeout", type=_finite, metavar="SECONDS",
                       help="--secure-aggregation: how long the advertise, share and unmask phases wait, and each "
                       "write of a round's records on a stalled disk (default 30)")
    serve.add_argument("--workers", type=_non_negative_int,
                       help="verification threads (default, or 0: CPU count)")
    serve.add_argument("--upstream", metavar="URL",
                       help="site mode: follow this parent aggregator's rounds and forward one partial sum per round")
    serve.add_argument("--upstream-key", metavar="HEX_OR_FILE",
                       help="the parent aggregator's public key (hex, or a file such as its aggregator.pub)")
    serve.add_argument("--upstream-ca", metavar="PEM", help="with an https:// --upstream: the CA that signed the "
                       "parent's certificate, or that certificate, pinned (the system store is not used)")

    keygen = sub.add_parser("keygen", help="create the state directory and aggregator key if absent; "
                            "print its public key (hex)")
    keygen.add_argument("--state", type=Path, required=True)

    enroll = sub.add_parser("enroll", help="allow devices to send updates")
    enroll.add_argument("--state", type=Path, required=True)
    enroll.add_argument("public_keys", nargs="*", metavar="PUBKEY_HEX", help="device Ed25519 public keys (hex)")
    enroll.add_argument("--from", dest="from_file", type=Path,
                        help="JSON lines {device_id, public_key, name} as written by `flctl provision`")
    enroll.add_argument("--name", default="", help="name recorded with keys given on the command line")
    enroll.add_argument("--site", action="store_true",
                        help="the keys are site aggregators (serve --upstream) of this one: their updates carry the "
                        "sum of their devices' samples, so serve --max-samples does not apply to them")

    revoke = sub.add_parser("revoke", help="refuse all further updates from a device")
    revoke.add_argument("--state", type=Path, required=True)
    revoke.add_argument("device_id")

    status = sub.add_parser("status", help="rounds, model version and devices")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--state", type=Path, help="read the state directory directly")
    where.add_argument("--url", help="ask a running aggregator (GET /v1/status)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    return parser


def _option_dest(flag: str) -> str:
    return "strategy_option_" + flag.lstrip("-").replace("-", "_")


def _strategy_options(args: argparse.Namespace) -> dict[str, object]:
    """The chosen rule's constructor options, checked by building the rule once (before any state is touched)."""
    given = {flag: getattr(args, _option_dest(flag)) for flag in option_flags()}
    try:
        options = options_from_flags(args.strategy, given)
        make_strategy(args.strategy, **options)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return options


def _upstream(args: argparse.Namespace) -> UpstreamConfig | None:
    """Site mode's parent, checked before anything starts: URL, pinned key, a strategy that composes."""
    if args.upstream is None:
        if args.upstream_key is not None:
            raise CliError("--upstream-key goes with --upstream URL")
        return None
    if args.upstream_key is None:
        raise CliError("--upstream needs --upstream-key (the parent aggregator's public key, hex or file)")
    try:
        https = check_upstream_url(args.upstream) == "https"
    except UpstreamError as exc:
        raise CliError(str(exc)) from None
    if https and not args.upstream_ca:
        raise CliError("--upstream https://... needs --upstream-ca (the CA or certificate to pin for the parent)")
    if args.upstream_ca and not https:
        raise CliError("--upstream-ca goes with an https:// --upstream URL")
    if args.upstream_ca:
        try:
            pinned_tls_context(args.upstream_ca)
        except ssl.SSLError as exc:  # an OSError too: caught first
            raise CliError(f"--upstream-ca {args.upstream_ca}: no PEM certificate in it ({exc.reason})") from None
        except OSError as exc:
            raise CliError(f"--upstream-ca {args.upstream_ca}: {exc.strerror}") from None
    try:
        check_site_strategy(args.strategy, _strategy_options(args))
        return UpstreamConfig(url=args.upstream, key=parse_upstream_key(args.upstream_key),
                              ca_file=args.upstream_ca or "")
    except UpstreamError as exc:
        raise CliError(str(exc)) from None


def _privacy(args: argparse.Namespace) -> DPConfig | None:
    """The --dp settings, checked against the rule, the clip norm and site mode before anything starts."""
    dp_flags = (args.dp_noise_multiplier, args.dp_epsilon_budget)
    adaptive_flags = (args.dp_clip_learning_rate, args.dp_clip_count_stddev)
    if args.dp is None:
        if args.dp_adaptive_clip is not None:
            raise CliError("--dp-adaptive-clip goes with --dp central")
        if any(flag is not None for flag in dp_flags):
            raise CliError("--dp-noise-multiplier and --dp-epsilon-budget go with --dp central or --dp distributed")
    if args.dp_adaptive_clip is None and any(flag is not None for flag in adaptive_flags):
        raise CliError("--dp-clip-learning-rate and --dp-clip-count-stddev go with --dp-adaptive-clip GAMMA")
    if args.dp is None:
        return None
    if args.dp_noise_multiplier is None:
        raise CliError(f"--dp {args.dp} needs --dp-noise-multiplier Z (noise std = Z x --clip-norm)")
    try:
        adaptive = None
        if args.dp_adaptive_clip is not None:
            given = {"learning_rate": args.dp_clip_learning_rate, "count_stddev": args.dp_clip_count_stddev}
            adaptive = AdaptiveClip(args.dp_adaptive_clip, **{k: v for k, v in given.items() if v is not None})
        config = DPConfig(args.dp_noise_multiplier, args.dp_delta, args.dp_epsilon_budget, args.dp, adaptive)
        check_private_strategy(args.strategy, args.clip_norm, args.upstream is not None)
        check_mode(config, args.secure_aggregation)
    except (PrivacyError, AdaptiveClipError) as exc:
        raise CliError(str(exc)) from None
    return config


def _secure_aggregation(args: argparse.Namespace) -> SecAggConfig | None:
    """The --secure-aggregation settings, checked against the rule, the clip norm and --dp before anything starts."""
    given = {"threshold": args.secagg_threshold, "neighbours": args.secagg_neighbours,
             "phase_timeout": args.secagg_phase_timeout}
    if not args.secure_aggregation:
        if any(value is not None for value in given.values()):
            raise CliError("--secagg-threshold, --secagg-neighbours and --secagg-phase-timeout go with "
                           "--secure-aggregation")
        return None
    try:
        SecAggConfig(max_samples=args.max_samples)
    except SecAggConfigError as exc:
        raise CliError(f"--max-samples {args.max_samples} with --secure-aggregation: {exc}") from None
    try:
        config = SecAggConfig(max_samples=args.max_samples, **{k: v for k, v in given.items() if v is not None})
        check_secure_strategy(STRATEGIES[args.strategy], args.clip_norm, args.dp == "central")
    except SecAggConfigError as exc:
        raise CliError(str(exc)) from None
    return config


def _buffer(args: argparse.Namespace) -> BufferPolicy | None:
    """The --mode async settings, checked against the rule, secure aggregation and --dp before anything starts."""
    given = {"size": args.buffer, "max_staleness": args.max_staleness, "weighting": args.staleness_weight}
    if args.mode == "sync":
        if any(value is not None for value in given.values()):
            raise CliError("--buffer, --max-staleness and --staleness-weight go with --mode async")
        return None
    if args.buffer is None:
        raise CliError("--mode async needs --buffer K (a new model version every K updates)")
    if args.goal_clients:
        raise CliError("--goal-clients goes with --mode sync (in async mode a version is published every --buffer K "
                       "updates)")
    try:
        policy = BufferPolicy(**{k: v for k, v in given.items() if v is not None})
        check_buffered_strategy(args.strategy, args.secure_aggregation, args.dp is not None)
    except BufferConfigError as exc:
        raise CliError(str(exc)) from None
    return policy


def cmd_serve(args: argparse.Namespace) -> int:
    _strategy_options(args)
    _buffer(args)
    _privacy(args)
    _secure_aggregation(args)
    upstream = _upstream(args)
    host, port = args.listen
    sockets = bind_listen(host, port)
    try:
        return _serve_on(sockets, args, upstream)
    finally:
        for sock in sockets:
            sock.close()


def _serve_on(sockets: list[socket.socket], args: argparse.Namespace, upstream: UpstreamConfig | None) -> int:
    from aiohttp import web

    from aggregator.app import SERVER_OPTIONS, WRITES_LEFT_BEHIND, AggregatorConfig, make_app
    from aggregator.models import PackageError, load_package_file
    from aggregator.simulate import synthetic_package

    if args.init:
        init_state(args.state)
    key = load_key(args.state)
    _open_store(args.state).close()  # a damaged database is refused here, before the banner
    if args.model is not None:
        try:
            package = load_package_file(args.model, key.verify_key)
        except PackageError as exc:
            raise CliError(str(exc)) from None
    else:
        package = synthetic_package(args.synthetic_parameters)
    try:
        policy = RoundPolicy(
            min_clients=args.min_clients, goal_clients=args.goal_clients, round_timeout=args.round_timeout,
            max_rounds=args.rounds, update_window=args.update_window, max_update_norm=args.max_update_norm,
            max_samples=args.max_samples, store_timeout=args.store_timeout,
            buffer=_buffer(args),
        )
        plan = TrainingPlan(
            epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, prox_mu=args.prox_mu,
            encoding=args.encoding, clip_norm=args.clip_norm,
        )
        config = AggregatorConfig(
            state_dir=args.state, package=package, key=key, strategy=args.strategy,
            strategy_options=_strategy_options(args), policy=policy, plan=plan, workers=args.workers,
            upstream=upstream, privacy=_privacy(args), secure_aggregation=_secure_aggregation(args),
            downlink=args.downlink,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None
    ssl_context = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise CliError("--tls-cert and --tls-key go together")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise CliError(f"cannot load TLS certificate {args.tls_cert} / key {args.tls_key}: {exc}") from None
    with served_alone(args.state):
        try:  # the DP the published models promise; last, so that --dp-reset retires nothing for a start refused
            check_restart(args.state, _privacy(args), args.dp_reset, key.verify_key)
        except PrivacyError as exc:
            raise CliError(str(exc)) from None
        host, port = args.listen
        print(
            f"fl-aggregator {wire.key_id(key.verify_key)} serving {package.info.name} "
            f"({sum(s.size for s in package.info.param_specs)} parameters) on "
            f"{'https' if ssl_context else 'http'}://{host}:{port}",
            flush=True,
        )
        app = make_app(config)
        try:
            web.run_app(app, sock=sockets, ssl_context=ssl_context, print=None,
                        handle_signals=True, shutdown_timeout=5.0, access_log=None, **SERVER_OPTIONS)
        except (RuntimeError, StoreError, OSError) as exc:  # start-up refusals: a model another key signed...
            raise CliError(str(exc)) from None
        if app[WRITES_LEFT_BEHIND]:
            _exit_leaving_writes()
    return 0


def _exit_leaving_writes() -> None:
    """Exit now, with status EXIT_WRITES_LEFT_BEHIND: the stop left writes on a disk that stopped answering (named in
    the log), and the interpreter's exit would wait for their threads forever. Nothing they hold was acknowledged."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_WRITES_LEFT_BEHIND)


@contextlib.contextmanager
def served_alone(state_dir: Path) -> Iterator[None]:
    """Hold ``<state>/serve.lock`` while serving: a second ``serve`` on the same state (another port, a unit started
    twice, ``--dp-reset`` beside a running server) would write the same rounds, spool and privacy ledger as the
    first. The lock goes with the process however it ends, kill -9 included."""
    path = state_dir / SERVE_LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CliError(f"{path}: cannot open the state's lock: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CliError(f"{state_dir} is already served by another fl-aggregator serve (pid {holder}); stop it "
                           "first: two servers on one state would both write its rounds, spool and ledger") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def cmd_keygen(args: argparse.Namespace) -> int:
    init_state(args.state)
    print(bytes(load_key(args.state).verify_key).hex())
    return 0


def _open_store(state: Path) -> Store:
    _check_state_path(state)
    if not (state / "aggregator.db").exists() and not (state / KEY_FILE).exists():
        raise CliError(f"{state}: not an aggregator state directory (run `fl-aggregator keygen --state {state}`)")
    try:
        return Store(state)
    except StoreError as exc:
        raise CliError(str(exc)) from None


def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        enrolments = [enrolment_for_key(k, args.name, args.site) for k in args.public_keys]
        if args.from_file:
            enrolments += [dataclasses.replace(e, site=args.site) for e in read_enrolment_file(args.from_file)]
    except EnrolmentError as exc:
        raise CliError(str(exc)) from None
    if not enrolments:
        raise CliError("give device public keys (hex) or --from FILE")
    store = _open_store(args.state)
    try:
        results = Registry(store).enroll(enrolments)
    except EnrolmentError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    for enrolment, added in results:
        what = ("enrolled" if added else "already enrolled") + (" as a site" if enrolment.site else "")
        print(f"{enrolment.device_id} {what} {enrolment.name}".rstrip())
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    store = _open_store(args.state)
    try:
        changed = Registry(store).revoke(args.device_id)
    except EnrolmentError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    print(f"{args.device_id} {'revoked' if changed else 'was already revoked'}")
    return 0


def _status_from_state(state: Path) -> dict[str, object]:
    store = _open_store(state)
    secure = sqlite3.connect(store.db_path)  # the secure rounds' records (aggregator/secagg_round.py)
    try:
        latest = store.latest_model()
        open_row = store.open_round()
        devices = store.devices()
        sites = store.site_ids()
        forwards = store.site_last_updates()  # site -> (accepted at, round taken into, receipt)
        return {
            "model": {"version": latest[0] if latest else None, "digest": latest[1].hex() if latest else None},
            "current_round": None if open_row is None else {
                "round": open_row.round_id, "model_version": open_row.model_version, "deadline": open_row.deadline,
                "goal": open_row.goal, "accepted": store.count_round_devices(open_row.round_id),
            },
            "rounds": [_round_from_state(store, secure, r) for r in store.recent_rounds(20)],
            "devices": {
                "enrolled": sum(1 for d in devices if d.revoked_at is None),
                "revoked": sum(1 for d in devices if d.revoked_at is not None),
                "sites": sum(1 for d in devices if d.revoked_at is None and d.device_id in sites),
                "list": [{"device_id": d.device_id, "name": d.name, "revoked": d.revoked_at is not None,
                          "site": d.device_id in sites, **_last_forward(forwards.get(d.device_id))}
                         for d in devices],
            },
        }
    finally:
        secure.close()
        store.close()


def _round_from_state(store: Store, secure: sqlite3.Connection, r: RoundRow) -> dict[str, Any]:
    """A round as ``status --state`` shows it: its record and, as /v1/status does, its first lost and left-out
    devices and their totals (Store.round_device_lists), and ``secure``: its secure round's record, or None for a
    plain round (whose left-out devices are updates stored too late, not masked inputs)."""
    lists = store.round_device_lists(r.round_id, STATUS_ROUND_DEVICES)
    return {"round": r.round_id, "model_version": r.model_version, "status": r.status,
            "participants": r.participants, "samples": r.samples, "metrics": r.metrics, "note": r.note,
            "lost_devices": lists["lost_devices"], "lost_devices_total": lists["lost_devices_total"],
            "left_out_devices": lists["left_out_devices"], "left_out_devices_total": lists["left_out_devices_total"],
            "secure": recorded_round_status(secure, r.round_id, store.round_left_out_reasons(r.round_id))}


def _last_forward(forward: tuple[float, int, bytes] | None) -> dict[str, float | int | None]:
    """A site's newest accepted forward: when (Unix time) and the round it was taken into; None for a key that
    never forwarded (every device, and a site that has not yet)."""
    return {"last_forward": forward[0] if forward else None, "last_forward_round": forward[1] if forward else None}


def _forward_text(entry: dict[str, Any]) -> str:
    if entry.get("last_forward") is None:
        return "never forwarded"
    try:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(entry["last_forward"]))
    except (OverflowError, OSError, ValueError):  # past the calendar: a damaged record, said as it is
        when = f"at an unreadable time ({entry['last_forward']!r})"
    return f"last forward {when}, into round {entry['last_forward_round']}"


def _status_from_url(url: str) -> dict[str, object]:
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/v1/status", timeout=10) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise CliError(f"cannot read status from {url}: {exc}") from None


def cmd_status(args: argparse.Namespace) -> int:
    status = _status_from_state(args.state) if args.state else _status_from_url(args.url)
    if args.json:
        print(strict_json.dumps_as_found(status, indent=2))
        return 0
    model = status["model"]
    print(f"model version {model['version']}  digest {str(model['digest'])[:16]}...")
    current = status.get("current_round")
    if current:
        left = strict_json.found_number(current["deadline"]) - time.time()
        print(f"open round {current['round']} on version {current['model_version']}: "
              f"{current['accepted']}/{current['goal']} updates, closes in {max(0, left):.0f} s")
    else:
        print("no open round")
    if status.get("downlink"):  # --url only: the counters of the running process
        print(downlink_text(status["downlink"]))
    disk = status.get("disk") or {}  # --url only: the running process's oldest write under way
    if disk.get("stalled"):
        print(f"the disk has not answered for {strict_json.found_number(disk['oldest_write_seconds']):.0f} s "
              f"({disk['oldest_write']}): uploads are refused until it does")
    devices = status["devices"]
    count = devices.get("sites", 0)
    sites = f" ({count} site{'s' if count != 1 else ''})" if count else ""
    print(f"devices: {devices['enrolled']} enrolled{sites}, {devices['revoked']} revoked")
    for d in devices.get("list", []):  # --state only (GET /v1/status gives counts); the sites are few, devices many
        if d["site"]:
            name = f"{d['name']}  " if d["name"] else ""
            print(f"  site {d['device_id']}  {name}{_forward_text(d)}{'  revoked' if d['revoked'] else ''}")
    for r in status["rounds"]:
        metrics = " ".join(f"{k}={strict_json.found_number(v):.4g}" for k, v in r["metrics"].items())
        print(f"  round {r['round']:>5}  v{r['model_version']:<4} {r['status']:<10} "
              f"{r['participants']:>5} updates {r['samples']:>8} samples  {metrics} {r['note']}".rstrip())
        print(_lost_line(r), end="")
        print(_left_out_line(r), end="")
    return 0


def _lost_line(r: dict[str, Any]) -> str:
    """The line under a round that names its updates lost on disk, or nothing. /v1/status lists the first
    STATUS_ROUND_DEVICES of them beside ``lost_devices_total``; an aggregator older than the lost-updates table lists
    none, one older than the totals lists them all."""
    lost = r.get("lost_devices", [])
    total = r.get("lost_devices_total", len(lost))
    if not total:
        return ""
    more = (f" and {total - len(lost)} more (GET /v1/status/rounds/{r['round']}/lost_devices)"
            if total > len(lost) else "")
    return f"{'':21}{total} update{'s' if total != 1 else ''} lost on disk: {', '.join(lost)}{more}\n"


def _left_out_line(r: dict[str, Any]) -> str:
    """The line under a secure round that names the masked inputs its sum leaves out (under a plain round, the
    updates stored after its close stopped waiting for them; their devices are not among the round's devices), or
    nothing; an aggregator older than these lists lists none."""
    left_out = r.get("left_out_devices", [])
    total = r.get("left_out_devices_total", len(left_out))
    if not total:
        return ""
    reasons = (r.get("secure") or {}).get("left_out", {})
    why = f" ({', '.join(f'{count} {reason}' for reason, count in reasons.items())})" if reasons else ""
    more = (f" and {total - len(left_out)} more (GET /v1/status/rounds/{r['round']}/left_out_devices)"
            if total > len(left_out) else "")
    plain = "secure" in r and r["secure"] is None  # (an aggregator older than ``secure`` does not tell)
    what = "update{} stored too late to count" if plain else "masked input{} left out of the sum"
    return f"{'':21}{total} {what.format('s' if total != 1 else '')}{why}: {', '.join(left_out)}{more}\n"


COMMANDS = {"serve": cmd_serve, "keygen": cmd_keygen, "enroll": cmd_enroll, "revoke": cmd_revoke,
            "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    return quiet_on_broken_pipe(lambda: _run(argv))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"fl-aggregator: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`flctl provision`: a fleet's keys, per-board agent config and the aggregator's enrolment file.

The fleet directory (formats in docs/provisioning.md):
  fleet.json                      URL, aggregator public key and id, key-derivation parameters
  aggregator.pub                  the pinned aggregator public key (hex), as boards receive it
  aggregator.key.sealed           the aggregator's signing key, sealed with the fleet passphrase
  boards/<name>/device.key.sealed the board's Ed25519 seed, sealed
  boards/<name>/board.json        {"name", "device_id", "public_key"}
  boards/<name>/agent.toml        the board's agent.toml override ([aggregator] url)
  boards/<name>/timesyncd.conf    the board's NTP servers (with --ntp-server), for systemd-timesyncd
  enroll.jsonl                    one {"device_id", "public_key", "name"} per line, for `fl-aggregator enroll`
The aggregator's state directory (default FLEET/aggregator, `--aggregator-state`) receives the one plaintext
key, `aggregator.key`: the aggregator needs it unattended, like a board its device key.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nacl.signing import SigningKey, VerifyKey

from appliance import identity
from appliance.base_url import base_url_problem
from appliance.durable import atomic_write, sweep_interrupted_writes

from .sealed import KdfParams, Sealer, SealError, read_passphrase

FLEET_FORMAT = "flctl-fleet/1"
AGGREGATOR_KEY_NAME = "aggregator.key"  # in the aggregator's state dir: `fl-aggregator serve --state DIR`
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ProvisionError(Exception):
    """Fleet material cannot be created or read; the message names the file or argument."""


@dataclass(frozen=True)
class Board:
    name: str
    device_id: str
    public_key: str  # hex

    def enrolment(self) -> dict[str, str]:
        return {"device_id": self.device_id, "public_key": self.public_key, "name": self.name}


def _write_text(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write(path, text.encode(), mode)


def check_url(url: str) -> str:
    problem = base_url_problem(url)
    if problem:
        raise ProvisionError(f"aggregator URL {url!r} must look like http://HOST:PORT or https://HOST ({problem})")
    if any(c in url for c in "\"\\\n"):
        raise ProvisionError(f"aggregator URL {url!r} contains a quote, backslash or newline")
    return url.rstrip("/")


_PLAIN_HTTP = "allow_plain_http = true  # the aggregator URL is http://: no TLS (test rigs only)"
_PLAIN_HTTP_LINE = re.compile(r"^allow_plain_http\s*=.*\n?", re.MULTILINE)


def _plain(url: str) -> bool:
    return urlsplit(url).scheme == "http"


def agent_toml(url: str) -> str:
    """The per-board override of /etc/fl-agent/agent.toml: merged key by key by appliance.config. An http://
    URL comes with the explicit allow_plain_http the agent demands; https:// needs the image's ca_file."""
    return f'# Written by flctl provision; overrides /etc/fl-agent/agent.toml key by key.\n' \
           f'# Add per-board settings below; `flctl provision --aggregator-url` only rewrites the url line.\n' \
           f'[aggregator]\nurl = "{url}"\n' + (f"{_PLAIN_HTTP}\n" if _plain(url) else "")


_URL_LINE = re.compile(r'^(\[aggregator\][^\[]*?^url\s*=\s*)"[^"\n]*"', re.MULTILINE | re.DOTALL)


def with_url(text: str, url: str) -> str:
    """`text` (a board's agent.toml) with [aggregator] url set to `url`, other settings kept."""
    new, count = _URL_LINE.subn(lambda m: f'{m.group(1)}"{url}"', text, count=1)
    if not count:
        if re.search(r"^\[aggregator\]", text, re.MULTILINE):
            new = re.sub(r"^\[aggregator\]\s*$", f'[aggregator]\nurl = "{url}"', text, count=1, flags=re.MULTILINE)
        else:
            new = f'[aggregator]\nurl = "{url}"\n' + text
    new = _PLAIN_HTTP_LINE.sub("", new)  # it follows the scheme: http:// gets it back right after the url
    if _plain(url):
        new = re.sub(r'^(\[aggregator\][^\[]*?^url\s*=\s*"[^"\n]*"\n)', lambda m: f"{m.group(1)}{_PLAIN_HTTP}\n", new,
                     count=1, flags=re.MULTILINE | re.DOTALL)
    return new


_NTP_SERVER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")
_NTP_LINE = re.compile(r"^NTP=.*$", re.MULTILINE)


def check_ntp_server(host: str) -> str:
    if not _NTP_SERVER.match(host):
        raise ProvisionError(f"NTP server {host!r}: expected a host name or an IP address")
    return host


def timesyncd_conf(servers: list[str]) -> str:
    """A board's systemd-timesyncd drop-in: `flctl flash` writes it to /data/timesyncd.conf, which the image
    links into /run/systemd/timesyncd.conf.d (the root is read-only)."""
    return "# Written by flctl provision: this board's NTP servers (systemd-timesyncd, timesyncd.conf(5)).\n" \
           "# `flctl provision --ntp-server` only rewrites the NTP= line; other settings below it are kept.\n" \
           f"[Time]\nNTP={' '.join(servers)}\n"


def with_ntp_servers(text: str, servers: list[str]) -> str:
    """`text` (a board's timesyncd.conf) with its NTP= line set to `servers`, other settings kept."""
    line = f"NTP={' '.join(servers)}"
    new, count = _NTP_LINE.subn(line, text, count=1)
    return new if count else timesyncd_conf(servers) + text


class Fleet:
    """A fleet directory opened with its passphrase."""

    def __init__(self, root: Path, sealer: Sealer) -> None:
        self.root = Path(root)
        self.sealer = sealer
        meta_path = self.root / "fleet.json"
        try:
            self.meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise ProvisionError(f"{self.root} is not a fleet directory (no fleet.json); "
                                 f"create it with `flctl provision --fleet {self.root} ...`") from None
        except ValueError as exc:
            raise ProvisionError(f"{meta_path}: not JSON ({exc})") from None
        if not isinstance(self.meta, dict):
            raise ProvisionError(f"{meta_path}: not a JSON object")
        if self.meta.get("format") != FLEET_FORMAT:
            raise ProvisionError(f"{meta_path}: format {self.meta.get('format')!r}, expected {FLEET_FORMAT}")
        self.kdf = KdfParams.from_json(self.meta["kdf"], str(meta_path))

    # -- creation ------------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, root: Path, sealer: Sealer, url: str | None,
                       aggregator_state: Path | None, ntp_servers: list[str] | None = None) -> Fleet:
        """Open the fleet, creating it (and the aggregator key, unless its state dir has one) if absent.
        ``ntp_servers``, when given, replace the fleet's NTP servers."""
        root = Path(root)
        if not (root / "fleet.json").exists():
            if url is None:
                raise ProvisionError(f"{root} is a new fleet: --aggregator-url is required")
            root.mkdir(parents=True, exist_ok=True)
            os.chmod(root, 0o700)
            kdf = KdfParams.new()
            state = aggregator_state or root / "aggregator"
            existing = state / AGGREGATOR_KEY_NAME
            # When the aggregator made its own key first, the fleet adopts it.
            agg = SigningKey(identity.read_key_file(existing)) if existing.exists() else SigningKey.generate()
            sealer.seal(bytes(agg), kdf, root / "aggregator.key.sealed")
            meta = {"format": FLEET_FORMAT, "aggregator_url": check_url(url),
                    "aggregator_public_key": bytes(agg.verify_key).hex(),
                    "aggregator_id": identity.device_id_for(agg.verify_key), "kdf": kdf.to_json()}
            _write_text(root / "fleet.json", json.dumps(meta, indent=1) + "\n")
        fleet = cls(root, sealer)
        fleet.aggregator_key()  # proves the passphrase before anything else is written
        changed = False
        if url is not None and check_url(url) != fleet.url:
            fleet.meta["aggregator_url"] = check_url(url)
            changed = True
        if ntp_servers is not None and [check_ntp_server(h) for h in ntp_servers] != fleet.ntp_servers:
            fleet.meta["ntp_servers"] = list(ntp_servers)
            changed = True
        if changed:
            _write_text(root / "fleet.json", json.dumps(fleet.meta, indent=1) + "\n")
        return fleet

    # -- reading -------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return str(self.meta["aggregator_url"])

    @property
    def ntp_servers(self) -> list[str]:
        """The NTP servers boards are given (none: timesyncd uses what DHCP announces, else its fallback)."""
        return [str(h) for h in self.meta.get("ntp_servers", [])]

    @property
    def aggregator_public_key(self) -> VerifyKey:
        return VerifyKey(bytes.fromhex(self.meta["aggregator_public_key"]))

    def aggregator_key(self) -> SigningKey:
        key = SigningKey(self.sealer.open(self.root / "aggregator.key.sealed"))
        if bytes(key.verify_key) != bytes(self.aggregator_public_key):
            raise ProvisionError(f"{self.root}: aggregator.key.sealed does not match fleet.json's public key")
        return key

    def board_dir(self, name: str) -> Path:
        return self.root / "boards" / name

    def board(self, name: str) -> Board:
        path = self.board_dir(name) / "board.json"
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            known = ", ".join(self.board_names()) or "none"
            raise ProvisionError(f"board {name!r} is not in fleet {self.root} (boards: {known}); "
                                 f"add it with `flctl provision --fleet {self.root} --names {name}`") from None
        except ValueError as exc:  # empty, cut short, not UTF-8
            raise ProvisionError(f"{path}: not JSON ({exc})") from None
        missing = [k for k in ("name", "device_id", "public_key") if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise ProvisionError(f"{path}: not a board record (no {', '.join(missing)})")
        return Board(obj["name"], obj["device_id"], obj["public_key"])

    def board_names(self) -> list[str]:
        base = self.root / "boards"
        return sorted(p.name for p in base.iterdir() if (p / "board.json").exists()) if base.is_dir() else []

    def device_key(self, name: str) -> SigningKey:
        """The board's signing key, checked against its recorded public key."""
        board = self.board(name)
        key = SigningKey(self.sealer.open(self.board_dir(name) / "device.key.sealed"))
        if bytes(key.verify_key).hex() != board.public_key:
            raise ProvisionError(f"{self.board_dir(name)}: device.key.sealed does not match board.json")
        return key

    # -- writing -------------------------------------------------------------------------------------
    def add_board(self, name: str) -> tuple[Board, bool]:
        """Create the board's key and files unless it exists; return it and whether it is new."""
        if not NAME_RE.match(name):
            raise ProvisionError(f"board name {name!r}: use 1-63 of a-z 0-9 . _ - (starting with a letter "
                                 f"or digit)")
        d = self.board_dir(name)
        if (d / "board.json").exists():
            self.device_key(name)  # the sealed key must still open and match
            new = False
        else:
            d.mkdir(parents=True, exist_ok=True)
            key = SigningKey.generate()
            self.sealer.seal(bytes(key), self.kdf, d / "device.key.sealed")
            board = Board(name, identity.device_id_for(key.verify_key), bytes(key.verify_key).hex())
            _write_text(d / "board.json", json.dumps(board.enrolment(), indent=1) + "\n")
            _write_text(d / "agent.toml", agent_toml(self.url))
            if self.ntp_servers:
                _write_text(d / "timesyncd.conf", timesyncd_conf(self.ntp_servers))
            new = True
        return self.board(name), new

    def board_agent_toml(self, name: str) -> Path:
        return self.board_dir(name) / "agent.toml"

    def board_timesyncd_conf(self, name: str) -> Path:
        return self.board_dir(name) / "timesyncd.conf"

    def follow_url(self) -> None:
        """Point every board's agent.toml at the fleet URL, keeping the rest of each file."""
        for name in self.board_names():
            path = self.board_agent_toml(name)
            text = path.read_text() if path.exists() else agent_toml(self.url)
            updated = with_url(text, self.url)
            if not path.exists() or updated != text:
                _write_text(path, updated)

    def follow_ntp_servers(self) -> None:
        """Give every board the fleet's NTP servers (the NTP= line of its timesyncd.conf; the rest is kept)."""
        servers = self.ntp_servers
        if not servers:
            return
        for name in self.board_names():
            path = self.board_timesyncd_conf(name)
            text = path.read_text() if path.exists() else ""
            updated = with_ntp_servers(text, servers)
            if updated != text:
                _write_text(path, updated)

    def write_public_files(self) -> Path:
        """aggregator.pub and enroll.jsonl (all boards, sorted by name)."""
        _write_text(self.root / "aggregator.pub", bytes(self.aggregator_public_key).hex() + "\n")
        lines = [json.dumps(self.board(n).enrolment(), sort_keys=True) + "\n" for n in self.board_names()]
        path = self.root / "enroll.jsonl"
        _write_text(path, "".join(lines))
        return path

    def export_aggregator_key(self, state_dir: Path) -> Path:
        """Write the plaintext aggregator key into the aggregator's own state dir (0600)."""
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = state_dir / AGGREGATOR_KEY_NAME
        key = self.aggregator_key()
        if path.exists():
            if identity.read_key_file(path) != bytes(key):
                raise ProvisionError(f"{path} holds a different aggregator key than fleet {self.root}; "
                                     f"move it away or use another --aggregator-state")
            return path
        identity.write_key_file(path, bytes(key), 0o600)
        return path


def board_names(boards: int | None, names: str | None) -> list[str]:
    if names:
        result = [n.strip() for n in names.split(",") if n.strip()]
        if len(set(result)) != len(result):
            raise ProvisionError(f"--names lists a board twice: {names}")
        return result
    if boards is not None:
        if boards < 0 or boards > 100000:
            raise ProvisionError(f"--boards {boards}: expected 0 to 100000")
        return [f"board-{i:03d}" for i in range(1, boards + 1)]
    return []


def open_fleet(fleet_dir: str | Path, passphrase_file: str | None) -> Fleet:
    """Open an existing fleet (for `flctl flash`)."""
    root = Path(fleet_dir)
    if not (root / "fleet.json").exists():
        raise ProvisionError(f"{root} is not a fleet directory (no fleet.json)")
    return Fleet(root, Sealer(read_passphrase(passphrase_file, confirm=False)))


def run(args: argparse.Namespace) -> int:
    try:
        root = Path(args.fleet)
        new_fleet = not (root / "fleet.json").exists()
        names = board_names(args.boards, args.names)
        ntp_servers = [check_ntp_server(h) for h in args.ntp_server] if args.ntp_server else None
        sealer = Sealer(read_passphrase(args.passphrase_file, confirm=new_fleet))
        state = Path(args.aggregator_state) if args.aggregator_state else root / "aggregator"
        fleet = Fleet.create_or_open(root, sealer, args.aggregator_url, state, ntp_servers)
        swept = sweep_interrupted_writes(root, *(fleet.board_dir(name) for name in fleet.board_names()))
        if swept:  # a run killed while it wrote; a run under way beside this one keeps its own
            print(f"flctl provision: {root}: {swept.describe()}", file=sys.stderr)
        added = 0
        for name in names:
            _board, new = fleet.add_board(name)
            added += new
        fleet.follow_url()  # the URL may have changed: every board's config follows it
        fleet.follow_ntp_servers()
        enroll = fleet.write_public_files()
        key_path = fleet.export_aggregator_key(state)
    except (ProvisionError, SealError, identity.IdentityError) as exc:
        print(f"flctl provision: {exc}", file=sys.stderr)
        return 1
    total = len(fleet.board_names())
    print(f"fleet {root}: {'created, ' if new_fleet else ''}{added} new board(s), {total} in all")
    print(f"  aggregator id {fleet.meta['aggregator_id']}, url {fleet.url}")
    ntp = " ".join(fleet.ntp_servers) or "none set (DHCP's, else timesyncd's fallback)"
    print(f"  NTP servers: {ntp}")
    print(f"  aggregator key: {key_path}  (fl-aggregator serve --state {state})")
    print(f"  enrolment file: {enroll}  (fl-aggregator enroll --state {state} --from {enroll})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    p = sub.add_parser("provision", help="create a fleet's keys, per-board config and enrolment file",
                       description="Create or extend a fleet: the aggregator key (if absent), one sealed "
                                   "device key and agent.toml per board, and enroll.jsonl for "
                                   "`fl-aggregator enroll`. Re-running adds boards and keeps existing keys.")
    p.add_argument("--fleet", required=True, metavar="DIR", help="fleet directory (created if absent)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--boards", type=int, metavar="N", help="ensure boards board-001..board-N exist")
    group.add_argument("--names", metavar="A,B,...", help="ensure these boards exist")
    p.add_argument("--aggregator-url", metavar="URL", help="the URL boards reach the aggregator at "
                   "(required for a new fleet; changing it rewrites every board's agent.toml)")
    p.add_argument("--aggregator-state", metavar="DIR", help="the aggregator's state dir that receives "
                   "aggregator.key (default: FLEET/aggregator)")
    p.add_argument("--ntp-server", action="append", metavar="HOST", help="an NTP server the boards can reach, "
                   "e.g. the aggregator's host (repeat for more; replaces the fleet's list and every board's "
                   "NTP= line). Boards without a real-time clock need one to set their clock")
    p.add_argument("--passphrase-file", metavar="FILE", help="file holding the fleet passphrase "
                   "(default: $FLCTL_PASSPHRASE, else asked)")
    p.set_defaults(func=run)
    return p

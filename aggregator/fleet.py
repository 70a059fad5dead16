"""The fleet view: each device's latest Heartbeat (docs/protocol.md section 13), its state, and a paged listing.

States, judged when asked (``now``, the newest model version):

- **silent**: no heartbeat for more than :data:`SILENT_AFTER_SECONDS` (or none ever); else **active**;
- an active device is also **behind** when it holds a model more than :data:`BEHIND_VERSIONS` versions older than
  the newest (a device that holds none counts as holding version 0), and **throttled** when the budget bites: cpu.max
  throttled it for at least :data:`THROTTLED_CPU_PERMILLE` thousandths of the time, its memory use is at least
  :data:`THROTTLED_MEMORY_SHARE` of its limit, or its last training was killed for memory and retried smaller.

A site aggregator's key (``fl-aggregator enroll --site``, a site of a site -> city tree) sends no heartbeat: it is
alive when it forwards its devices' partial sum, once per round of this aggregator. So a site is judged by its newest
accepted forward (a :class:`Forward`, read from the store's accepted updates), never by heartbeats, and has states of
its own: **site_active** with a forward within :attr:`Fleet.site_silent_after` seconds, else **site_silent** (health
``never forwarded`` when it has none). Sites are left out of the device states, so an alert on silent devices
means silent cameras.

Bounded: one entry per device whose enrolled key signed a heartbeat (so at most the enrolled devices), of fixed
fields with bounded values (the decoder's ranges); a new report overwrites the device's entry. A device may report
once per :data:`MIN_REPORT_INTERVAL_SECONDS` (else ``too-frequent``, 429); a report must be fresh (``sent_at`` in
the aggregator's window, else ``expired``) and newer than the one held (else ``stale-report``), so a captured report
cannot be replayed to make a dead device look alive. A ``stale-report`` refusal names the held report's ``sent_at``
(``held_sent_at``): a board without a real-time clock restarted mid-round stamps in the aggregator's time as its last
task taught it, behind by the round's age, so behind the report it sent before the restart; it stamps its next after
that one (appliance/heartbeat_stamps.py). That tells the sender nothing a captured report does not say.

The aggregator's clock may be stepped back (corrected after running ahead, or set at last on a board that came up with
a wrong one): an entry that arrived more than :data:`REPORT_MAX_AHEAD_SECONDS` after the clock's ``now`` says nothing
of how long ago its device reported. Such an entry counts as silent, and neither blocks the device's next report as
``stale-report`` nor rate-limits it with a Retry-After of the length of the step; the device's next heartbeat, in the
aggregator's new time, replaces it.

Durable without an fsync per report: reports are taken in memory and written every :data:`FLUSH_SECONDS` in one
transaction to ``device_reports`` in ``aggregator.db`` over a connection of its own with ``synchronous=NORMAL``
(WAL): a kill -9 loses at most the last interval's reports, a power cut at most what was committed since the last
WAL sync; either way each device's next heartbeat restores its entry. Nothing else waits for these writes.
"""

from __future__ import annotations

import heapq
import json
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from nacl.signing import VerifyKey

from aggregator.stored_reports import read_reports
from appliance import wire
from appliance.errors import ProtocolError
from appliance.protocol.heartbeat import Heartbeat

SILENT_AFTER_SECONDS = 3600.0
BEHIND_VERSIONS = 2
THROTTLED_CPU_PERMILLE = 200
THROTTLED_MEMORY_SHARE = 0.9
MIN_REPORT_INTERVAL_SECONDS = 30.0
REPORT_MAX_AGE_SECONDS = 3600.0  # sent_at at most this old by the aggregator's clock ...
REPORT_MAX_AHEAD_SECONDS = 300.0  # ... and at most this far ahead of it
FLUSH_SECONDS = 10.0
ROSTER_SECONDS = 5.0  # how long a read of the enrolled devices serves listings and metrics

SITE_SILENT_ROUNDS = 2  # a site is site_silent after this many round timeouts without a forward (at least an hour)

DEVICE_STATES = ("active", "silent", "behind", "throttled")
SITE_STATES = ("site_active", "site_silent")
STATES = (*DEVICE_STATES, *SITE_STATES)  # the metric's label values; a listing's filters add "all"
FILTERS = ("all", *STATES)
SORT_KEYS = ("device", "name", "last_seen", "last_round", "model_version", "agent_version", "outbox", "health")
MAX_PER_PAGE = 500
HEAP_SHARE = 1 / 16  # a listing selects its page with a heap up to this share of the devices (sorted_page)

SCHEMA = """
CREATE TABLE IF NOT EXISTS device_reports (
    device_id TEXT PRIMARY KEY,
    last_seen REAL NOT NULL,
    report    TEXT NOT NULL
);
"""


class ReportRefused(Exception):
    """A heartbeat that verified but is not taken: HTTP ``status``, a stable ``reason``, a ``detail`` for people;
    ``held_sent_at`` (``stale-report`` only) the ``sent_at`` of the report held, which the device stamps its next
    after (a board without a real-time clock restarted mid-round cannot know it otherwise)."""

    def __init__(self, status: int, reason: str, detail: str, retry_after: int | None = None,
                 held_sent_at: int | None = None):
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after
        self.held_sent_at = held_sent_at


@dataclass(frozen=True)
class Entry:
    """The latest report of one device and when it arrived (aggregator clock)."""

    report: Heartbeat
    last_seen: float


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    name: str
    site: bool = False  # a site aggregator's key (``fl-aggregator enroll --site``), not a device's


@dataclass(frozen=True)
class Forward:
    """A site's newest accepted forward (an update signed by its key) at this aggregator."""

    accepted_at: float  # aggregator clock
    round_id: int  # the round it answered (named in its receipt)
    model_version: int | None  # the version it was based on: that round's (None if the round is not recorded)


class ReceiptRounds:
    """The round each site's newest receipt names, its signature checked once per receipt.

    The fleet views read each site's newest forward at every listing, count and scrape, and its receipt (signed with
    ``key``, this aggregator's) names the round the site answered. A receipt stays the same until the site forwards
    again, so its answer is kept with its bytes, one per site: the same bytes are not verified again (an Ed25519
    check, about 0.1 ms), and different bytes (a new forward, or a receipt changed on disk) are.
    """

    def __init__(self, key: VerifyKey):
        self._key = key
        self._held: dict[str, tuple[bytes, int | None]] = {}

    def answered(self, site: str, receipt: bytes) -> int | None:
        """The round ``receipt`` names, or None when it does not verify (the aggregator's key changed since)."""
        held = self._held.get(site)
        if held is not None and held[0] == receipt:
            return held[1]
        try:
            round_id: int | None = wire.decode_receipt(receipt, self._key).round_id
        except ProtocolError:
            round_id = None
        self._held[site] = (receipt, round_id)
        return round_id


def seen_after(seen: float, now: float) -> bool:
    """Whether ``seen`` lies more than REPORT_MAX_AHEAD_SECONDS after ``now``: the aggregator's clock was stepped
    back since (see the module docstring)."""
    return seen > now + REPORT_MAX_AHEAD_SECONDS


def is_silent(seen: float, now: float, after: float = SILENT_AFTER_SECONDS) -> bool:
    """Last heard of at ``seen`` (aggregator clock): silent when that is more than ``after`` seconds before ``now``,
    or unknowably long ago (:func:`seen_after`)."""
    return now - seen > after or seen_after(seen, now)


def is_behind(report: Heartbeat, newest: int) -> bool:
    return newest - (report.model_version or 0) > BEHIND_VERSIONS


def is_throttled(report: Heartbeat) -> bool:
    memory_bites = report.memory_max > 0 and report.memory >= THROTTLED_MEMORY_SHARE * report.memory_max
    return report.cpu_throttled >= THROTTLED_CPU_PERMILLE or memory_bites or report.oom_retries > 0


class Fleet:
    """The latest heartbeat per device, in memory and in ``device_reports`` of ``db_path``.

    ``enrolled`` lists the enrolled, unrevoked devices (read at most every :data:`ROSTER_SECONDS`); listings and
    counts cover exactly those, so a device that never reported is listed as silent. ``forwards`` gives each site's
    newest accepted forward by key (read at each listing and count while the roster holds a site, so a forward shows
    at once); ``round_timeout`` is this aggregator's, which sets how long a site may go without forwarding.
    """

    def __init__(self, db_path: Path, enrolled: Callable[[], list[Enrolled]],
                 forwards: Callable[[], dict[str, Forward]] = dict, round_timeout: float = 0.0):
        self._enrolled = enrolled
        self._forwards = forwards
        self.site_silent_after = max(SILENT_AFTER_SECONDS, SITE_SILENT_ROUNDS * round_timeout)
        self._conn = sqlite3.connect(db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")  # as the store's (it is the same file in the aggregator)
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(SCHEMA)
        self._dirty: set[str] = set()
        self._write_lock = threading.Lock()
        self._roster: tuple[float, list[Enrolled]] = (-math.inf, [])
        stored = read_reports(self._conn.execute("SELECT device_id, last_seen, report FROM device_reports"))
        self._entries: dict[str, Entry] = {device: Entry(*held) for device, held in stored.items()}

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, device_id: str) -> Entry | None:
        return self._entries.get(device_id)

    # ------------------------------------------------------------------------------------------ reports

    def accept(self, report: Heartbeat, now: float) -> None:
        """Take a verified report as the device's latest, or refuse it (:class:`ReportRefused`)."""
        if report.sent_at < now - REPORT_MAX_AGE_SECONDS or report.sent_at > now + REPORT_MAX_AHEAD_SECONDS:
            raise ReportRefused(422, "expired", f"sent_at {report.sent_at} is outside the window "
                                                f"[-{REPORT_MAX_AGE_SECONDS:.0f} s, +{REPORT_MAX_AHEAD_SECONDS:.0f} s] "
                                                f"around the aggregator's time {now:.0f}")
        held = self._entries.get(report.device_id)
        if held is not None and not seen_after(held.last_seen, now):
            if report.sent_at <= held.report.sent_at:
                raise ReportRefused(409, "stale-report", f"sent_at {report.sent_at} is not after that of the "
                                                         f"report held ({held.report.sent_at})",
                                    held_sent_at=held.report.sent_at)
            wait = held.last_seen + MIN_REPORT_INTERVAL_SECONDS - now
            if wait > 0:
                raise ReportRefused(429, "too-frequent", f"one heartbeat per {MIN_REPORT_INTERVAL_SECONDS:.0f} s per "
                                                         f"device; the last arrived {now - held.last_seen:.0f} s ago",
                                    retry_after=math.ceil(wait))
        self._entries[report.device_id] = Entry(report, now)
        self._dirty.add(report.device_id)

    def take_dirty(self) -> list[tuple[str, Entry]]:
        """The entries to write (event loop, cheap): each device that reported since the last call, once."""
        rows = [(d, e) for d in self._dirty if (e := self._entries.get(d)) is not None]
        self._dirty.clear()
        return rows

    def mark_dirty(self, devices: Iterable[str]) -> None:
        """Write these devices' entries again at the next flush (after a write failed)."""
        self._dirty.update(devices)

    def write(self, rows: Iterable[tuple[str, Entry]]) -> None:
        """Write entries from :meth:`take_dirty` in one transaction (worker thread; no fsync with WAL + NORMAL)."""
        encoded = [(device, e.last_seen, _report_json(e.report)) for device, e in rows]
        with self._write_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    "INSERT OR REPLACE INTO device_reports (device_id, last_seen, report) VALUES (?, ?, ?)", encoded
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._write_lock:
            self._conn.close()

    # ------------------------------------------------------------------------------------------ views

    def roster(self, now: float) -> list[Enrolled]:
        at, devices = self._roster
        if now - at > ROSTER_SECONDS or now < at:
            devices = self._enrolled()
            self._roster = (now, devices)
        return devices

    def site_forwards(self, roster: list[Enrolled]) -> dict[str, Forward]:
        """The newest forward of each site that forwarded (no read when ``roster`` holds no site)."""
        return self._forwards() if any(d.site for d in roster) else {}

    def counts(self, newest: int, now: float) -> dict[str, int]:
        """Enrolled keys by state: ``active + silent + site_active + site_silent == enrolled``; behind and throttled
        are active devices."""
        roster = self.roster(now)
        return self._counts(roster, self.site_forwards(roster), newest, now)

    def _counts(self, roster: list[Enrolled], forwards: dict[str, Forward], newest: int, now: float) -> dict[str, int]:
        counts = dict.fromkeys(STATES, 0)
        for device in roster:
            if device.site:
                counts[self._site_state(forwards.get(device.device_id), now)] += 1
                continue
            e = self._entries.get(device.device_id)
            if e is None or is_silent(e.last_seen, now):
                counts["silent"] += 1
                continue
            counts["active"] += 1
            counts["behind"] += is_behind(e.report, newest)
            counts["throttled"] += is_throttled(e.report)
        return {"enrolled": len(roster), **counts}

    def _site_state(self, forward: Forward | None, now: float) -> str:
        silent = forward is None or is_silent(forward.accepted_at, now, self.site_silent_after)
        return "site_silent" if silent else "site_active"

    def listing(self, newest: int, now: float, *, state: str = "all", sort: str = "last_seen", page: int = 1,
                per_page: int = 50) -> dict[str, Any]:
        """One page of the enrolled devices in ``state``, ordered by ``sort`` (a key of :data:`SORT_KEYS`,
        descending with a leading ``-``). Filtering works on the entries, and only the page is put in order
        (:func:`sorted_page`) and built into rows."""
        descending = sort.startswith("-")
        key = sort.lstrip("-")
        if state not in FILTERS or key not in SORT_KEYS or page < 1 or not 1 <= per_page <= MAX_PER_PAGE:
            raise ValueError(f"state {state!r}, sort {sort!r}, page {page}, per_page {per_page}")
        roster = self.roster(now)
        forwards = self.site_forwards(roster)
        items = [self._item(d, forwards, newest, now) for d in roster]
        counts = _tally(items)
        if state in ("active", "silent", *SITE_STATES):
            items = [i for i in items if i.state == state]
        elif state != "all":
            items = [i for i in items if state in i.health]  # behind, throttled: a site's health has neither
        start = (page - 1) * per_page
        shown = sorted_page(items, _SORTS[key], descending, start, per_page)
        return {
            "now": now, "model_version": newest, "counts": counts,
            "thresholds": {"silent_seconds": SILENT_AFTER_SECONDS, "behind_versions": BEHIND_VERSIONS,
                           "throttled_cpu_permille": THROTTLED_CPU_PERMILLE,
                           "throttled_memory_share": THROTTLED_MEMORY_SHARE,
                           "site_silent_seconds": self.site_silent_after},
            "state": state, "sort": sort, "page": page, "per_page": per_page, "total": len(items),
            "pages": max(1, math.ceil(len(items) / per_page)),
            "devices": [_row(i, newest) for i in shown],
        }  # fmt: skip

    def _item(self, device: Enrolled, forwards: dict[str, Forward], newest: int, now: float) -> _Item:
        if device.site:
            forward = forwards.get(device.device_id)
            state = self._site_state(forward, now)
            health = "never forwarded" if forward is None else "ok" if state == "site_active" else "silent"
            return _Item(device, None, forward, health, state)
        entry = self._entries.get(device.device_id)
        health = _health(entry, newest, now)
        return _Item(device, entry, None, health, "silent" if health == "silent" else "active")


def _tally(items: list[_Item]) -> dict[str, int]:
    """:meth:`Fleet.counts` from a listing's items, which hold each key's state and health already (judging every
    device again cost a listing a tenth to a fifth of its time). Only an active device's health names behind or
    throttled, as for the listing's filters."""
    counts = dict.fromkeys(STATES, 0)
    for item in items:
        counts[item.state] += 1
        counts["behind"] += "behind" in item.health
        counts["throttled"] += "throttled" in item.health
    return {"enrolled": len(items), **counts}


def sorted_page(items: list[_Item], key: Callable[[_Item], tuple], descending: bool, start: int,
                count: int) -> list[_Item]:
    """``sorted(items, key=key, reverse=descending)[start:start + count]`` without sorting every item.

    A listing shows one page of thousands of devices, mostly the first (the status page) or the last. A heap
    selects the ``start + count`` first, or for a page in the back half the ``len(items) - start`` last: those are
    the first of the opposite order over the reversed list (a stable sort's reverse=True is the reversal of the
    sort of the reversed list), turned around. heapq keeps sort's order, ties included. A heap that would hold
    more than :data:`HEAP_SHARE` of the items costs more than the sort (both measured at 10,000 devices), so a
    page in the middle is sorted.
    """
    end = min(start + count, len(items))
    if start >= end:
        return []
    front = end <= len(items) - start
    if (end if front else len(items) - start) > HEAP_SHARE * len(items):
        return sorted(items, key=key, reverse=descending)[start:end]
    if front:
        first = heapq.nlargest if descending else heapq.nsmallest
        return first(end, items, key=key)[start:]
    last = heapq.nsmallest if descending else heapq.nlargest
    return last(len(items) - start, reversed(items), key=key)[::-1][: end - start]


REPORT_FIELDS = tuple(f.name for f in fields(Heartbeat) if f.name != "device_id")  # what a listing row shows


def _report_json(report: Heartbeat) -> str:
    return json.dumps({name: getattr(report, name) for name in ("device_id", *REPORT_FIELDS)}, separators=(",", ":"))


def _health(entry: Entry | None, newest: int, now: float) -> str:
    """``ok``, ``silent``, ``behind``, ``throttled`` or ``behind, throttled``."""
    if entry is None or is_silent(entry.last_seen, now):
        return "silent"
    flags = [n for n, on in (("behind", is_behind(entry.report, newest)), ("throttled", is_throttled(entry.report)))
             if on]
    return ", ".join(flags) or "ok"


@dataclass(frozen=True)
class _Item:
    device: Enrolled
    entry: Entry | None  # a device's latest heartbeat
    forward: Forward | None  # a site's newest forward
    health: str
    state: str  # active or silent for a device, site_active or site_silent for a site


def _row(item: _Item, newest: int) -> dict[str, Any]:
    e, f, health = item.entry, item.forward, item.health
    row: dict[str, Any] = {"device": item.device.device_id, "name": item.device.name, "site": item.device.site,
                           "state": item.state, "behind": "behind" in health, "throttled": "throttled" in health,
                           "health": health}
    if f is not None:  # a site: what its forward says; it reports nothing else
        return row | dict.fromkeys(REPORT_FIELDS) | {
            "last_seen": f.accepted_at, "last_round": f.round_id, "model_version": f.model_version,
            "versions_behind": None if f.model_version is None else newest - f.model_version}
    if e is None:
        return row | {"last_seen": None, "versions_behind": None, **dict.fromkeys(REPORT_FIELDS)}
    held = e.report.model_version
    return row | {"last_seen": e.last_seen, "versions_behind": None if held is None else newest - held,
                  **{name: getattr(e.report, name) for name in REPORT_FIELDS}}


_HEALTH_RANK = {"ok": 0, "throttled": 1, "behind": 2, "behind, throttled": 3, "silent": 4, "never forwarded": 4}


def _value(item: _Item, field: str) -> Any:
    """A device's report field; for a site, what its forward says (``last_round``, ``model_version``) or None."""
    if item.forward is not None:
        return {"last_round": item.forward.round_id, "model_version": item.forward.model_version}.get(field)
    return None if item.entry is None else getattr(item.entry.report, field)


def _last_seen(item: _Item) -> float | None:
    if item.forward is not None:
        return item.forward.accepted_at
    return None if item.entry is None else item.entry.last_seen


def _by(field: str) -> Callable[[_Item], tuple]:
    """Sort key on a report field; devices that never reported (or hold no model) come first."""

    def key(item: _Item) -> tuple:
        value = _value(item, field)
        return (value is not None, value if value is not None else 0, item.device.device_id)

    return key


_SORTS: dict[str, Callable[[_Item], tuple]] = {
    "device": lambda i: (i.device.device_id,),
    "name": lambda i: (i.device.name, i.device.device_id),
    "last_seen": lambda i: (_last_seen(i) is not None, _last_seen(i) or 0.0, i.device.device_id),
    "last_round": _by("last_round"),
    "model_version": _by("model_version"),
    "agent_version": lambda i: (_value(i, "agent_version") or "", i.device.device_id),
    "outbox": _by("outbox"),
    "health": lambda i: (_HEALTH_RANK[i.health], i.device.device_id),
}

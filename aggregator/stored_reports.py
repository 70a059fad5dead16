"""Reading back the heartbeats the fleet view stored in ``device_reports`` (aggregator/fleet.py).

A stored report is soft state (the device's next heartbeat replaces it), and it may not be one this version wrote: a
newer fl-aggregator adds fields to the Heartbeat, then the operator rolls back to this one on the same state
directory. So, unlike a heartbeat on the wire (docs/protocol.md section 13: an unknown field is refused), a stored
report's fields this version does not know are ignored, and a report whose known fields are not what it wrote (a
missing or ill-typed value, text that is not a JSON object) is dropped: either way the aggregator starts, and each
is logged once at start, naming what was left out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import MISSING, fields
from typing import Any

from appliance import wire
from appliance.protocol.heartbeat import FIELD_RANGES, MAX_AGENT_VERSION_CHARS, MAX_STORAGE_ERRORS, Heartbeat

log = logging.getLogger(__name__)

# field -> largest value, for every unsigned integer field of a stored report (model_version may also be null)
_UINT_RANGES = FIELD_RANGES | {"model_version": wire.MAX_ID, "storage_errors": MAX_STORAGE_ERRORS}
_TEXT_LENGTHS = {"device_id": 256, "agent_version": MAX_AGENT_VERSION_CHARS}  # device_id: also the row's own
# A stored field absent from the row takes its plain default (storage_errors, which older versions did not store);
# sent_at's default is the current time, which would make an old report look fresh, so it must be there.
_DEFAULTS = {f.name: f.default for f in fields(Heartbeat) if f.default is not MISSING}
_KNOWN = frozenset(f.name for f in fields(Heartbeat))


class MalformedReport(ValueError):
    """A stored report this version cannot read; the message names the field and what is wrong."""


def _field(values: dict[str, Any], name: str) -> Any:
    if name not in values:
        if name in _DEFAULTS:
            return _DEFAULTS[name]
        raise MalformedReport(f"field {name!r} is missing")
    value = values[name]
    if name in _TEXT_LENGTHS:
        if not isinstance(value, str) or not 0 < len(value) <= _TEXT_LENGTHS[name]:
            raise MalformedReport(f"field {name!r} must be text of 1 to {_TEXT_LENGTHS[name]} characters")
    elif not (name == "model_version" and value is None):
        high = _UINT_RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise MalformedReport(f"field {name!r} must be an integer in [0, {high}]")
    return value


def read_report(device_id: str, text: str) -> tuple[Heartbeat, set[str]]:
    """The report stored for ``device_id`` as ``text``, and the names of its fields this version does not know.

    Raises :class:`MalformedReport` when a known field is missing or not of its type and range, when ``text`` is
    not a JSON object, or when it names another device."""
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise MalformedReport(f"not JSON ({exc})") from None
    if not isinstance(values, dict):
        raise MalformedReport(f"a JSON {type(values).__name__}, not an object")
    report = Heartbeat(**{name: _field(values, name) for name in _KNOWN})
    if report.device_id != device_id:
        raise MalformedReport(f"it names device {report.device_id!r}")
    return report, set(values) - _KNOWN


def read_reports(rows: Iterable[tuple[str, float, str]]) -> dict[str, tuple[Heartbeat, float]]:
    """Each ``(device_id, last_seen, report)`` row's report and last_seen, by device, leaving out (and logging) the
    malformed ones; fields this version does not know are ignored and named in one log line."""
    loaded: dict[str, tuple[Heartbeat, float]] = {}
    unknown: dict[str, int] = {}  # field -> how many reports carried it
    for device, last_seen, text in rows:
        try:
            report, extra = read_report(device, text)
            if not isinstance(last_seen, int | float):
                raise MalformedReport(f"its last_seen is {last_seen!r}, not a time")
        except MalformedReport as exc:
            log.warning("device_reports: dropped the stored heartbeat of device %s: %s; the device is listed as "
                        "silent until its next heartbeat, which replaces it", device, exc)
            continue
        loaded[device] = (report, float(last_seen))
        for name in extra:
            unknown[name] = unknown.get(name, 0) + 1
    if unknown:
        named = ", ".join(f"{name!r} ({count} report{'s' if count != 1 else ''})" for name, count in sorted(
            unknown.items()))
        log.warning("device_reports: ignored stored heartbeat fields this fl-aggregator does not know: %s; a newer "
                    "fl-aggregator wrote them, and each device's next heartbeat replaces its report (\"Stored reports "
                    "after a downgrade\" in docs/aggregator.md)", named)
    return loaded

"""A fleet listing reads the sites' forwards once (a database read per listing), and its counts and its rows come
from that one read, so they agree even when a forward lands meanwhile."""

from __future__ import annotations

import time
from pathlib import Path

from test_fleet_listing_order import NEWEST, NOW, _fleet

from aggregator.fleet import FILTERS, STATES, Enrolled, Fleet, Forward


def test_a_listing_reads_the_forwards_once_and_its_counts_agree_with_its_rows(tmp_path: Path) -> None:
    reads: list[float] = []

    def forwards() -> dict[str, Forward]:
        reads.append(time.time())
        # The site's first forward is accepted between the first read and any second one.
        return {} if len(reads) == 1 else {"site-a": Forward(time.time(), 3, 1)}

    roster = [Enrolled("cam-1", "camera 1"), Enrolled("site-a", "north site", site=True)]
    fleet = Fleet(tmp_path / "fleet.db", lambda: roster, forwards, round_timeout=60.0)
    try:
        listing = fleet.listing(1, time.time())
    finally:
        fleet.close()
    site = next(row for row in listing["devices"] if row["device"] == "site-a")
    assert len(reads) == 1
    assert site["state"] == "site_silent" and site["health"] == "never forwarded"
    assert listing["counts"]["site_silent"] == 1 and listing["counts"]["site_active"] == 0


def test_a_listings_counts_are_the_fleets_counts_whatever_its_filter(tmp_path: Path) -> None:
    """A listing counts the items it judged for its rows; that equals :meth:`Fleet.counts`, which judges each key
    itself, under every filter: a silent device holding an old model counts silent only, a site by its forward."""
    fleet = _fleet(tmp_path)
    try:
        counts = fleet.counts(NEWEST, NOW)
        assert all(counts[state] for state in STATES)  # every state is there to be miscounted
        for state in FILTERS:
            assert fleet.listing(NEWEST, NOW, state=state)["counts"] == counts, state
    finally:
        fleet.close()

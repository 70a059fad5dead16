"""A fleet listing puts only its page in order (a heap, not a sort of every device), and that page is exactly the
one a full sort gives: same devices, same order, ties included, for every sort key, both directions, first, middle,
last and past-the-end pages."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import aggregator.fleet as fleet_module
from aggregator.fleet import _SORTS, SORT_KEYS, Enrolled, Entry, Fleet, Forward, _row, sorted_page
from appliance.protocol.heartbeat import Heartbeat

NOW = 1_800_000_000.0
NEWEST = 6


@pytest.fixture(params=["measured", "always"])
def heap_share(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heap share as shipped (small pages at either end take a heap, the middle a sort), and 1 (every page
    takes a heap), so the heap's answer is checked on every page."""
    if request.param == "always":
        monkeypatch.setattr(fleet_module, "HEAP_SHARE", 1.0)


@pytest.mark.parametrize("size", [0, 1, 2, 7, 40, 300])
@pytest.mark.parametrize("descending", [False, True])
def test_a_page_is_the_slice_of_a_stable_full_sort_even_among_equal_keys(size: int, descending: bool,
                                                                         heap_share: None) -> None:
    """Items with only four key values: the page keeps the order a stable sort gives equal items (their order in
    the list), from the front and from the back, for every start and page size."""
    rng = random.Random(size)
    items = [(rng.randrange(4), i) for i in range(size)]  # (key value, identity): many items share a key

    def key(item: tuple[int, int]) -> tuple[int]:
        return (item[0],)

    full = sorted(items, key=key, reverse=descending)
    for count in (1, 3, 5, size or 1):
        for start in range(size + 2):
            assert sorted_page(items, key, descending, start, count) == full[start:start + count], (start, count)


def _fleet(tmp_path: Path) -> Fleet:
    """60 devices and 3 sites with many equal report fields: names, rounds, versions, outboxes and arrival times
    repeat; some devices never reported; one site never forwarded."""
    rng = random.Random(7)
    roster = [Enrolled(f"{rng.getrandbits(64):016x}", f"cam-{i % 5}") for i in range(60)]
    roster += [Enrolled(f"site{i}", "site", site=True) for i in range(3)]
    forwards = {"site0": Forward(NOW - 10, 4, 5), "site1": Forward(NOW - 9000, 2, None)}
    fleet = Fleet(tmp_path / "db", lambda: roster, lambda: forwards, round_timeout=60.0)
    for i, device in enumerate(roster[:52]):
        report = Heartbeat(device_id=device.device_id, agent_version=f"0.{i % 3}.0",
                           model_version=None if i % 11 == 0 else i % 4 + 2, last_round=i % 6, cameras=1,
                           memory=(i % 3) * 200 << 20, memory_max=512 << 20, cpu_max=1000,
                           cpu_throttled=250 if i % 7 == 0 else 0, oom_retries=0, outbox=i % 3, outbox_bytes=0,
                           sent_at=int(NOW))
        fleet._entries[device.device_id] = Entry(report, NOW - (i % 4) * 2000)  # some silent, many equal
    return fleet


@pytest.mark.parametrize("sort", [*SORT_KEYS, *(f"-{key}" for key in SORT_KEYS)])
def test_every_page_of_a_listing_is_the_page_of_a_full_sort(tmp_path: Path, sort: str, heap_share: None) -> None:
    fleet = _fleet(tmp_path)
    try:
        roster = fleet.roster(NOW)
        forwards = fleet.site_forwards(roster)
        items = [fleet._item(d, forwards, NEWEST, NOW) for d in roster]
        full = sorted(items, key=_SORTS[sort.lstrip("-")], reverse=sort.startswith("-"))
        per_page = 7
        for page in (1, 2, 4, 5, 9, 10):  # 63 keys: 9 full pages, then none
            listing = fleet.listing(NEWEST, NOW, sort=sort, page=page, per_page=per_page)
            start = (page - 1) * per_page
            assert listing["devices"] == [_row(i, NEWEST) for i in full[start:start + per_page]], page
        active = fleet.listing(NEWEST, NOW, state="active", sort=sort, per_page=per_page, page=3)["devices"]
        in_state = [i for i in full if i.state == "active"]
        assert active == [_row(i, NEWEST) for i in in_state[14:21]]
    finally:
        fleet.close()

"""A board without a real-time clock, booted in QEMU with its clock years behind (``-rtc base=2020-01-01``) and no
NTP server in reach (the rig's network reaches the aggregator and nothing else).

The appliance must still take part in rounds (its updates stamped in the aggregator's time, its deadlines judged
by it), say in its metrics and status how far off its clock is, and run time sync the way a read-only root
allows: systemd-timesyncd active, its clock file on the data partition, the provisioned NTP servers read from
there. One boot serves all the checks, in order.
"""

from __future__ import annotations

import dataclasses
import re
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.qemu, pytest.mark.slow, pytest.mark.timeout(2400)]

RTC_BASE = "2020-01-01"
DAY = 86400.0
AGENT = "fl-agent.service"
TIMESYNCD = "systemd-timesyncd.service"


@pytest.fixture(scope="module")
def late_board(dev_image, machine, host_aggregator, boot_appliance, tmp_path_factory, quick_rounds_toml):
    """Appliance clk0, enrolled with the running host aggregator, booted with its real-time clock in 2020."""
    from flctl.ports import free_port
    from flctl.qemu.rig import Appliance, Identity, provision_data_partition

    if host_aggregator.skip_reason:
        pytest.skip(host_aggregator.skip_reason)
    workdir = tmp_path_factory.mktemp("clock")
    identity = Identity.generate()
    host_aggregator.enroll(identity.public_key_hex)
    appliance = Appliance("clk0", workdir, identity, metrics_port=free_port(), aggregator_port=host_aggregator.port)
    provision_data_partition(
        dev_image, appliance.data_image, identity, host_aggregator.public_key_hex, agent_toml=quick_rounds_toml()
    )
    booted = boot_appliance(appliance, workdir, dataclasses.replace(machine, rtc_base=RTC_BASE))
    yield booted
    if booted.qemu.status:
        booted.qemu.off()


def seconds_behind(guest) -> float:
    """How far the guest's clock is behind the host's (which the aggregator on the host uses)."""
    before = time.time()
    guest_now = float(guest.check("date +%s.%N"))
    return (before + time.time()) / 2 - guest_now


def scrape(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.read().decode()
    except OSError:
        return ""


def metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+|NaN)$", text, re.MULTILINE)
    return float(m.group(1)) if m else None


def test_the_board_boots_cleanly_with_its_clock_years_behind(late_board):
    _, state = late_board.run("systemctl is-system-running --wait", timeout=300)
    failed = late_board.check("systemctl --failed --no-legend --plain")
    assert state.strip() == "running", f"system state {state.strip()!r}; failed units:\n{failed}"
    behind = seconds_behind(late_board)
    print(f"\n[qemu] guest clock {behind / DAY:.1f} days behind the host (-rtc base={RTC_BASE})")
    # systemd moves a clock older than its build forward to that date: still far outside the aggregator's window.
    assert behind > 30 * DAY, f"the guest clock is only {behind:.0f} s behind: is -rtc base= passed to QEMU?"


def test_timesyncd_runs_with_its_clock_file_and_servers_on_the_data_partition(late_board):
    late_board.check(f"systemctl is-active --quiet {TIMESYNCD}")
    assert late_board.check("timedatectl show -p CanNTP --value").strip() == "yes"
    # The clock file, which carries the time across reboots without a real-time clock, is on fl-data.
    assert late_board.check("findmnt -no SOURCE /var/lib/systemd/timesync").strip().endswith("[/timesync]")
    late_board.wait_for("test -f /data/timesync/clock", timeout=120)
    # Provisioning writes the board's NTP servers to /data/timesyncd.conf; timesyncd reads it through the link
    # systemd-tmpfiles makes in /run (the root is read-only).
    assert late_board.check("readlink /run/systemd/timesyncd.conf.d/50-fl-provisioned.conf").strip() == (
        "/data/timesyncd.conf"
    )
    late_board.check(f"printf '[Time]\\nNTP=10.0.2.100\\n' > /data/timesyncd.conf && systemctl restart {TIMESYNCD}")
    servers = late_board.check("timedatectl show-timesync -p SystemNTPServers --value").strip()
    assert servers == "10.0.2.100"


def test_rounds_complete_and_the_metrics_and_status_show_the_offset(late_board, host_aggregator):
    device = late_board.appliance.identity.device_id
    # Round 1 opened before the board booted; round 2 opens as round 1 closes, while the agent waits for it,
    # so its task gives the agent the aggregator's time to within the network's delay.
    deadline = time.monotonic() + 1500
    while True:
        rounds = {r["round"]: r for r in host_aggregator.status()["rounds"]}
        if all(device in (rounds.get(n, {}).get("devices") or []) for n in (1, 2)):
            break
        assert time.monotonic() < deadline, f"rounds 1 and 2 not completed by the late board: {rounds}"
        late_board.run("true")  # keep reading the console
        time.sleep(3)
    aggregator_metrics = scrape(f"{host_aggregator.url}/metrics")
    assert not metric(aggregator_metrics, "fl_aggregator_updates_rejected_total", '{reason="expired"}')

    behind = seconds_behind(late_board)
    offset = metric(scrape(f"http://127.0.0.1:{late_board.appliance.metrics_port}/metrics"),
                    "fl_agent_clock_offset_seconds")
    print(f"\n[qemu] fl_agent_clock_offset_seconds {offset}; guest clock behind by {behind:.0f} s")
    assert offset is not None and offset == pytest.approx(behind, abs=120)
    # Without any NTP answer timesyncd still saves the time to its clock file on fl-data every minute: the board's
    # next boot starts from there, not from systemd's build date.
    # (Waits for the next save rather than bounding the last one's age: a loaded TCG guest runs its timers late.)
    first = late_board.check("stat -c %Y /data/timesync/clock").strip()
    saved = time.monotonic() + 600
    while late_board.check("stat -c %Y /data/timesync/clock").strip() == first:
        assert time.monotonic() < saved, "timesyncd did not write its clock file on /data again within 10 minutes"
        time.sleep(5)
    status = late_board.check(f"systemctl show -p StatusText --value {AGENT}")
    assert "behind the aggregator's" in status, status
    warned = late_board.check(f"journalctl -u {AGENT} -o cat --no-pager | grep -c \"behind the aggregator's\"")
    assert int(warned.strip()) >= 1

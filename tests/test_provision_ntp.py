"""`flctl provision --ntp-server`: the NTP servers a fleet's boards set their clocks from (boards without a
real-time clock have nothing else), written per board and flashed onto the data partition for timesyncd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flash_images import cli, data_volume, have_tools, make_image

pytestmark = pytest.mark.usefixtures("flctl_env")


def _provision(fleet: Path, *extra: str) -> int:
    return cli(["provision", "--fleet", str(fleet), *extra])


def _ntp_line(fleet: Path, board: str) -> str:
    text = (fleet / "boards" / board / "timesyncd.conf").read_text()
    assert text.count("[Time]") == 1
    return next(line for line in text.splitlines() if line.startswith("NTP="))


def test_every_board_gets_the_fleets_ntp_servers(tmp_path, capsys):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a,b", "--aggregator-url", "http://10.0.2.100:8080",
                      "--ntp-server", "10.0.2.100", "--ntp-server", "ntp.example.net") == 0
    assert json.loads((fleet / "fleet.json").read_text())["ntp_servers"] == ["10.0.2.100", "ntp.example.net"]
    assert _ntp_line(fleet, "a") == _ntp_line(fleet, "b") == "NTP=10.0.2.100 ntp.example.net"
    assert "NTP servers: 10.0.2.100 ntp.example.net" in capsys.readouterr().out
    assert _provision(fleet, "--names", "c") == 0  # a board added later gets them too
    assert _ntp_line(fleet, "c") == "NTP=10.0.2.100 ntp.example.net"


def test_without_ntp_servers_boards_get_no_timesyncd_conf(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://10.0.2.100:8080") == 0
    assert not (fleet / "boards" / "a" / "timesyncd.conf").exists()


def test_changing_the_servers_keeps_other_per_board_settings(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://x:1", "--ntp-server", "old.example") == 0
    conf = fleet / "boards" / "a" / "timesyncd.conf"
    conf.write_text(conf.read_text() + "PollIntervalMaxSec=600\n")
    assert _provision(fleet, "--ntp-server", "new.example") == 0
    assert _ntp_line(fleet, "a") == "NTP=new.example"
    assert "PollIntervalMaxSec=600" in conf.read_text()


def test_a_malformed_server_is_refused_before_anything_is_written(tmp_path, capsys):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "a", "--aggregator-url", "http://x:1", "--ntp-server", "ntp example") == 1
    assert "NTP server 'ntp example': expected a host name or an IP address" in capsys.readouterr().err
    assert not fleet.exists()


@pytest.mark.skipif(have_tools() is not None, reason=have_tools() or "")
def test_flash_puts_the_servers_on_the_data_partition_for_timesyncd(tmp_path):
    fleet = tmp_path / "fleet"
    assert _provision(fleet, "--names", "cam-1", "--aggregator-url", "http://x:1", "--ntp-server", "10.0.2.100") == 0
    image = make_image(tmp_path / "fl.img")
    target = tmp_path / "board.img"
    assert cli(["flash", str(image), str(target), "--board", "cam-1", "--fleet", str(fleet), "--yes"]) == 0
    volume = data_volume(target)
    # /data/timesyncd.conf: the image links it into /run/systemd/timesyncd.conf.d; root's, not the agent's.
    assert volume.read("timesyncd.conf") == (fleet / "boards" / "cam-1" / "timesyncd.conf").read_bytes()
    assert volume.stat("timesyncd.conf") == (0o100644, 0, 0)

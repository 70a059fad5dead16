"""The host files ``flctl container fleet up`` makes once and every later command reads survive a power cut whole:
``fleet.json`` (the fleet's settings), the city's TLS key and certificate, and the CA copy the agents pin. A
damaged ``fleet.json`` is refused in one line naming it, not with a JSON traceback. No podman needed: the files
alone, with the syncs recorded as in tests/test_outbox_fsync.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flctl.container import fleet as fleet_module
from flctl.container.fleet import Fleet, FleetSettings
from flctl.container.podman import ContainerError


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(call, path) in order: fsync (the file or directory it names), renamed (the name made)."""
    log: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, *args, **kwargs) -> None:
        log.append(("rename", str(src)))
        real_replace(src, dst, *args, **kwargs)
        log.append(("renamed", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def assert_written_whole(calls: list[tuple[str, str]], path: Path) -> None:
    """``path`` got its bytes under another name, fsynced, then renamed, and the rename was made durable."""
    renamed = calls.index(("renamed", str(path)))
    temp = calls[renamed - 1][1]
    assert temp != str(path) and Path(temp).parent == path.parent, f"{path.name} was written in place"
    assert ("fsync", temp) in calls[:renamed - 1], f"{path.name} was not fsynced before its rename"
    assert ("fsync", str(path.parent)) in calls[renamed:], f"the rename of {path.name} was not made durable"


def test_fleet_json_is_written_whole(tmp_path: Path, calls) -> None:
    fleet = Fleet(tmp_path / "fleet")
    fleet.root.mkdir()
    fleet.save_settings(FleetSettings(devices=5, port=18444))
    assert_written_whole(calls, fleet.settings_file)
    assert fleet.settings() == FleetSettings(devices=5, port=18444)


@pytest.mark.parametrize("damage", ["", '{"devices": 5, "po', '{"devices": 5, "cameras": 2}'],
                         ids=["empty", "cut-short", "unknown-field"])
def test_a_damaged_fleet_json_is_refused_in_one_line_naming_it(tmp_path: Path, damage: str) -> None:
    fleet = Fleet(tmp_path)
    fleet.settings_file.write_text(damage)
    with pytest.raises(ContainerError) as refused:
        fleet.settings()
    message = str(refused.value)
    assert str(fleet.settings_file) in message and "damaged" in message and "\n" not in message


needs_root_and_openssl = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("openssl") is None,
    reason="the city's key files are chowned to root with the aggregator's group, which needs root; and openssl",
)


@needs_root_and_openssl
def test_the_city_certificate_and_its_key_are_written_whole_the_certificate_last(tmp_path: Path, calls) -> None:
    fleet = Fleet(tmp_path)
    fleet_module._certificate(fleet)
    tls = fleet.secret("fl-city-tls")
    assert_written_whole(calls, tls / "tls.key")
    assert_written_whole(calls, tls / "tls.crt")
    assert calls.index(("renamed", str(tls / "tls.key"))) < calls.index(("renamed", str(tls / "tls.crt")))
    assert_written_whole(calls, fleet.ca_file)
    assert fleet.ca_file.read_bytes() == (tls / "tls.crt").read_bytes()
    assert not list(tls.glob(".*")), "a temp file was left behind"


@needs_root_and_openssl
def test_a_pinned_ca_lost_in_a_power_cut_is_made_again_from_the_certificate(tmp_path: Path) -> None:
    """The cut came after the certificate's rename, before the CA copy was on disk: the next ``up`` keeps the
    certificate (the city's identity) and gives the agents its copy again, rather than a fleet whose agents
    cannot pin their city."""
    fleet = Fleet(tmp_path)
    fleet_module._certificate(fleet)
    certificate = fleet.secret("fl-city-tls") / "tls.crt"
    made = certificate.read_bytes()
    fleet.ca_file.unlink()
    fleet_module._certificate(fleet)
    assert certificate.read_bytes() == made
    assert fleet.ca_file.read_bytes() == made
    assert fleet.ca_file.stat().st_mode & 0o777 == 0o644

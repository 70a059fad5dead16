"""`flctl container` without podman: its refusals, the Containerfile it writes, the accounts it adds."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest

from flctl.container.build import ProjectInfo, containerfile
from flctl.container.payload import AGENT, AGGREGATOR, _accounts, _console_script
from flctl.container.platforms import PLATFORMS, PlatformError, platform_named

ROOT = Path(__file__).resolve().parent.parent


def test_build_refuses_an_unknown_architecture_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "flctl.cli", "container", "build", "--arch", "riscv64"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 2 and "unknown architecture 'riscv64'" in done.stderr
    assert "Traceback" not in done.stderr


def test_fleet_status_without_a_fleet_says_so(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "flctl.cli", "container", "fleet", "--dir", str(tmp_path / "none"),
                           "status"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 1 and "holds no fleet: run `flctl container fleet up` first" in done.stderr
    assert "Traceback" not in done.stderr


def test_architectures_accept_uname_names() -> None:
    assert platform_named("aarch64") is PLATFORMS["arm64"] and platform_named("x86_64") is PLATFORMS["amd64"]
    with pytest.raises(PlatformError, match="images are built for amd64, arm64"):
        platform_named("armhf")
    tags = PLATFORMS["arm64"].wheel_tags
    assert "--platform=manylinux_2_17_aarch64" in tags and "--platform=manylinux_2_36_aarch64" in tags
    assert "--python-version=3.11" in tags


def test_the_containerfile_only_copies_and_configures() -> None:
    info = ProjectInfo(version="0.1.0", licence="MIT", source="https://example.invalid/fl-edge", revision="abc")
    text = containerfile(AGENT, "localhost/fl-edge/base:k-arm64", info)
    assert text.startswith("FROM localhost/fl-edge/base:k-arm64\n")
    assert "RUN " not in text  # nothing runs inside the image: arm64 builds without emulation
    assert "USER 10002:10002" in text and "VOLUME /var/lib/fl-agent" in text
    assert 'org.opencontainers.image.licenses="MIT"' in text and 'org.opencontainers.image.version="0.1.0"' in text
    assert 'HEALTHCHECK' in text and 'CMD ["fl-healthcheck"]' in text
    assert 'CMD ["fl-agent", "run", "--config", "/etc/fl-agent/agent.toml"]' in text


def _base_tar(tmp_path: Path) -> Path:
    path = tmp_path / "base.tar"
    with tarfile.open(path, "w") as tar:
        for name, text in (("./etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                           ("./etc/group", "root:x:0:\nvideo:x:44:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, BytesIO(data))
    return path


def test_the_agent_user_joins_video_and_the_aggregator_user_nothing(tmp_path: Path) -> None:
    passwd, group = _accounts(_base_tar(tmp_path), AGENT)
    assert passwd.endswith("fl-agent:x:10002:10002:fl-agent:/var/lib/fl-agent:/usr/sbin/nologin\n")
    assert "video:x:44:fl-agent\n" in group and group.endswith("fl-agent:x:10002:\n")
    passwd, group = _accounts(_base_tar(tmp_path), AGGREGATOR)
    assert "fl-aggregator:x:10001:10001:" in passwd and "video:x:44:\n" in group


def test_the_entry_script_guards_its_main(tmp_path: Path) -> None:
    """The agent's trainer runs in a multiprocessing fork server, which imports the main script again."""
    dist = tmp_path / "fl_edge-0.1.0.dist-info"
    dist.mkdir()
    (dist / "entry_points.txt").write_text("[console_scripts]\nfl-agent = appliance.cli:main\n")
    script = _console_script(tmp_path, AGENT)
    assert script.startswith("#!/opt/fl-edge/bin/python3\n")
    assert 'if __name__ == "__main__":\n    sys.exit(main())' in script

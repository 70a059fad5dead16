"""Budget readings from fake cgroupfs trees: limits, delegation, advisory reasons, malformed files, pressure."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from appliance import budget as b

UNIT = "system.slice/fl-agent.service"
MiB = 1024 * 1024


def make_tree(tmp_path: Path, cgroup: str = UNIT, files: dict[str, dict[str, str]] | None = None,
              controllers: str = "cpu io memory pids") -> tuple[Path, Path]:
    """A fake cgroupfs root and /proc/self dir; ``files`` maps cgroup paths to {file name: content}."""
    root = tmp_path / "cgroupfs"
    proc = tmp_path / "proc-self"
    proc.mkdir()
    (proc / "cgroup").write_text(f"0::/{cgroup}\n")
    (proc / "mountinfo").write_text(
        "22 1 0:20 / /proc rw,nosuid - proc proc rw\n"
        f"30 25 0:26 / {root} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    defaults = {"cgroup.controllers": controllers, "cgroup.subtree_control": "", "cgroup.procs": ""}
    parts = cgroup.split("/")
    for depth in range(len(parts) + 1):
        directory = root.joinpath(*parts[:depth])
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in defaults.items():
            (directory / name).write_text(content + "\n")
    for rel, content in (files or {}).items():
        directory = root / rel
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in content.items():
            (directory / name).write_text(text)
    return root, proc


def test_systemd_envelope_gives_cpu_quota_threads_and_memory(tmp_path):
    root, proc = make_tree(tmp_path, files={
        UNIT: {"cpu.max": "150000 100000\n", "memory.max": f"{512 * MiB}\n", "memory.high": "max\n"},
    })
    budget = b.read_budget(proc_self=proc, cpus=4)
    assert budget.cpu_quota == pytest.approx(1.5)
    assert budget.threads == 1  # whole CPUs only: a second thread would be throttled
    assert budget.memory_max == 512 * MiB
    assert budget.memory_high is None
    assert budget.delegated and not budget.advisory
    assert budget.base == root / UNIT


def test_threads_follow_quota_and_are_capped_by_the_cpus_we_may_use(tmp_path):
    root, proc = make_tree(tmp_path, files={UNIT: {"cpu.max": "400000 100000\n"}})
    assert b.read_budget(root=root, proc_self=proc, cpus=2).threads == 2
    assert b.read_budget(root=root, proc_self=proc, cpus=8).threads == 4
    (root / UNIT / "cpu.max").write_text("max 100000\n")
    unlimited = b.read_budget(root=root, proc_self=proc, cpus=3)
    assert unlimited.cpu_quota is None and unlimited.threads == 3
    (root / UNIT / "cpu.max").write_text("20000 100000\n")
    assert b.read_budget(root=root, proc_self=proc, cpus=3).threads == 1  # at least one


def test_tightest_limit_on_the_path_to_the_root_wins(tmp_path):
    _, proc = make_tree(tmp_path, files={
        "system.slice": {"memory.max": f"{256 * MiB}\n", "cpu.max": "300000 100000\n"},
        UNIT: {"memory.max": f"{512 * MiB}\n", "cpu.max": "50000 100000\n"},
    })
    budget = b.read_budget(proc_self=proc, cpus=4)
    assert budget.memory_max == 256 * MiB
    assert budget.cpu_quota == pytest.approx(0.5)


def test_after_moving_into_the_agent_leaf_the_unit_limits_and_base_remain(tmp_path):
    root, proc = make_tree(tmp_path, cgroup=f"{UNIT}/agent", files={
        UNIT: {"memory.max": f"{300 * MiB}\n", "cpu.max": "200000 100000\n"},
        f"{UNIT}/agent": {"memory.max": "max\n", "cpu.max": "max 100000\n"},
    })
    budget = b.read_budget(proc_self=proc, cpus=4)
    assert budget.memory_max == 300 * MiB and budget.threads == 2
    assert budget.base == root / UNIT


def test_mount_point_with_escaped_space_and_namespaced_mount_root(tmp_path):
    root = tmp_path / "cg root"
    (root / "fl-agent.service").mkdir(parents=True)
    (root / "fl-agent.service" / "memory.max").write_text("1048576\n")
    proc = tmp_path / "proc"
    proc.mkdir()
    # The process sees /system.slice/fl-agent.service; the mount shows the hierarchy from /system.slice.
    (proc / "cgroup").write_text("12:memory:/x\n0::/system.slice/fl-agent.service\n")
    escaped = str(root).replace(" ", "\\040")
    (proc / "mountinfo").write_text(f"30 25 0:26 /system.slice {escaped} rw - cgroup2 cgroup2 rw\n")
    where = b.locate(proc_self=proc)
    assert where == b.Location(root, root / "fl-agent.service")
    assert b.effective_limits(where.cgroup, where.root)[1] == 1048576


@pytest.mark.parametrize(("cgroup_line", "mountinfo", "reason"), [
    ("1:name=systemd:/\n", None, "no cgroup v2 ('0::') line"),
    ("0::/\n", "22 1 0:20 / /proc rw - proc proc rw\n", "no cgroup v2 hierarchy is mounted"),
    ("0::/gone.service\n", "30 25 0:26 / {root} rw - cgroup2 cgroup2 rw\n", "does not exist"),
])
def test_no_cgroup_v2_means_an_advisory_budget_with_the_reason(tmp_path, cgroup_line, mountinfo, reason):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup_line)
    (proc / "mountinfo").write_text((mountinfo or "").format(root=tmp_path / "cg"))
    (tmp_path / "cg").mkdir()
    budget = b.read_budget(proc_self=proc, cpus=2)
    assert budget.advisory and not budget.delegated and budget.base is None
    assert reason in budget.reason
    assert budget.threads == 2 and budget.memory_max is None


def test_hybrid_host_without_v2_memory_controller_is_advisory(tmp_path):
    """The layout of this development host: v2 mounted at /sys/fs/cgroup/unified with only hugetlb."""
    _, proc = make_tree(tmp_path, cgroup="user.slice", controllers="hugetlb")
    budget = b.read_budget(proc_self=proc, cpus=2)
    assert budget.advisory
    assert "memory controller is not available" in budget.reason and "hugetlb" in budget.reason


def _budget_as_nobody(proc: Path) -> tuple[bool, str]:
    """read_budget in a forked child that dropped root (root passes every permission check)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_end)
            os.setgid(65534)
            os.setuid(65534)
            budget = b.read_budget(proc_self=proc, cpus=1)
            os.write(write_end, json.dumps([budget.advisory, budget.reason]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    advisory, reason = json.loads(data)
    return advisory, reason


def test_an_agent_in_the_root_cgroup_never_takes_it_over(tmp_path):
    """Moving "its" processes out of the root cgroup would move every process of the machine (or container)."""
    root, proc = make_tree(tmp_path, cgroup="")
    budget = b.read_budget(proc_self=proc, cpus=2)
    assert budget.advisory and budget.base is None
    assert f"runs in the root cgroup {root}" in budget.reason


def test_undelegated_cgroup_is_advisory_with_the_reason():
    """A unit without Delegate=yes: the agent's user cannot write its cgroup."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        tmp_path = Path(tmp)
        root, proc = make_tree(tmp_path)
        for path in [tmp_path, *tmp_path.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if os.geteuid() == 0:
            advisory, reason = _budget_as_nobody(proc)
        else:
            budget = b.read_budget(proc_self=proc, cpus=1)
            advisory, reason = budget.advisory, budget.reason
    assert advisory
    assert "not delegated" in reason and str(root / UNIT) in reason


@pytest.mark.parametrize(("name", "content", "problem"), [
    ("cpu.max", "lots\n", "expected '<quota|max> <period>'"),
    ("cpu.max", "abc 100000\n", "quota 'abc' is not an integer"),
    ("cpu.max", "5000 0\n", "period is 0"),
    ("memory.max", "12 34\n", "expected one integer or 'max'"),
    ("memory.max", "-5\n", "is negative"),
    ("memory.max", "\n", "expected one integer or 'max'"),
    ("memory.high", "2G\n", "'2G' is not an integer"),
])
def test_malformed_limit_files_raise_an_error_naming_the_file(tmp_path, name, content, problem):
    root, proc = make_tree(tmp_path, files={UNIT: {name: content}})
    with pytest.raises(b.CgroupFileError) as err:
        b.read_budget(proc_self=proc)
    assert str(root / UNIT / name) in str(err.value)
    assert problem in str(err.value)


@pytest.mark.parametrize(("name", "content", "reader", "problem"), [
    ("cpu.stat", "usage_usec 12\nuser_usec\n", "cpu_stat", "line 2: expected 'key value'"),
    ("cpu.stat", "usage_usec twelve\n", "cpu_stat", "value of usage_usec 'twelve' is not an integer"),
    ("memory.events", "oom 1\noom_kill x\n", "memory_events", "line 2"),
    ("memory.current", "12 13\n", "memory_current", "expected one integer"),
    ("memory.pressure", "some avg10=abc avg60=0 avg300=0 total=0\n", "memory_pressure", "non-numeric"),
    ("memory.pressure", "some avg10=1.0 avg60=0 total=0\n", "memory_pressure", "missing avg300"),
    ("memory.pressure", "full avg10=1 avg60=0 avg300=0 total=0\n", "memory_pressure", "no 'some' line"),
    ("memory.pressure", "most avg10=1 avg60=0 avg300=0 total=0\n", "memory_pressure", "expected 'some'"),
    ("cgroup.procs", "12\nabc\n", "procs", "pid 'abc' is not an integer"),
])
def test_malformed_usage_files_raise_an_error_naming_the_file(tmp_path, name, content, reader, problem):
    (tmp_path / name).write_text(content)
    with pytest.raises(b.CgroupFileError) as err:
        getattr(b.Cgroup(tmp_path), reader)()
    assert str(tmp_path / name) in str(err.value) and problem in str(err.value)


def test_malformed_proc_files_name_the_file(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::relative\n")
    with pytest.raises(b.CgroupFileError, match=r"proc/cgroup: cgroup v2 path 'relative' is not absolute"):
        b.read_budget(proc_self=proc)
    (proc / "cgroup").write_text("0::/\n")
    (proc / "mountinfo").write_text("garbage\n")
    with pytest.raises(b.CgroupFileError, match=r"proc/mountinfo: line 1: not a mountinfo line"):
        b.read_budget(proc_self=proc)
    (proc / "mountinfo").unlink()
    with pytest.raises(b.CgroupFileError, match=r"proc/mountinfo: file not found"):
        b.read_budget(proc_self=proc)


def test_usage_reads_memory_cpu_pressure_and_trainer_oom_kills(tmp_path):
    root, _ = make_tree(tmp_path, files={
        UNIT: {
            "memory.current": "104857600\n",
            "cpu.stat": "usage_usec 5000000\nuser_usec 4000000\nsystem_usec 1000000\n"
                        "nr_periods 10\nnr_throttled 3\nthrottled_usec 250000\n",
            "memory.pressure": "some avg10=12.50 avg60=3.00 avg300=0.50 total=123456\n"
                               "full avg10=1.00 avg60=0.00 avg300=0.00 total=100\n",
        },
        f"{UNIT}/trainer": {"memory.events": "low 0\nhigh 0\nmax 14\noom 2\noom_kill 2\noom_group_kill 0\n",
                            "memory.peak": "67100672\n"},
    })
    usage = b.read_usage(root / UNIT)
    assert usage == b.Usage(memory_current=104857600, cpu_usage_usec=5000000, cpu_throttled_usec=250000,
                            memory_pressure_some_avg10=12.5, trainer_oom_kills=2, trainer_memory_peak=67100672)
    assert b.read_usage(None) == b.Usage(None, None, None, None, None, None)
    pressure = b.Cgroup(root / UNIT).memory_pressure()
    assert pressure.full is not None and pressure.full.total_us == 100


def test_pressure_high_compares_some_avg10_with_the_threshold(tmp_path):
    psi = tmp_path / "memory.pressure"
    psi.write_text("some avg10=9.99 avg60=40.00 avg300=40.00 total=1\nfull avg10=50 avg60=0 avg300=0 total=1\n")
    assert not b.pressure_high(10.0, psi)
    psi.write_text("some avg10=10.00 avg60=0.00 avg300=0.00 total=1\n")
    assert b.pressure_high(10.0, psi)
    assert not b.pressure_high(10.0, tmp_path / "absent")  # kernel without PSI: no pressure known


def test_pressure_gate_waits_until_pressure_drops(tmp_path):
    psi = tmp_path / "memory.pressure"
    psi.write_text("some avg10=60.00 avg60=0 avg300=0 total=1\n")
    now = [0.0]
    sleeps = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        if len(sleeps) == 3:  # the kernel reclaimed: pressure falls
            psi.write_text("some avg10=2.00 avg60=0 avg300=0 total=1\n")

    gate = b.PressureGate(threshold=20.0, max_wait=60.0, poll_interval=5.0, path=psi)
    waited = gate.wait(clock=lambda: now[0], sleep=fake_sleep)
    assert sleeps == [5.0, 5.0, 5.0] and waited == 15.0


def test_pressure_gate_gives_up_after_max_wait(tmp_path):
    psi = tmp_path / "memory.pressure"
    psi.write_text("some avg10=90.00 avg60=0 avg300=0 total=1\n")
    now = [0.0]

    def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    gate = b.PressureGate(threshold=20.0, max_wait=12.0, poll_interval=5.0, path=psi)
    assert gate.wait(clock=lambda: now[0], sleep=fake_sleep) == 12.0  # 5 + 5 + 2, then training goes on


def test_batch_size_halves_after_each_oom_until_the_minimum():
    sizes = [64]
    while (nxt := b.next_batch_size_after_oom(sizes[-1])) is not None:
        sizes.append(nxt)
    assert sizes == [64, 32, 16, 8, 4, 2, 1]
    assert b.next_batch_size_after_oom(10, minimum=8) == 8
    assert b.next_batch_size_after_oom(8, minimum=8) is None
    assert b.next_batch_size_after_oom(3) == 1
    assert b.next_batch_size_after_oom(100, factor=0.75) == 75
    with pytest.raises(ValueError, match="batch size 0"):
        b.next_batch_size_after_oom(0)
    with pytest.raises(ValueError, match=r"factor 1\.0"):
        b.next_batch_size_after_oom(8, factor=1.0)

"""The trainer sandbox: a child process (in the trainer cgroup where delegated) whose death spares the agent."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance import budget as b

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]

# -- callables run in the child (module level: they are pickled by reference) ------------------------------


def child_pid_and_sum(values: list[int], scale: int = 1) -> tuple[int, int]:
    return os.getpid(), sum(values) * scale


def raise_value_error() -> None:
    raise ValueError("learning rate must be positive")


def fail_reading_from_a_dying_card() -> None:
    try:
        raise OSError(errno.EIO, os.strerror(errno.EIO), "/var/lib/fl-agent/models/x.flpkg")
    except OSError:
        raise ValueError("cannot read the model package: Input/output error") from None


def return_unpicklable():
    return lambda: None


def kill_myself() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def exit_without_result() -> None:
    os._exit(3)


def record_oom_kill_then_die(events_file: str) -> None:
    """What the kernel does on an OOM kill in the trainer cgroup: count it in memory.events, SIGKILL."""
    Path(events_file).write_text("low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n")
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_long() -> None:
    time.sleep(60)


def allocate(nbytes: int) -> int:
    data = b"\x01" * nbytes  # touches every page, so it is charged to the cgroup
    return len(data)


ADVISORY = b.Budget(cpu_quota=None, threads=1, memory_max=None, memory_high=None, delegated=False,
                    advisory=True, reason="test: no cgroup")


# -- advisory (any host) ------------------------------------------------------------------------------------


def test_advisory_sandbox_runs_the_work_in_a_child_process_and_returns_the_result():
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=64 * MiB)
    pid, total = sandbox.run(child_pid_and_sum, [1, 2, 3], scale=10)
    assert total == 60
    assert pid != os.getpid()
    assert sandbox.trainer_cgroup is None


def test_an_exception_in_the_training_callable_comes_back_with_its_traceback():
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None)
    with pytest.raises(b.TrainerFailed, match="ValueError: learning rate must be positive") as err:
        sandbox.run(raise_value_error)
    assert "raise_value_error" in err.value.child_traceback
    assert err.value.child_errno is None


def test_the_errno_behind_a_training_failure_comes_back_with_it():
    """An EIO reading from the card, even behind the error it was turned into (``raise ... from None``): what tells
    the agent the card failed, not the model (tests/test_agent_trainer_storage.py)."""
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None)
    with pytest.raises(b.TrainerFailed, match="ValueError: cannot read the model package") as err:
        sandbox.run(fail_reading_from_a_dying_card)
    assert err.value.child_errno == errno.EIO


def test_an_unpicklable_result_is_a_training_failure_not_a_kill():
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None)
    with pytest.raises(b.TrainerFailed, match="cannot send the result back"):
        sandbox.run(return_unpicklable)


@pytest.mark.parametrize("start_method", ["spawn", "forkserver"])
def test_a_sigkilled_trainer_raises_trainer_killed_and_the_agent_goes_on(start_method):
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None, start_method=start_method)
    with pytest.raises(b.TrainerKilled) as err:
        sandbox.run(kill_myself)
    assert err.value.signal_number == signal.SIGKILL
    assert err.value.oom  # no cgroup to ask: a SIGKILL is most likely the OOM killer
    assert "advisory" in err.value.evidence
    assert sandbox.oom_kills == 1
    # The parent (this process) is alive and the next run, with a smaller batch, works.
    batch = b.next_batch_size_after_oom(32)
    assert sandbox.run(child_pid_and_sum, list(range(batch)))[1] == sum(range(16))


def test_a_trainer_exiting_without_a_result_is_not_counted_as_oom():
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None)
    with pytest.raises(b.TrainerKilled, match="exited with status 3") as err:
        sandbox.run(exit_without_result)
    assert not err.value.oom and err.value.exitcode == 3 and sandbox.oom_kills == 0


def test_a_trainer_past_its_timeout_is_killed():
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"within 1\.0 s"):
        sandbox.run(sleep_long, timeout=1.0)
    assert time.monotonic() - started < 30


def test_a_trainer_given_weeks_runs_and_returns_its_result():
    """A round whose deadline is weeks away (``--round-timeout`` of a month, or a deadline a hostile aggregator put
    centuries ahead): the trainer is given until then, and waiting that long is no OverflowError ending the agent."""
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None)
    for timeout in (30 * 86400.0, 2.0**40, float("inf")):
        assert sandbox.run(child_pid_and_sum, [1, 2, 3], timeout=timeout)[1] == 6


def test_a_long_timeout_waited_in_slices_still_kills_the_trainer_at_its_end(monkeypatch):
    monkeypatch.setattr(b, "WAIT_SLICE_SECONDS", 0.3)
    sandbox = b.TrainerSandbox(ADVISORY, memory_max=None)
    with pytest.raises(TimeoutError, match=r"within 1\.0 s"):
        sandbox.run(sleep_long, timeout=1.0)


# -- delegated, on a fake cgroupfs tree ----------------------------------------------------------------------


def delegated_tree(tmp_path: Path) -> b.Budget:
    base = tmp_path / "fl-agent.service"
    base.mkdir()
    (base / "cgroup.controllers").write_text("cpu io memory pids\n")
    (base / "cgroup.subtree_control").write_text("\n")
    (base / "cgroup.procs").write_text(f"{os.getpid()}\n")
    trainer = base / "trainer"  # the kernel creates these files with the directory; the fake tree cannot
    trainer.mkdir()
    (trainer / "memory.swap.max").write_text("max\n")
    (trainer / "memory.oom.group").write_text("0\n")
    (trainer / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n")
    return b.Budget(cpu_quota=1.0, threads=1, memory_max=256 * MiB, memory_high=None, delegated=True,
                    advisory=False, reason="test", base=base)


def test_delegated_sandbox_sets_up_agent_leaf_controllers_and_trainer_limits(tmp_path):
    budget = delegated_tree(tmp_path)
    base = budget.base
    sandbox = b.TrainerSandbox(budget, memory_max=96 * MiB)
    pid, _ = sandbox.run(child_pid_and_sum, [1])
    assert (base / "agent" / "cgroup.procs").read_text() == str(os.getpid())  # the agent left the base
    assert (base / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    trainer = base / "trainer"
    assert (trainer / "memory.max").read_text() == str(96 * MiB)
    assert (trainer / "memory.swap.max").read_text() == "0"
    assert (trainer / "memory.oom.group").read_text() == "1"
    assert (trainer / "cgroup.procs").read_text() == str(pid)  # the child was placed before it worked


def test_delegated_oom_kill_is_recognised_from_memory_events(tmp_path):
    budget = delegated_tree(tmp_path)
    events = budget.base / "trainer" / "memory.events"
    sandbox = b.TrainerSandbox(budget, memory_max=96 * MiB)
    with pytest.raises(b.TrainerKilled, match="out of memory") as err:
        sandbox.run(record_oom_kill_then_die, str(events))
    assert err.value.oom and "oom_kill +1" in err.value.evidence and str(events) in err.value.evidence
    assert sandbox.oom_kills == 1


def test_delegated_sigkill_without_oom_event_is_not_an_oom(tmp_path):
    """Killed by an operator, not the kernel: memory.events says so, so the batch is not shrunk."""
    sandbox = b.TrainerSandbox(delegated_tree(tmp_path), memory_max=96 * MiB)
    with pytest.raises(b.TrainerKilled, match="not an out-of-memory kill") as err:
        sandbox.run(kill_myself)
    assert err.value.signal_number == signal.SIGKILL and not err.value.oom and sandbox.oom_kills == 0


def test_a_failed_cgroup_setup_names_the_file_and_is_retried_next_run(tmp_path):
    budget = delegated_tree(tmp_path)
    blocker = budget.base / "trainer" / "memory.max"
    blocker.mkdir()  # writing it fails, as a read-only or foreign-owned file would
    sandbox = b.TrainerSandbox(budget, memory_max=96 * MiB)
    with pytest.raises(b.CgroupSetupError, match=rf"cannot write '{96 * MiB}' to {blocker}"):
        sandbox.run(child_pid_and_sum, [1])
    blocker.rmdir()
    assert sandbox.run(child_pid_and_sum, [2])[1] == 2
    assert blocker.read_text() == str(96 * MiB)


def test_bad_trainer_memory_limit_or_preload_is_refused():
    with pytest.raises(ValueError, match="memory_max must be positive"):
        b.TrainerSandbox(ADVISORY, memory_max=0)
    with pytest.raises(ValueError, match="preload needs the forkserver start method, not 'spawn'"):
        b.TrainerSandbox(ADVISORY, memory_max=None, preload=["json"])


# -- a real cgroup v2 with the memory controller (the QEMU guest; not this hybrid host) ---------------------


def _real_cgroup_root() -> Path:
    mount = b.find_cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup v2 hierarchy is mounted on this host")
    root = mount[0]
    controllers = b.Cgroup(root).controllers()
    if "memory" not in controllers:
        pytest.skip(f"cgroup v2 at {root} has no memory controller (controllers: {' '.join(sorted(controllers))})"
                    ": a hybrid v1/v2 host keeps memory on v1; this test runs where v2 has it (the QEMU guest)")
    if os.geteuid() != 0 or not os.access(root, os.W_OK):
        pytest.skip(f"creating a test cgroup under {root} needs root")
    return root


def real_oom_main(base: str) -> None:
    """Subprocess body: become the 'agent' in a fresh delegated cgroup, OOM the trainer, survive, report."""
    Path(base, "cgroup.procs").write_text("0")
    budget = b.read_budget()
    assert budget.delegated, budget.reason
    sandbox = b.TrainerSandbox(budget, memory_max=64 * MiB)
    report: dict[str, object] = {"base": str(budget.base)}
    try:
        sandbox.run(allocate, 512 * MiB)
        report["killed"] = False
    except b.TrainerKilled as exc:
        report.update(killed=True, oom=exc.oom, evidence=exc.evidence, signal=exc.signal_number)
    report["after"] = sandbox.run(allocate, 8 * MiB)  # the agent lives on and trains smaller
    print(json.dumps(report))


def test_real_trainer_oom_is_contained_in_its_cgroup():
    root = _real_cgroup_root()
    if "memory" not in b.Cgroup(root).subtree_control():
        (root / "cgroup.subtree_control").write_text("+memory")
    base = root / f"fl-test-{os.getpid()}"
    base.mkdir()
    try:
        code = f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); import test_budget_sandbox as t; " \
               f"t.real_oom_main({str(base)!r})"
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        assert done.returncode == 0, done.stderr  # the agent process survived its trainer's OOM
        report = json.loads(done.stdout.splitlines()[-1])
        assert report["base"] == str(base)
        assert report["killed"] and report["oom"] and report["signal"] == signal.SIGKILL, report
        assert report["after"] == 8 * MiB
    finally:
        for leaf in ("trainer", "agent", ""):
            directory = base / leaf if leaf else base
            for _ in range(50):  # processes leave a cgroup asynchronously after they exit
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)

"""Mutation score of one critical module: how many small bugs put into it its tests catch.

    .venv/bin/python bench/mutation.py appliance/wire.py [--tests tests/test_wire_messages.py ...]
                                      [--max-children 2] [--keep DIR] [--list]

A figure to watch, not a CI gate. It runs mutmut (the ``[dev]`` extra) over the module with the fast test files
that defend it (:data:`MODULES`; ``--tests`` replaces them), in a scratch copy of the working tree, so the tree
other people edit is never mutated. mutmut maps each test to the functions it runs, then for each mutant (an
operator, constant or call changed in one function) runs only the tests that reach that function, stopping at
the first failure. It prints killed, survived, timeouts and mutants no selected test reaches, and the score:
killed (timeouts included: the mutant hung the tests) over all mutants. ``--list`` also prints each survivor
(``mutmut show NAME`` in the kept directory shows its diff). Tests marked ``slow`` or ``qemu`` are left out: the
QEMU power-cut tests defend the fsyncs that the fast tests only see as calls.

Minutes on 2 shared cores: outbox.py about 7, wire.py about 55; the others longer (their tests run servers,
agents and trainer processes). Figures and how to run each: docs/CONTRACTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: The critical modules and the fast test files that defend each.
MODULES: dict[str, list[str]] = {
    "appliance/wire.py": [
        "tests/test_wire_envelope.py", "tests/test_wire_messages.py", "tests/test_wire_tensors.py",
        "tests/test_wire_rounding.py", "tests/test_wire_tamper.py", "tests/test_wire_cose_interop.py",
    ],
    "appliance/outbox.py": ["tests/test_outbox_queue.py", "tests/test_outbox_crash.py", "tests/test_outbox_fsync.py"],
    "aggregator/rounds.py": [
        "tests/test_aggregator_rounds.py", "tests/test_aggregator_rejections.py", "tests/test_aggregator_hostile.py",
        "tests/test_aggregator_fsync.py",
    ],
    "aggregator/store.py": [
        "tests/test_aggregator_fsync.py", "tests/test_aggregator_rounds.py", "tests/test_aggregator_durability.py",
    ],
    "appliance/agent.py": [
        "tests/test_agent_loop.py", "tests/test_agent_receipts.py", "tests/test_agent_oom.py",
        "tests/test_agent_real_aggregator.py", "tests/test_agent_clock.py",
    ],
    "appliance/trainer.py": ["tests/test_trainer_training.py", "tests/test_trainer_memory.py"],
}
#: What the tests import besides the module's own package (copied into mutmut's tree unmutated).
ALSO_COPY = ["appliance", "aggregator", "tools", "docs", "rootfs-overlay"]


def working_tree_files() -> list[str]:
    """Tracked and new (not ignored) files of the working tree: what the tests see."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def scratch_copy(target: Path) -> None:
    for name in working_tree_files():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, destination)


def mutmut_config(module: str, tests: list[str]) -> str:
    package = module.split("/", 1)[0]
    lines = [
        "[mutmut]",
        f"source_paths = {package}",
        f"only_mutate = {module}",
        "also_copy =", *(f"    {path}" for path in ALSO_COPY if path != package),
        "pytest_add_cli_args_test_selection =", *(f"    {test}" for test in tests),
        "pytest_add_cli_args =", "    -p", "    no:cacheprovider", "    -m", "    not slow and not qemu",
    ]
    return "\n".join(lines) + "\n"


def mutmut(scratch: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).with_name("mutmut")
    if not executable.exists():
        sys.exit(f"error: {executable} not found: install the dev extra (pip install -e '.[dev]')")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([str(executable), *args], cwd=scratch, env=env, capture_output=True, text=True,
                          check=check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help=f"one of: {', '.join(MODULES)} (or any module, with --tests)")
    parser.add_argument("--tests", nargs="+", help="test files to run (default: the module's fast tests)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (mutmut show, browse)")
    parser.add_argument("--list", action="store_true", help="print the surviving mutants' names")
    args = parser.parse_args(argv)

    tests = args.tests or MODULES.get(args.module)
    if tests is None:
        parser.error(f"no default tests for {args.module}: give --tests")
    if not (REPO / args.module).is_file():
        parser.error(f"{args.module}: no such module in {REPO}")
    missing = [test for test in tests if not (REPO / test).is_file()]
    if missing:
        parser.error(f"no such test file: {', '.join(missing)}")

    scratch = args.keep or Path(tempfile.mkdtemp(prefix="fl-mutation-"))
    if args.keep and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"{args.keep} is not empty")
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        scratch_copy(scratch)
        (scratch / "setup.cfg").write_text(mutmut_config(args.module, tests))
        started = time.monotonic()
        run = mutmut(scratch, "run", "--max-children", str(args.max_children), check=False)
        minutes = (time.monotonic() - started) / 60
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"error: mutmut run failed (exit {run.returncode})", file=sys.stderr)
            return 1
        mutmut(scratch, "export-cicd-stats")
        stats = json.loads((scratch / "mutants" / "mutmut-cicd-stats.json").read_text())
        killed = stats["killed"] + stats["timeout"]
        print(f"module {args.module}: {stats['total']} mutants, tests: {' '.join(tests)}")
        print(f"killed {stats['killed']}  timeout {stats['timeout']}  survived {stats['survived']}  "
              f"no_tests {stats['no_tests']}  suspicious {stats['suspicious']}  skipped {stats['skipped']}")
        score = killed / stats["total"] if stats["total"] else float("nan")
        print(f"score {score:.1%} (killed + timeout over all mutants)  in {minutes:.1f} min")
        if args.list:
            print(mutmut(scratch, "results").stdout, end="")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

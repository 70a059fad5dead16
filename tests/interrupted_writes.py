"""A real process in the middle of ``durable.atomic_write``: killed with SIGKILL there, it leaves its temp file as a
power cut would (minus the page cache, which does not matter to a sweep: the name is what is swept); left alive,
it holds the temp file's lock as every writer does."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from appliance.durable import TEMP_SUFFIX

ROOT = Path(__file__).resolve().parents[1]
HALF = 1 << 20

WRITER = textwrap.dedent("""
    import sys
    from appliance.durable import atomic_write

    def parts():
        yield b"x" * int(sys.argv[2])
        print("half written", flush=True)
        sys.stdin.readline()  # the test says when to go on (or kills it here)
        yield b"y" * int(sys.argv[2])

    atomic_write(sys.argv[1], parts())
""")


class Writer:
    """A process in the middle of atomic_write(path): half of its data written, waiting for :meth:`finish`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.process = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(HALF)], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None and self.process.stdout.readline() == "half written\n"

    def temp_files(self) -> list[Path]:
        return sorted(self.path.parent.glob(f".{self.path.name}.*{TEMP_SUFFIX}"))

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def finish(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        assert self.process.wait(timeout=60) == 0


def killed_write(path: Path) -> list[Path]:
    """What a write of ``path`` killed halfway leaves beside it: its temp file."""
    writer = Writer(path)
    writer.kill()
    return writer.temp_files()


@contextlib.contextmanager
def live_write(path: Path) -> Iterator[Writer]:
    """A write of ``path`` under way, halfway through, until :meth:`Writer.finish` (killed if the block leaves
    it unfinished)."""
    writer = Writer(path)
    try:
        yield writer
    finally:
        if writer.process.poll() is None:
            writer.kill()

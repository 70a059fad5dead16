"""How flctl's long-running commands (``flctl demo``, ``flctl qemu run``) end, whatever ends them.

Ctrl-C raises KeyboardInterrupt; ``timeout``, systemd and CI runners send SIGTERM, a closed terminal SIGHUP.
``stop_on_signals`` turns the latter two into ``StopRequested`` in the main thread, so the same ``finally``
that handles Ctrl-C stops the command's processes (a Python process killed by SIGTERM runs no ``finally``,
and the aggregator, agents or guests it started in their own sessions kept running). What no handler can
catch (SIGKILL, a crash) is covered by ``dies_with_parent``: the child gets SIGTERM from the kernel when
flctl is gone.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class StopRequested(BaseException):
    """A signal asked the command to stop. A BaseException, so ``except Exception`` does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal (143 for SIGTERM), for a stop that went as asked."""
        return 128 + self.signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``StopRequested`` (the previous handlers come back after)."""

    def _raise(signum: int, _frame: object) -> None:
        raise StopRequested(signum)

    previous = {sig: signal.signal(sig, _raise) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def dies_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` run so that the kernel sends it SIGTERM when the process that started it dies.

    ``setpriv --pdeathsig`` (util-linux) sets PR_SET_PDEATHSIG and execs ``cmd`` in the same process, so the
    child's pid is the one Popen returns. Without setpriv the command runs as it is.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return cmd
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd]

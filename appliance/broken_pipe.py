"""Command-line tools whose reader goes away (``fl-aggregator status | head``) end quietly, as ``cat`` does.

Python ignores SIGPIPE, so a write to a closed pipe raises BrokenPipeError, usually when stdout is flushed at exit:
a traceback, or an "Exception ignored" message, after output the user asked to cut short.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

#: What a shell reports for a command that SIGPIPE ended (128 + 13).
EXIT_BROKEN_PIPE = 141


def quiet_on_broken_pipe(command: Callable[[], int]) -> int:
    """``command()``'s exit code, with its output flushed; EXIT_BROKEN_PIPE, silently, when the reader is gone.
    The command may parse its arguments too: ``--help`` ends in SystemExit, and its output is flushed all the same."""
    try:
        try:
            return command()
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # The interpreter flushes stdout once more at exit: point it at /dev/null so that flush has nowhere to fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE

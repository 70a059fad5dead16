"""The aggregator's threads under their own names in the kernel, where ``top -H``, ``ps -L``, ``perf`` and
bench/aggregator.py's CPU breakdown (``/proc/<pid>/task/<tid>/comm``) can tell them apart.

Python 3.11 names a thread only inside the interpreter: to the kernel every thread is called like the process.
The kernel's name holds at most 15 bytes.
"""

from __future__ import annotations

import ctypes
import threading

_PR_SET_NAME = 15
_libc = ctypes.CDLL(None, use_errno=True)


def name_this_thread() -> None:
    """Give the calling thread its Python name as its kernel name (an executor's initializer, or a thread's first
    call)."""
    _libc.prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)

"""Writes the data partition refuses: full, over quota, gone read-only, failing.

An appliance's data partition (an SD card) fills up in the field (frames, logs, other services), and a card that
hits errors is remounted read-only by the kernel. A write refused for one of these reasons says nothing about the
agent: ending it would only make systemd restart it into the same refusal, in a loop that also stops its heartbeats.
So the agent gives up what needed the write (a round), says so in one log line and a metric, and tries again
later. Any other ``OSError`` (a missing directory, a permission) is a fault of the image or the code and still ends
the agent.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

# errno -> the reason counted in fl_agent_storage_errors_total and fl_agent_rounds_skipped_total (few values:
# an operator alerts on them).
STORAGE_ERRNO_REASONS: dict[int, str] = {
    errno.ENOSPC: "disk-full",
    errno.EDQUOT: "disk-full",
    errno.EROFS: "read-only",
    errno.EIO: "io-error",
}
STORAGE_REASONS: tuple[str, ...] = tuple(dict.fromkeys(STORAGE_ERRNO_REASONS.values()))


def storage_reason(exc: BaseException) -> str | None:
    """The reason when ``exc`` is a write the data partition refused, else None."""
    return STORAGE_ERRNO_REASONS.get(exc.errno) if isinstance(exc, OSError) and exc.errno is not None else None


class StorageFailure(Exception):
    """``what`` could not be stored (or, ``doing``, read or trained on) in the directory ``where``: the partition
    refused it (``reason``)."""

    def __init__(self, what: str, where: Path, error: OSError, reason: str, *, doing: str = "store"):
        super().__init__(f"cannot {doing} {what} in {where}: {error.strerror or error}")
        self.what = what
        self.where = where
        self.error = error
        self.reason = reason


@contextlib.contextmanager
def storing(what: str, where: Path) -> Iterator[None]:
    """Raise a storage error from the block as a :class:`StorageFailure` naming ``what`` and ``where``; any other
    exception passes unchanged."""
    try:
        yield
    except OSError as exc:
        reason = storage_reason(exc)
        if reason is None:
            raise
        raise StorageFailure(what, where, exc, reason) from exc

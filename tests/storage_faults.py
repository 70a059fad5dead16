"""A data partition that refuses writes, for the agent's storage tests (tests/test_agent_disk_full.py,
tests/test_secagg_agent_disk_full.py, tests/test_cameras_disk_full.py): the fsync or the write of a file in one
directory fails with ENOSPC, EROFS or EIO while the test says the partition is full, as a full ext4 with delayed
allocation or a card remounted read-only refuses it. And a stand-in for the agent's training, so those tests run
without a trainer process."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from appliance import modelpkg, wire
from appliance.agent import Agent


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class FullDirectory:
    """While ``full``, the fsync of any file in ``directory`` (not of a directory) whose path ``matches`` fails with
    ``error``: the write did not fit. ``refused`` counts the refusals."""

    def __init__(self, directory: Path, error: int = errno.ENOSPC, matches: Callable[[str], bool] = lambda p: True):
        self.directory = str(directory)
        self.error = error
        self.matches = matches
        self.full = True
        self.refused = 0
        self.fsync = os.fsync

    def __call__(self, fd: int) -> None:
        path = fd_path(fd)
        if self.full and os.path.dirname(path) == self.directory and self.matches(path) \
                and stat.S_ISREG(os.fstat(fd).st_mode):
            self.refused += 1
            raise OSError(self.error, os.strerror(self.error))
        self.fsync(fd)


class FullDirectoryWrites:
    """As :class:`FullDirectory`, for ``os.write``: the frame buffer does not fsync, so its write is what fails."""

    def __init__(self, directory: Path, error: int = errno.ENOSPC):
        self.directory = str(directory)
        self.error = error
        self.full = True
        self.refused = 0
        self.write = os.write

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        if self.full and os.path.dirname(fd_path(fd)) == self.directory:
            self.refused += 1
            raise OSError(self.error, os.strerror(self.error))
        return self.write(fd, data)


async def trained(self: Agent, task: wire.Task, package: modelpkg.ModelPackage,
                  release: wire.ModelRelease) -> wire.Update:
    """A stand-in for the agent's training: an update of the task's shapes at once, without a trainer process."""
    delta = {s.name: np.full(s.shape, 0.01, np.float32) for s in package.param_specs}
    return wire.Update(self.identity.device_id, task.round_id, task.model_version, task.model_digest, 64, delta)


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages the agent (``fl_agent`` and the appliance package's loggers) logged at ERROR or above. Other
    loggers' records are left out: asyncio's "Unclosed client session" for a session an earlier test leaked is
    logged whenever the garbage collector finds it, which can be in the middle of this test."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("fl_agent", "appliance")]

"""Trainer entry points for the agent's memory and storage tests: they note each training run; one is killed the way
the kernel's OOM killer kills (SIGKILL) while its batch is large, one reads from a card that fails once.

They run in the trainer child, forked by the agent's fork server, which imports them by name: so they live in
this small module (no test framework, no torch) rather than in a test file. Each run is noted as one line in
a file beside the agent's state directory (the test writes its own events to the same file), so the order of
the lines is the order things happened in, across processes.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

from appliance.training_job import TrainJob, run_train_job
from appliance.training_result import TrainResult

#: A batch larger than this "does not fit in memory".
FITS_IN_MEMORY = 8


def events_file(state_dir: Path | str) -> Path:
    return Path(state_dir).parent / "trainer-events"


def note(state_dir: Path | str, event: str) -> None:
    with open(events_file(state_dir), "a") as f:
        f.write(event + "\n")


def events(state_dir: Path | str) -> list[str]:
    path = events_file(state_dir)
    return path.read_text().splitlines() if path.exists() else []


def train_noted(job: TrainJob) -> TrainResult:
    """The real training run, noted as ``train <batch size>`` when it starts."""
    note(job.state_dir, f"train {job.batch_size}")
    return run_train_job(job)


def train_or_be_killed_for_memory(job: TrainJob) -> TrainResult:
    """Noted, then SIGKILLed (as by the OOM killer) when the batch exceeds :data:`FITS_IN_MEMORY`."""
    note(job.state_dir, f"train {job.batch_size}")
    if job.batch_size > FITS_IN_MEMORY:
        os.kill(os.getpid(), signal.SIGKILL)
    return run_train_job(job)


def train_on_a_card_failing_once(job: TrainJob) -> TrainResult:
    """The first run reads its model package from a card that fails the read (EIO, as a dying SD card does), noted as
    ``card failed``; later runs (the card answering again) are real."""
    if "card failed" not in events(job.state_dir):
        note(job.state_dir, "card failed")

        def failing_read(path: Path) -> bytes:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

        Path.read_bytes = failing_read  # this trainer child only: each run is a new process
    return run_train_job(job)


def train_on_frames_the_card_fails(job: TrainJob) -> TrainResult:
    """Every read of a frame buffer segment fails (EIO, a dying SD card), noted as ``frames failed``; the package
    reads as usual."""
    note(job.state_dir, "frames failed")
    read_bytes = Path.read_bytes

    def failing_segment_read(path: Path) -> bytes:
        if path.suffix == ".fls":
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return read_bytes(path)

    Path.read_bytes = failing_segment_read  # this trainer child only: each run is a new process
    return run_train_job(job)

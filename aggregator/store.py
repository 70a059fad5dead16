"""Durable state: SQLite (WAL) for devices, rounds, models and receipts, plus an append-only update spool.

Each round has one spool segment, ``spool/round-<id>.seg``: every accepted update is appended there as its
flat float32 delta (the model's :class:`~aggregator.models.Layout`). A dedicated writer thread takes all
uploads waiting at that moment, appends them, ``fdatasync``\\ s each touched segment once, then records them in
SQLite in one transaction (``synchronous=FULL``) — group commit, so many concurrent uploads share one fsync.
Only after that commit does the caller get its receipt. On restart the segment is cut back to the end of the
last committed record, so bytes written by a killed process that never got a receipt are forgotten; a committed
record that is not wholly there (a disk that lost data it had reported written) takes its update out of the
round rather than being read as zeros (:meth:`Store.recover_segment`), and so is one whose bytes on disk no longer
match the check its row carries (a signed digest its record rebuilds, or a CRC-32: :mod:`aggregator.record_checks`).

Records start at multiples of :data:`SPOOL_ALIGNMENT` and are padded with zeros to the next one, so they are
written with direct I/O (``O_DIRECT``): the disk reads them from the delta's own memory, and the CPU does not
copy 4 bytes per parameter into the page cache (measured: ~0.4 ms instead of 1-4 ms per 4 MB update; the
fdatasync then waits for the same disk either way). Where the filesystem refuses direct I/O (tmpfs, say) the
same records are written through the page cache.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.disk_writes import WritesUnderWay
from aggregator.record_checks import CHECK_KINDS, RecordCheck, TensorSection, crc32_check, record_intact
from aggregator.threadnames import name_this_thread
from appliance.durable import fsync_dir

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id   TEXT PRIMARY KEY,
    public_key  BLOB NOT NULL,
    name        TEXT NOT NULL DEFAULT '',
    enrolled_at REAL NOT NULL,
    revoked_at  REAL
);
-- Enrolled keys that are site aggregators (enroll --site): their update carries the sum of their devices'
-- samples, so the per-device --max-samples does not apply to it.
CREATE TABLE IF NOT EXISTS sites (
    device_id TEXT PRIMARY KEY REFERENCES devices (device_id)
);
CREATE TABLE IF NOT EXISTS rounds (
    round_id      INTEGER PRIMARY KEY,
    model_version INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('open', 'published', 'abandoned', 'superseded')),
    opened_at     REAL NOT NULL,
    deadline      REAL NOT NULL,
    goal          INTEGER NOT NULL,
    closed_at     REAL,
    participants  INTEGER NOT NULL DEFAULT 0,
    samples       INTEGER NOT NULL DEFAULT 0,
    metrics       TEXT NOT NULL DEFAULT '{}',
    note          TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS updates (
    digest      BLOB PRIMARY KEY,
    device_id   TEXT NOT NULL,
    round_id    INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    metrics     TEXT NOT NULL,
    offset      INTEGER NOT NULL,
    length      INTEGER NOT NULL,
    receipt     BLOB NOT NULL,
    accepted_at REAL NOT NULL,
    check_kind  TEXT NOT NULL DEFAULT '',
    check_value BLOB,
    UNIQUE (device_id, round_id)
);
CREATE INDEX IF NOT EXISTS updates_by_round ON updates (round_id);
-- Acknowledged updates whose spool records were not wholly on disk when their round resumed, or failed their check
-- (the disk lost or changed data it had reported written): moved here out of ``updates``, so they are not aggregated
-- and their receipts are withdrawn.
CREATE TABLE IF NOT EXISTS lost_updates (
    digest      BLOB NOT NULL,
    device_id   TEXT NOT NULL,
    round_id    INTEGER NOT NULL,
    num_samples INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    lost_at     REAL NOT NULL,
    cause       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS lost_updates_by_round ON lost_updates (round_id);
-- Acknowledged masked inputs of a secure round that its sum does not include (aggregator/secagg_round.py: named for
-- bad shares, too few holders left, or stored after the masked phase ended), with why: their updates rows stay (the
-- receipt, the record a resumed round subtracts), but the round's devices are the others.
CREATE TABLE IF NOT EXISTS left_out_updates (
    round_id  INTEGER NOT NULL,
    device_id TEXT NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (round_id, device_id)
);
CREATE TABLE IF NOT EXISTS models (
    version    INTEGER PRIMARY KEY,
    digest     BLOB NOT NULL,
    round_id   INTEGER,
    created_at REAL NOT NULL
);
"""


#: Spool records start at multiples of this many bytes and are zero-padded to the next one (direct I/O needs
#: whole aligned blocks from aligned memory; 4096 covers every logical block size in use).
SPOOL_ALIGNMENT = 4096


def spool_vector(size: int) -> np.ndarray:
    """An uninitialised float32 vector of ``size`` values at an address the spool can write from directly.

    A delta decoded into one of these goes to disk without being copied; any other array is first copied into
    the writer's own aligned buffer.
    """
    raw = np.empty(4 * size + SPOOL_ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % SPOOL_ALIGNMENT
    return raw[start : start + 4 * size].view(np.float32)


def _padded(size: int) -> int:
    return -(-size // SPOOL_ALIGNMENT) * SPOOL_ALIGNMENT


def _record_bytes(delta: np.ndarray) -> np.ndarray:
    """The bytes of a delta's spool record (no copy of a contiguous float32 vector)."""
    return np.ascontiguousarray(delta, dtype="<f4").reshape(-1).view(np.uint8)


@dataclass
class _Segment:
    """An open spool segment: where the next record goes, and whether it is written with direct I/O."""

    fd: int
    size: int
    direct: bool


class StoreError(Exception):
    """The state directory cannot be used; the message says why."""


class DuplicateUpdate(Exception):
    """Another update of the same device for the same round was committed first."""


@dataclass(frozen=True)
class Device:
    device_id: str
    public_key: bytes
    name: str
    enrolled_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class RoundRow:
    round_id: int
    model_version: int
    status: str
    opened_at: float
    deadline: float
    goal: int
    closed_at: float | None
    participants: int
    samples: int
    metrics: dict[str, float]
    note: str


@dataclass(frozen=True)
class UpdateRow:
    digest: bytes
    device_id: str
    round_id: int
    num_samples: int
    metrics: dict[str, float]
    offset: int
    length: int
    accepted_at: float
    #: What the record must match at resume; None in a row written before records had checks.
    check: RecordCheck | None = None


@dataclass(frozen=True)
class SpoolRecovery:
    """What :meth:`Store.recover_segment` found in a resuming round's segment and did about it."""

    #: Bytes cut from the segment's end: an append that got no receipt, or what was left of a lost record.
    cut_bytes: int
    #: Acknowledged updates whose records were not wholly on disk, taken out of the round.
    lost: list[UpdateRow]
    #: Why they were lost: ``segment-short`` or ``segment-missing`` (one of :data:`SPOOL_LOSS_CAUSES`); '' if none.
    cause: str
    #: Acknowledged updates whose records were whole but failed their check (cause ``record-corrupt``), taken out too.
    corrupt: list[UpdateRow] = field(default_factory=list)


#: Why acknowledged updates can be missing from the spool at a restart (the label of the lost-updates counter).
SPOOL_LOSS_CAUSES = ("segment-short", "segment-missing", "record-corrupt")


@dataclass
class SpoolJob:
    """One accepted update waiting for the group commit."""

    digest: bytes
    device_id: str
    round_id: int
    num_samples: int
    metrics: dict[str, float]
    delta: np.ndarray
    receipt: bytes
    accepted_at: float
    future: Future = field(default_factory=Future)
    offset: int = -1
    #: Called on the writer thread once the job is committed, before the caller hears of it (e.g. FedAvg's
    #: in-place accumulation, so it costs no extra thread hand-off). An error here fails only this job.
    then: Callable[[], None] | None = None
    #: What the record must match at resume: a signed digest its bytes rebuild; None, and the writer takes a CRC-32.
    check: RecordCheck | None = None


@dataclass(frozen=True)
class _DroppedSegment:
    """A closed round's segment for the writer to close, in turn (:meth:`Store.drop_segment`)."""

    round_id: int


def _allow_superseded_rounds(conn: sqlite3.Connection) -> None:
    """A state directory written before rounds could be ``superseded`` has the old CHECK on ``rounds.status``;
    SQLite cannot alter a CHECK, so the table is rebuilt (same columns, same rows) in one transaction."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type='table' AND name='rounds'").fetchone()
    if "'superseded'" in row[0]:
        return
    create = SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS rounds"):]
    create = create[:create.index(");") + 2].replace("IF NOT EXISTS rounds", "rounds_new")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(create)
        conn.execute("INSERT INTO rounds_new SELECT * FROM rounds")
        conn.execute("DROP TABLE rounds")
        conn.execute("ALTER TABLE rounds_new RENAME TO rounds")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _unverifiable(check: RecordCheck | None) -> bool:
    """Whether this version cannot verify a record against ``check``: its kind is unknown, or its value is missing
    (no kind has an empty value; a row read with a NULL or non-BLOB value gets ``b""``, see :meth:`Store._update`)."""
    return check is not None and (check.kind not in CHECK_KINDS or not check.value)


def _unverifiable_checks(round_id: int, rows: list[UpdateRow]) -> str:
    """Why a round with records whose checks this version cannot verify does not resume, in one line.

    Such a row comes from a newer aggregator (started on this state directory, then downgraded) or is damaged. Its
    record is most likely intact; taking its update out of the round would withdraw a receipt whose device has
    deleted the update, for good, and the newer version could no longer count it. So nothing is changed and the
    operator chooses: the version that wrote the rows, or resuming those records unchecked (docs/aggregator.md)."""
    named = ", ".join(f"device {r.device_id} check kind {r.check.kind!r}" + ("" if r.check.value else
                      " without its value") for r in rows if r.check is not None)
    return (f"round {round_id}: {len(rows)} acknowledged updates have spooled records whose check this fl-aggregator "
            f"cannot verify ({named}; it knows {', '.join(sorted(CHECK_KINDS))}): the database was written by a "
            "newer fl-aggregator, or these rows are damaged; nothing was changed, start the version that wrote "
            "them, or see \"Records of an unknown check kind\" in docs/aggregator.md")


def _add_record_checks(conn: sqlite3.Connection) -> None:
    """A state directory written before spooled records had checks lacks ``updates.check_kind``/``check_value``:
    the columns are added, in one transaction and each only if missing, and its rows keep no check (their records
    are resumed unchecked, as they were)."""
    added = {"check_kind": "TEXT NOT NULL DEFAULT ''", "check_value": "BLOB"}
    if added.keys() <= {row[1] for row in conn.execute("PRAGMA table_info(updates)")}:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(updates)")}  # another process may have added
        for name, declaration in added.items():
            if name not in columns:
                conn.execute(f"ALTER TABLE updates ADD COLUMN {name} {declaration}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn



class Store:
    """The aggregator's state directory: ``aggregator.db`` and ``spool/``."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.spool_dir = self.state_dir / "spool"
            self.spool_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{state_dir}: cannot create the state directory: {exc.strerror}") from None
        self.db_path = self.state_dir / "aggregator.db"
        if self.db_path.is_file() and self.db_path.stat().st_size == 0:  # SQLite would take it for a new database
            raise StoreError(f"{self.db_path} is empty (0 bytes), not an aggregator database: restore it from a "
                             "backup, or delete it to start a new one with no history")
        try:
            self._conn = _connect(self.db_path)
            self._conn.executescript(SCHEMA)
            _allow_superseded_rounds(self._conn)
            _add_record_checks(self._conn)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.db_path}: cannot open the database: {exc}") from None
        self._write_lock = threading.RLock()
        # The writes under way on this disk (the spool's, and those others run through :meth:`writing`), so that a
        # disk that stopped answering is seen by everything that would otherwise queue behind it.
        self.writes = WritesUnderWay()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._queue: queue.Queue[SpoolJob | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        # Committed batches go to a second thread that runs each job's ``then`` and answers the callers, so the
        # next batch's write and fsync overlap with this batch's accumulation.
        self._done: queue.Queue[list[tuple[SpoolJob, BaseException | None]] | None] = queue.Queue()
        self._finisher: threading.Thread | None = None
        self._segments: dict[int, _Segment] = {}  # round -> its open segment
        # The writer thread's aligned buffers: a record that does not start at an aligned address is copied into
        # ``_staging``; the last partial block of every record goes out through ``_tail``, padded with zeros.
        self._staging = spool_vector(0).view(np.uint8)
        self._tail = spool_vector(SPOOL_ALIGNMENT // 4).view(np.uint8)

    # ------------------------------------------------------------------------------------------ plumbing

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.db_path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Inside, this thread's reads (every method here that reads) see one committed state of the database: a
        count and the page read after it agree while the writer commits updates (one read transaction)."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield
        finally:
            conn.execute("COMMIT")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._write_lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self, timeout: float | None = None) -> bool:
        """Close the state, after the spool's writes under way: waiting for them ``timeout`` seconds at most (None:
        until they land). False when one has not returned by then (a disk that stopped answering): it is left behind
        with the segment files and the connection it writes through, and nothing it holds was acknowledged (its
        update is answered only once committed)."""
        stopped = self.stop_writer(timeout)
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        if not stopped:
            return False
        for segment in self._segments.values():
            os.close(segment.fd)
        self._segments.clear()
        self._conn.close()
        return True

    # ------------------------------------------------------------------------------------------- devices

    def enroll(self, device_id: str, public_key: bytes, name: str = "", site: bool = False) -> bool:
        """Add a device (``site``: a site aggregator); False when it was already enrolled with this key, as a site
        if ``site`` (enrolment is idempotent; enrolling a device again with ``site`` makes it one)."""
        with self._transaction() as db:
            row = db.execute("SELECT public_key, revoked_at FROM devices WHERE device_id=?", (device_id,)).fetchone()
            if row is not None:
                if row[1] is not None:
                    raise StoreError(f"device {device_id} was revoked; a revoked key cannot be enrolled again")
                if bytes(row[0]) != public_key:
                    raise StoreError(f"device {device_id} is enrolled with another key")
            else:
                db.execute(
                    "INSERT INTO devices (device_id, public_key, name, enrolled_at) VALUES (?, ?, ?, ?)",
                    (device_id, public_key, name, time.time()),
                )
            marked = site and db.execute("INSERT OR IGNORE INTO sites (device_id) VALUES (?)", (device_id,)).rowcount
            return row is None or bool(marked)

    def is_site(self, device_id: str) -> bool:
        """Whether ``device_id`` was enrolled as a site aggregator."""
        return self._reader().execute("SELECT 1 FROM sites WHERE device_id=?", (device_id,)).fetchone() is not None

    def revoke(self, device_id: str) -> bool:
        """Revoke a device; False when it was already revoked. Unknown ids are an error."""
        with self._transaction() as db:
            row = db.execute("SELECT revoked_at FROM devices WHERE device_id=?", (device_id,)).fetchone()
            if row is None:
                raise StoreError(f"no enrolled device {device_id}")
            if row[0] is not None:
                return False
            db.execute("UPDATE devices SET revoked_at=? WHERE device_id=?", (time.time(), device_id))
            return True

    def device(self, device_id: str) -> Device | None:
        row = self._reader().execute(
            "SELECT device_id, public_key, name, enrolled_at, revoked_at FROM devices WHERE device_id=?", (device_id,)
        ).fetchone()
        return Device(row[0], bytes(row[1]), row[2], row[3], row[4]) if row else None

    def site_ids(self) -> set[str]:
        """The enrolled keys marked as site aggregators (``enroll --site``)."""
        return {r[0] for r in self._reader().execute("SELECT device_id FROM sites").fetchall()}

    def site_last_updates(self) -> dict[str, tuple[float, int, bytes]]:
        """Each site aggregator's newest accepted update (its last forward): when it was accepted, the round it was
        taken into and its receipt, which names the round the site answered. Sites that never forwarded are absent.
        Read as those types whatever a damaged row holds (a receipt stored as text is bytes that do not verify)."""
        rows = self._reader().execute(
            "SELECT u.device_id, CAST(u.accepted_at AS REAL), CAST(u.round_id AS INTEGER), CAST(u.receipt AS BLOB) "
            "FROM sites s JOIN updates u "
            "ON u.device_id = s.device_id "
            "AND u.round_id = (SELECT max(round_id) FROM updates WHERE device_id = s.device_id)"
        ).fetchall()
        return {r[0]: (r[1], r[2], bytes(r[3])) for r in rows}

    def devices(self) -> list[Device]:
        rows = self._reader().execute(
            "SELECT device_id, public_key, name, enrolled_at, revoked_at FROM devices ORDER BY enrolled_at"
        ).fetchall()
        return [Device(r[0], bytes(r[1]), r[2], r[3], r[4]) for r in rows]

    def active_device_count(self) -> int:
        return self._reader().execute("SELECT count(*) FROM devices WHERE revoked_at IS NULL").fetchone()[0]

    # -------------------------------------------------------------------------------------------- models

    def add_model(self, version: int, digest: bytes, round_id: int | None, created_at: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO models (version, digest, round_id, created_at) VALUES (?, ?, ?, ?)",
                (version, digest, round_id, created_at),
            )

    def latest_model(self) -> tuple[int, bytes] | None:
        row = self._reader().execute("SELECT version, digest FROM models ORDER BY version DESC LIMIT 1").fetchone()
        return (row[0], bytes(row[1])) if row else None

    def model_digest(self, version: int) -> bytes | None:
        row = self._reader().execute("SELECT digest FROM models WHERE version=?", (version,)).fetchone()
        return bytes(row[0]) if row else None

    # -------------------------------------------------------------------------------------------- rounds

    @staticmethod
    def _round(row: tuple[Any, ...]) -> RoundRow:
        return RoundRow(
            round_id=row[0], model_version=row[1], status=row[2], opened_at=row[3], deadline=row[4], goal=row[5],
            closed_at=row[6], participants=row[7], samples=row[8], metrics=json.loads(row[9]), note=row[10],
        )

    _ROUND_COLUMNS = (
        "round_id, model_version, status, opened_at, deadline, goal, closed_at, participants, samples, metrics, note"
    )

    def open_round(self) -> RoundRow | None:
        row = self._reader().execute(
            f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE status='open' ORDER BY round_id DESC LIMIT 1"
        ).fetchone()
        return self._round(row) if row else None

    def get_round(self, round_id: int) -> RoundRow | None:
        row = self._reader().execute(
            f"SELECT {self._ROUND_COLUMNS} FROM rounds WHERE round_id=?", (round_id,)
        ).fetchone()
        return self._round(row) if row else None

    def recent_rounds(self, limit: int = 50) -> list[RoundRow]:
        rows = self._reader().execute(
            f"SELECT {self._ROUND_COLUMNS} FROM rounds ORDER BY round_id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [self._round(r) for r in rows]

    def last_round_ends(self) -> dict[str, float]:
        """When the newest round of each outcome (published, abandoned) closed; an outcome never seen is absent."""
        rows = self._reader().execute(
            "SELECT status, max(closed_at) FROM rounds WHERE status != 'open' GROUP BY status"
        ).fetchall()
        return {status: closed_at for status, closed_at in rows}

    def last_round_id(self) -> int:
        row = self._reader().execute("SELECT max(round_id) FROM rounds").fetchone()
        return row[0] or 0

    def insert_round(self, round_id: int, model_version: int, opened_at: float, deadline: float, goal: int) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO rounds (round_id, model_version, status, opened_at, deadline, goal) "
                "VALUES (?, ?, 'open', ?, ?, ?)",
                (round_id, model_version, opened_at, deadline, goal),
            )

    def finish_round(
        self,
        round_id: int,
        status: str,
        closed_at: float,
        participants: int,
        samples: int,
        metrics: dict[str, float],
        note: str = "",
        new_model: tuple[int, bytes] | None = None,
        next_round: tuple[int, int, float, float, int] | None = None,
        late: Collection[str] = (),
    ) -> None:
        """Close ``round_id`` and, in the same transaction, record the new model and open the next round.

        ``late``: devices whose updates were still being written when the round stopped waiting for them (a disk
        that stopped answering): recorded as left out of the round (``left_out_updates``, reason ``late``), so that
        their records, whenever they land, neither count nor give their receipts to a resend."""
        with self._transaction() as db:
            db.execute(
                "UPDATE rounds SET status=?, closed_at=?, participants=?, samples=?, metrics=?, note=? "
                "WHERE round_id=? AND status='open'",
                (status, closed_at, participants, samples, json.dumps(metrics), note, round_id),
            )
            db.executemany("INSERT OR IGNORE INTO left_out_updates (round_id, device_id, reason) VALUES (?, ?, 'late')",
                           [(round_id, device) for device in late])
            if new_model is not None:
                db.execute(
                    "INSERT OR REPLACE INTO models (version, digest, round_id, created_at) VALUES (?, ?, ?, ?)",
                    (new_model[0], new_model[1], round_id, closed_at),
                )
            if next_round is not None:
                db.execute(
                    "INSERT INTO rounds (round_id, model_version, status, opened_at, deadline, goal) "
                    "VALUES (?, ?, 'open', ?, ?, ?)",
                    next_round,
                )

    # ------------------------------------------------------------------------------------------- updates

    @staticmethod
    def _update(row: tuple[Any, ...]) -> UpdateRow:
        return UpdateRow(
            digest=bytes(row[0]), device_id=row[1], round_id=row[2], num_samples=row[3],
            metrics=json.loads(row[4]), offset=row[5], length=row[6], accepted_at=row[7],
            check=RecordCheck(row[8], row[9] if isinstance(row[9], bytes) else b"") if row[8] else None,
        )

    def receipt_for(self, digest: bytes) -> bytes | None:
        row = self._reader().execute("SELECT receipt FROM updates WHERE digest=?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    def round_updates(self, round_id: int) -> list[UpdateRow]:
        rows = self._reader().execute(
            "SELECT digest, device_id, round_id, num_samples, metrics, offset, length, accepted_at, check_kind, "
            "check_value FROM updates WHERE round_id=? ORDER BY offset",
            (round_id,),
        ).fetchall()
        return [self._update(r) for r in rows]

    def round_devices(self, round_id: int, limit: int | None = None, offset: int = 0) -> list[str]:
        """The devices whose updates count in the round, in the order their updates were stored (acknowledged).

        The order is the rows' rowid, which SQLite gives each new row above every row in the table, so an open
        round's new updates always come last and pages of ``limit`` from ``offset`` never shift as they arrive.
        ``accepted_at`` would not do: it is the wall clock, and a clock stepped back (NTP) sorts a new update
        before ones already paged (one listed twice, another never). The round's index holds the rowid, so a page
        is read in order without sorting the round."""
        rows = self._reader().execute(
            f"SELECT device_id FROM updates u WHERE round_id=? AND NOT {self._LEFT_OUT} "
            "ORDER BY rowid LIMIT ? OFFSET ?",
            (round_id, -1 if limit is None else limit, offset),
        ).fetchall()
        return [r[0] for r in rows]

    def count_round_devices(self, round_id: int) -> int:
        return self._reader().execute(
            f"SELECT count(*) FROM updates u WHERE round_id=? AND NOT {self._LEFT_OUT}", (round_id,)
        ).fetchone()[0]

    _LEFT_OUT = ("EXISTS (SELECT 1 FROM left_out_updates l WHERE l.round_id = u.round_id "
                 "AND l.device_id = u.device_id)")

    def round_left_out_devices(self, round_id: int, limit: int | None = None, offset: int = 0) -> list[str]:
        """Devices whose acknowledged masked input the round's secure sum leaves out (``left_out_updates``), in the
        order their inputs were stored, as :meth:`round_devices`."""
        rows = self._reader().execute(
            f"SELECT device_id FROM updates u WHERE round_id=? AND {self._LEFT_OUT} "
            "ORDER BY rowid LIMIT ? OFFSET ?",
            (round_id, -1 if limit is None else limit, offset),
        ).fetchall()
        return [r[0] for r in rows]

    def count_round_left_out_devices(self, round_id: int) -> int:
        return self._reader().execute(
            f"SELECT count(*) FROM updates u WHERE round_id=? AND {self._LEFT_OUT}", (round_id,)
        ).fetchone()[0]

    def stored_late(self, digest: bytes) -> bool:
        """Whether the masked input ``digest`` was left out of its secure round's sum as stored late."""
        return self._reader().execute(
            "SELECT 1 FROM updates u JOIN left_out_updates l ON l.round_id = u.round_id AND l.device_id = u.device_id "
            "WHERE u.digest=? AND l.reason='late'", (digest,)
        ).fetchone() is not None

    def round_left_out_reasons(self, round_id: int) -> dict[str, int]:
        """How many of the round's left-out masked inputs were left out for each reason."""
        rows = self._reader().execute(
            "SELECT reason, count(*) FROM left_out_updates l JOIN updates u ON u.round_id = l.round_id AND "
            "u.device_id = l.device_id WHERE l.round_id=? GROUP BY reason ORDER BY reason", (round_id,)
        ).fetchall()
        return dict(rows)

    def round_device_lists(self, round_id: int, limit: int) -> dict[str, Any]:
        """A round's first ``limit`` counted, lost and left-out devices, and how many there are of each, read in one
        snapshot (a total is never short of its list): what each round of /v1/status and ``status --state`` shows."""
        with self.snapshot():
            devices = self.round_devices(round_id, limit)
            lost = self.round_lost_devices(round_id, limit)
            left_out = self.round_left_out_devices(round_id, limit)
            return {
                "devices": devices,
                "devices_total": len(devices) if len(devices) < limit else self.count_round_devices(round_id),
                "lost_devices": lost,
                "lost_devices_total": len(lost) if len(lost) < limit else self.count_round_lost_devices(round_id),
                "left_out_devices": left_out,
                "left_out_devices_total": (len(left_out) if len(left_out) < limit
                                           else self.count_round_left_out_devices(round_id)),
            }

    # --------------------------------------------------------------------------------------------- spool

    def segment_path(self, round_id: int) -> Path:
        return self.spool_dir / f"round-{round_id:08d}.seg"

    def recover_segment(self, round_id: int, tensors: TensorSection | None = None) -> SpoolRecovery:
        """Make the round's segment hold exactly its acknowledged records, each as it was written, before the round
        resumes.

        What follows the last acknowledged record and its padding is cut: a writer killed, or a power cut,
        mid-append leaves bytes of a record nobody got a receipt for (its device sends it again). Acknowledged
        records were fdatasynced before their receipts, so each should be whole and unchanged; one that is not
        (the segment is shorter than its records, or gone; or a whole record no longer matches the check in its
        row: the disk lost or changed data it had reported written) is never read as zeros or as other bytes: its
        update is taken out of the round (its row moves to ``lost_updates``, which withdraws its receipt) and the
        round's devices that lost theirs are named in one error line per cause. ``tensors`` is the model's tensor
        section, which the checks of updates against their signed digests rebuild from their records.

        A row whose check this version cannot verify (a kind it does not know, or no value) raises
        :class:`StoreError` before anything is changed (see :func:`_unverifiable_checks`).
        """
        path = self.segment_path(round_id)
        rows = self.round_updates(round_id)
        unverifiable = [r for r in rows if _unverifiable(r.check)]
        if unverifiable:
            raise StoreError(_unverifiable_checks(round_id, unverifiable))
        size = path.stat().st_size if path.exists() else None
        cause = "segment-missing" if size is None else "segment-short"
        whole = [] if size is None else [r for r in rows if r.offset + r.length <= size]
        lost = [r for r in rows if size is None or r.offset + r.length > size]
        corrupt = self._failing_checks(path, whole, tensors)
        kept = len(whole) - len(corrupt)
        end = _padded(max((r.offset + r.length for r in whole), default=0))
        cut = 0 if size is None else max(size - end, 0)
        if lost:
            where = (f"{path} is missing (deleted, or lost by the disk)" if size is None else
                     f"{path} holds {size} bytes but their records reach byte {max(r.offset + r.length for r in lost)}")
            log.error("round %d: %d acknowledged updates taken out of the round, their spooled records are not on "
                      "disk (devices %s): %s; the disk lost data it had reported written, and their devices, holding "
                      "receipts, will not send them again; the round goes on with its other %d updates",
                      round_id, len(lost), ", ".join(sorted(r.device_id for r in lost)), where, kept)
        elif cut:
            log.warning("round %d: cut %d bytes past the last acknowledged update from %s (an append that got no "
                        "receipt: its device sends it again)", round_id, cut, path)
        if corrupt:
            ranges = ", ".join(f"{r.offset}-{r.offset + r.length - 1}" for r in corrupt)
            log.error("round %d: %d acknowledged updates taken out of the round, their spooled records fail their "
                      "check (devices %s): bytes %s of %s are not the bytes written there; the disk changed data it "
                      "had reported written, and their devices, holding receipts, will not send them again; the round "
                      "goes on with its other %d updates",
                      round_id, len(corrupt), ", ".join(sorted(r.device_id for r in corrupt)), ranges, path, kept)
        if size is not None and size != end:
            os.truncate(path, end)  # past ``size``: only the last kept record's zero padding
        if lost or corrupt:
            now = time.time()
            with self._transaction() as db:
                for row, why in [(r, cause) for r in lost] + [(r, "record-corrupt") for r in corrupt]:
                    db.execute(
                        "INSERT INTO lost_updates (digest, device_id, round_id, num_samples, accepted_at, lost_at, "
                        "cause) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (row.digest, row.device_id, row.round_id, row.num_samples, row.accepted_at, now, why),
                    )
                    db.execute("DELETE FROM updates WHERE digest=?", (row.digest,))
        return SpoolRecovery(cut_bytes=cut, lost=lost, cause=cause if lost else "", corrupt=corrupt)

    @staticmethod
    def _failing_checks(path: Path, rows: list[UpdateRow], tensors: TensorSection | None) -> list[UpdateRow]:
        """The rows among ``rows`` (records wholly in the segment at ``path``) whose records fail their checks.

        Each record is mapped on its own and unmapped once checked, so the pages read stay resident for one record
        at a time, not for the whole segment (peak RSS flat in the number of updates, as for the replay)."""
        def intact(row: UpdateRow, check: RecordCheck) -> bool:
            record = (np.memmap(path, dtype=np.uint8, mode="r", offset=row.offset, shape=(row.length,))
                      if row.length else np.empty(0, dtype=np.uint8))
            return record_intact(check, record, tensors)

        return [r for r in rows if r.check is not None and not intact(r, r.check)]

    _LOST_DEVICES = (
        "FROM lost_updates l WHERE round_id=? AND NOT EXISTS "
        "(SELECT 1 FROM updates u WHERE u.round_id = l.round_id AND u.device_id = l.device_id)"
    )

    def round_lost_devices(self, round_id: int, limit: int | None = None, offset: int = 0) -> list[str]:
        """Devices whose acknowledged update in the round was lost from the spool (see :meth:`recover_segment`) and
        that have not sent one again since (a device that never saw its receipt still holds its update).

        Each device once (one that lost updates at two restarts has two rows), in the order its first loss was
        recorded (rowid, as :meth:`round_devices`): pages of ``limit`` from ``offset`` are stable, a later loss
        comes last."""
        rows = self._reader().execute(
            f"SELECT device_id, min(rowid) AS first {self._LOST_DEVICES} GROUP BY device_id "
            "ORDER BY first LIMIT ? OFFSET ?",
            (round_id, -1 if limit is None else limit, offset),
        ).fetchall()
        return [r[0] for r in rows]

    def count_round_lost_devices(self, round_id: int) -> int:
        return self._reader().execute(
            f"SELECT count(DISTINCT device_id) {self._LOST_DEVICES}", (round_id,)
        ).fetchone()[0]

    def drop_segment(self, round_id: int) -> None:
        """Delete a closed round's spool segment (its receipts stay in SQLite for idempotent resends).

        While the writer runs, it closes the segment's file after the jobs queued before: a secure round closes
        without a masked input still being written on a stalled disk (secagg_round.py), and closing the descriptor
        under that write would let the writer's next write go to whatever file reuses its number."""
        self.segment_path(round_id).unlink(missing_ok=True)
        if self._writer is None:
            self._close_segment(round_id)
        else:
            self._queue.put(_DroppedSegment(round_id))

    def _close_segment(self, round_id: int) -> None:
        segment = self._segments.pop(round_id, None)
        if segment is not None:
            os.close(segment.fd)

    def drop_stale_segments(self, keep: int | None) -> list[Path]:
        """Delete segments of rounds that are no longer open (left by a crash between a round's close and the
        deletion of its segment); returns what was deleted."""
        dropped = []
        for path in self.spool_dir.glob("round-*.seg"):
            if keep is None or path != self.segment_path(keep):
                path.unlink(missing_ok=True)
                dropped.append(path)
        return dropped

    def start_writer(self) -> None:
        if self._writer is None:
            self._finisher = threading.Thread(target=self._finish_loop, name="spool-finisher", daemon=True)
            self._finisher.start()
            self._writer = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
            self._writer.start()

    def stop_writer(self, timeout: float | None = None) -> bool:
        """Stop the spool's threads after the jobs queued, waiting ``timeout`` seconds at most (None: however long
        they take); False when the writer has not finished by then (it goes on, and stops after its last job)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread, queue_ in ((self._writer, self._queue), (self._finisher, self._done)):
            if thread is None:
                continue
            queue_.put(None)
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return False
        self._writer = self._finisher = None
        return True

    def _finish_loop(self) -> None:
        name_this_thread()
        while (batch := self._done.get()) is not None:
            for job, error in batch:
                if error is None and job.then is not None:
                    try:
                        job.then()
                    except Exception as exc:  # committed but not counted: the caller must not acknowledge it
                        error = exc
                if error is None:
                    job.future.set_result(job.offset)
                else:
                    job.future.set_exception(error)

    async def spool(self, job: SpoolJob) -> int:
        """Append ``job`` durably; returns its offset once it is fsynced and committed.

        Raises :class:`DuplicateUpdate` when the device already has an update in the round.

        Once queued, the job is written and committed whether or not anyone still waits for it: its future is
        marked running, so a cancelled caller (a handler whose client went away) cannot cancel it, and the
        threads that complete it never meet a future they may not complete.
        """
        job.future.set_running_or_notify_cancel()
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _segment(self, round_id: int) -> _Segment:
        segment = self._segments.get(round_id)
        if segment is None:
            path = self.segment_path(round_id)
            existed = path.exists()
            segment = self._open_segment(path, direct=True)
            if segment.size % SPOOL_ALIGNMENT:  # a torn append through the page cache: the next record starts aligned
                segment.size = _padded(segment.size)
                os.ftruncate(segment.fd, segment.size)
            self._segments[round_id] = segment
            if not existed:
                fsync_dir(self.spool_dir)
        return segment

    @staticmethod
    def _open_segment(path: Path, direct: bool) -> _Segment:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        if direct:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o600)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                direct = False
        if not direct:
            fd = os.open(path, flags, 0o600)
        return _Segment(fd, os.fstat(fd).st_size, direct)

    def _append(self, round_id: int, delta: np.ndarray) -> int:
        """Append one record (the delta's bytes, zero-padded to the alignment); returns its offset."""
        segment = self._segment(round_id)
        data = _record_bytes(delta)
        if segment.direct and data.ctypes.data % SPOOL_ALIGNMENT:
            if self._staging.size < data.size:
                self._staging = spool_vector(_padded(data.size) // 4).view(np.uint8)
            self._staging[: data.size] = data
            data = self._staging[: data.size]
        whole = data.size - data.size % SPOOL_ALIGNMENT
        parts = [memoryview(data[:whole])] if whole else []
        if whole < data.size:
            rest = data.size - whole
            self._tail[:rest] = data[whole:]
            self._tail[rest:] = 0
            parts.append(memoryview(self._tail))
        try:
            for part in parts:
                written = 0
                while written < len(part):
                    written += os.write(segment.fd, part[written:])
        except OSError as exc:
            if not (segment.direct and exc.errno == errno.EINVAL):
                raise
            # The filesystem took O_DIRECT at open but refuses the write: this segment goes through the page cache.
            os.close(segment.fd)
            self._segments[round_id] = self._open_segment(self.segment_path(round_id), direct=False)
            return self._append(round_id, delta)
        offset = segment.size
        segment.size += _padded(data.size)
        return offset

    def _write_loop(self) -> None:
        name_this_thread()
        waiting: SpoolJob | _DroppedSegment | None = None  # taken from the queue after a batch: next in line
        while True:
            item, waiting = (self._queue.get() if waiting is None else waiting), None
            if item is None:
                return
            if isinstance(item, _DroppedSegment):
                self._close_segment(item.round_id)
                continue
            batch = [item]
            while len(batch) < 256:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                if isinstance(more, _DroppedSegment):  # after this batch, which may write to it
                    waiting = more
                    break
                batch.append(more)
            with self.writes.writing(f"the spool's write of {len(batch)} update{'s' if len(batch) != 1 else ''}"):
                self._commit_batch(batch)

    def _commit_batch(self, batch: list[SpoolJob]) -> None:
        try:
            for job in batch:
                if job.check is None:  # bytes no signed digest covers: their CRC-32, as they are written
                    job.check = crc32_check(_record_bytes(job.delta))
                job.offset = self._append(job.round_id, job.delta)
            for round_id in {job.round_id for job in batch}:
                os.fdatasync(self._segments[round_id].fd)
        except OSError as exc:
            # Forget what this batch appended: the segment is reopened at its end on disk, and what lies there
            # uncommitted is never referenced (a restart cuts it off).
            for round_id in {job.round_id for job in batch}:
                segment = self._segments.pop(round_id, None)
                if segment is not None:
                    os.close(segment.fd)
            for job in batch:
                job.future.set_exception(exc)
            return
        results: list[BaseException | None] = []
        try:
            with self._transaction() as db:
                for job in batch:
                    try:
                        db.execute("SAVEPOINT one")
                        db.execute(
                            "INSERT INTO updates (digest, device_id, round_id, num_samples, metrics, offset, length, "
                            "receipt, accepted_at, check_kind, check_value) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (
                                job.digest, job.device_id, job.round_id, job.num_samples, json.dumps(job.metrics),
                                job.offset, job.delta.nbytes, job.receipt, job.accepted_at, job.check.kind,
                                job.check.value,
                            ),
                        )
                        db.execute("RELEASE one")
                        results.append(None)
                    except sqlite3.IntegrityError:
                        db.execute("ROLLBACK TO one")
                        db.execute("RELEASE one")
                        message = f"{job.device_id} already has an update in round {job.round_id}"
                        results.append(DuplicateUpdate(message))
        except sqlite3.Error as exc:
            for job in batch:
                job.future.set_exception(exc)
            return
        self._done.put(list(zip(batch, results, strict=True)))

    def read_delta(self, round_id: int, offset: int, length: int) -> np.ndarray:
        """One spooled delta as a read-only memory map (no copy, pages come in as they are read)."""
        return np.memmap(self.segment_path(round_id), dtype="<f4", mode="r", offset=offset, shape=(length // 4,))

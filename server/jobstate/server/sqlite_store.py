"""The SQLite engine: ``MemoryStore`` with every change written through to a SQLite database first.

Reads and watches are served from memory exactly as by the in-memory engine; SQLite is the write-ahead copy
that survives a restart. Each change is one SQLite transaction, committed before the change touches memory,
reaches a watcher or is acknowledged: if the transaction fails, nothing changed and the caller gets the error.

Tables:
- ``jobs``: one row per live job (its serialized ``JobState`` and what the indexes need);
- ``history``: the last ``max_history_per_job`` history entries of every live job (older ones deleted by the
  transaction that adds a new one; all of them with the job, in the same transaction);
- ``events``: the changes the hub holds (the last ``history_size``, within ``history_bytes``) as watchers receive
  them (the hub's serialized ``WatchEvent`` frame, with the job id and node ids its filters need), so after a
  restart a watcher resumes by revision with nothing lost, and reopening does not parse or re-encode them. Each
  row is a whole frame (a status update of a 2 MiB job writes 2 MiB here; the hub shares it in memory only), so
  the rows are held to ``history_bytes`` by their own count: a restart may restore fewer changes than were held;
- ``meta``: the head revision (and the schema version).

A job's retention clock (``--retain-finished``) is its ``update_time``, inside the stored ``JobState``: a final
job never changes again, so that is when it became final, and a restart reads it back with the job. Removed
jobs' pages are returned to the file system by ``maintain`` (``auto_vacuum=INCREMENTAL``).

Durability: WAL mode with ``synchronous=FULL``: each commit fsyncs the WAL, so an acknowledged change survives
a power loss or an OS crash, not only a crash of this process (``NORMAL`` would survive ``kill -9`` but could
lose the last commits on power loss, which breaks "committed before it is acknowledged").

Cost: the sqlite3 calls are synchronous and run on the event loop's thread, so each write holds the loop for
one transaction: four or five row writes (about 0.1 ms of CPU) and one fsync of the WAL, which dominates
(3 to 6 ms on the virtual disk of the development machine: ~170-300 writes/s, against ~1,000-1,900 with
``NORMAL`` and ~7,500-9,000 in memory, store level). Reads and watchers wait behind that fsync too, since
they share the loop. Blocking is what keeps the engine atomic the same way as ``MemoryStore`` (no await
between validation and publish). Group commit (the changes made within one loop turn in one transaction,
acknowledged together after its one fsync, with the fsync off the loop) would make write throughput grow with
the number of concurrent writers instead of being capped at one fsync per change, at the price of holding
each acknowledgement until its batch commits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from jobstate.server import rules
from jobstate.server.errors import ShuttingDown, StoreUnavailable
from jobstate.server.hub import DELETED, Change, WatchHub
from jobstate.server.store import MemoryStore, Mutation, _Record

log = logging.getLogger("jobstate.server.sqlite")

DB_FILE = "jobstate.db"
LOCK_FILE = "jobstate.lock"
SCHEMA_VERSION = 1
# Space of removed jobs is given back in steps of this many pages (4 KiB each), each step one short
# transaction, so writers wait for at most one step.
VACUUM_STEP_PAGES = 256
# The WAL is truncated to this after a checkpoint: it stays small once the burst that grew it is written back.
WAL_SIZE_LIMIT = 4 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    create_ns INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    mod_time_ns INTEGER NOT NULL,
    timeout_ns INTEGER NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    job_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (job_id, revision)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    type INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    nodes TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    frame BLOB NOT NULL
);
"""


class DataDirInUse(RuntimeError):
    """Another process holds the data directory."""


class SqliteStore(MemoryStore):
    """The durable single-machine engine; see the module docstring."""

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        hub: WatchHub | None = None,
        limits: rules.Limits = rules.DEFAULT_LIMITS,
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 5.0,
        retention: bool = True,
    ) -> None:
        super().__init__(hub, limits, retention=retention)
        if synchronous not in ("FULL", "NORMAL", "EXTRA", "OFF"):
            raise ValueError(f"unknown synchronous mode {synchronous!r}")
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Two servers on one data dir would each keep their own memory copy and diverge: refuse the second.
        self._lock_fd: int | None = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            self._lock_fd = None
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise DataDirInUse(
                f"data dir {self.data_dir} is in use by another jobstate server ({who}); stop it or use another "
                "--data-dir"
            ) from None
        # The holder's pid, so that a refused second server can say which process to stop. The flock, not this
        # file's content, is the lock: a pid left behind by a crash is overwritten by the next holder.
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        self._closed = False
        # (revision, frame bytes) of each row of the events table, oldest first, and their total: the table is
        # kept within the hub's byte budget too (its rows are whole frames: what the hub shares, each row
        # repeats).
        self._event_rows: collections.deque[tuple[int, int]] = collections.deque()
        self._event_bytes = 0
        try:
            # isolation_level=None: transactions are begun and ended here, explicitly.
            self._db = sqlite3.connect(
                self.data_dir / DB_FILE, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
            # Freed pages (removed jobs) go back to the file system bit by bit (``maintain``), not only to
            # SQLite's free list: set before the first table exists, or by one VACUUM on an older database.
            self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            self._db.executescript(_SCHEMA)
            if self._db.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
                log.info("converting the database to incremental vacuum (once)", extra={"db": str(self.data_dir)})
                self._db.execute("VACUUM")
            self._load()
        except BaseException:
            self._release()
            raise

    # -- opening -------------------------------------------------------------------------------------------

    def _meta(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def _load(self) -> None:
        schema = self._meta("schema")
        if schema is None:
            self._db.execute("INSERT INTO meta VALUES ('schema', ?), ('head', 0)", (SCHEMA_VERSION,))
        elif schema != SCHEMA_VERSION:
            raise RuntimeError(f"{self.data_dir / DB_FILE} has schema {schema}; this server reads {SCHEMA_VERSION}")
        if self._meta("store_id") is None:
            # Made once per database: a new data dir is a new revision history.
            self._db.execute("INSERT INTO meta VALUES ('store_id', ?)", (secrets.randbits(62),))
        self.store_id = f"sqlite-{self._meta('store_id'):016x}"
        head = self._meta("head") or 0
        latest = 0
        rows = self._db.execute(
            "SELECT job_id, create_ns, mod_revision, mod_time_ns, state FROM jobs ORDER BY create_ns, job_id"
        )
        for job_id, create_ns, mod_revision, mod_time_ns, state in rows:
            # _add keeps the ListJobs order by appending: rows come in (create_ns, job_id) order.
            self._add(_Record(job_id, state, mod_revision, mod_time_ns, create_ns, []))
            latest = max(latest, mod_time_ns)
        for job_id, entry in self._db.execute("SELECT job_id, entry FROM history ORDER BY job_id, revision"):
            rec = self._jobs.get(job_id)
            if rec is not None:
                rec.history.append(entry)
        cap = self.limits.max_history_per_job
        over = [r for r in self._jobs.values() if cap and len(r.history) > cap]
        if over:  # --max-history-per-job was lowered since the last run
            self._db.execute("BEGIN IMMEDIATE")
            for r in over:
                self._trim(r.job_id, len(r.history) - cap)
                del r.history[: len(r.history) - cap]
            self._db.execute("COMMIT")
        self._history_entries = sum(len(r.history) for r in self._jobs.values())
        events = self._db.execute(
            "SELECT revision, job_id, nodes, frame FROM events WHERE revision > ? ORDER BY revision",
            (head - self.hub.history_size,),
        )
        self.hub.restore(
            head,
            (
                Change.restored(rev, job_id, tuple(sys.intern(n) for n in nodes.split()), frame)
                for rev, job_id, nodes, frame in events
            ),
        )
        self._revision = head
        for revision, size in self._db.execute("SELECT revision, length(frame) FROM events ORDER BY revision"):
            self._event_rows.append((revision, size))
            self._event_bytes += size
        last_event = self._db.execute("SELECT max(time_ns) FROM events").fetchone()[0] or 0
        # create_time order is commit order across restarts too, even if the wall clock went back meanwhile.
        self._clock.last = max(latest, last_event)

    # -- writing through -----------------------------------------------------------------------------------

    def _trim(self, job_id: str, count: int) -> None:
        """Deletes the job's ``count`` oldest history entries (inside the caller's transaction)."""
        self._db.execute(
            "DELETE FROM history WHERE job_id = ?1 AND revision IN "
            "(SELECT revision FROM history WHERE job_id = ?1 ORDER BY revision LIMIT ?2)",
            (job_id, count),
        )

    def _write(self, m: Mutation) -> int:
        """The rows of one change (inside the caller's transaction); returns the size of its events row."""
        job = m.job
        db = self._db
        if m.event_type == DELETED:
            db.execute("DELETE FROM jobs WHERE job_id = ?", (job.job_id,))
            db.execute("DELETE FROM history WHERE job_id = ?", (job.job_id,))
        else:
            assert m.entry_data is not None
            timeout_ns = job.timeout_at.ToNanoseconds() if job.HasField("timeout_at") else 0
            db.execute(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                (job.job_id, m.create_ns, m.revision, m.time_ns, timeout_ns, m.job_data),
            )
            if m.drop_history:
                self._trim(job.job_id, m.drop_history)
            db.execute(
                "INSERT INTO history VALUES (?, ?, ?)",
                (job.job_id, m.revision, m.entry_data),
            )
        event = m.event
        frame = event.frame
        db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
            (m.revision, m.event_type, job.job_id, " ".join(event.nodes), m.time_ns, frame),
        )
        return len(frame)

    def _persist(self, m: Mutation) -> None:
        self._persist_many((m,))

    def _persist_many(self, mutations: Sequence[Mutation]) -> None:
        # One transaction (one fsync) for a retention batch: each job is still its own change and revision.
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        db = self._db
        last = mutations[-1].revision
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                sizes = [(m.revision, self._write(m)) for m in mutations]
                # What the hub let go of, by count or by bytes, is of no use after a restart either; and the rows
                # kept take at most the hub's byte budget (the newest row is always kept).
                oldest_kept = max(last - self.hub.history_size + 1, self.hub.oldest_revision)
                oldest_kept = max(oldest_kept, self._byte_cut(last, sum(size for _, size in sizes)))
                db.execute("DELETE FROM events WHERE revision < ?", (oldest_kept,))
                db.execute("UPDATE meta SET value = ? WHERE key = 'head'", (last,))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            rows = self._event_rows
            rows.extend(sizes)
            self._event_bytes += sum(size for _, size in sizes)
            while rows and rows[0][0] < oldest_kept:
                self._event_bytes -= rows.popleft()[1]
        except sqlite3.Error as exc:
            # UNAVAILABLE / STORE_UNAVAILABLE, as for an etcd that cannot commit: the transaction was rolled back
            # and nothing changed here (only an fsync failing inside COMMIT can leave the change on disk, to
            # appear at the next start; the events table's revision key then refuses every later write rather
            # than letting memory and disk diverge).
            raise StoreUnavailable(f"the change at revision {last} was not committed: {exc}") from exc

    async def maintain(self) -> None:
        """Returns the pages of removed jobs to the file system and truncates the WAL, in short steps.

        The free list alone would be reused by later writes, so the file would stop growing anyway at a steady
        churn; giving pages back also shrinks it after a burst of jobs is removed."""
        db = self._db
        try:
            while not self._closed and db.execute("PRAGMA freelist_count").fetchone()[0] > VACUUM_STEP_PAGES:
                db.execute(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES})").fetchall()  # one page a step
                await asyncio.sleep(0)  # writers and watchers run between steps
            if not self._closed:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.warning("sqlite maintenance failed: %s", exc)

    def file_bytes(self) -> int:
        """The database's size on disk: the file and its WAL."""
        total = 0
        for name in (DB_FILE, DB_FILE + "-wal"):
            with contextlib.suppress(OSError):  # no WAL right after a TRUNCATE checkpoint
                total += (self.data_dir / name).stat().st_size
        return total

    def _byte_cut(self, revision: int, size: int) -> int:
        """The oldest revision the events table can keep once a row of ``size`` bytes is added at ``revision``."""
        budget = self.hub.history_bytes
        total = self._event_bytes + size
        if not budget or total <= budget:
            return 0
        for rev, row in self._event_rows:
            total -= row
            if total <= budget:
                return rev + 1
        return revision

    # -- closing -------------------------------------------------------------------------------------------

    def _release(self) -> None:
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    async def close(self) -> None:
        # Writes are synchronous on the loop's thread, so none is half done here; later ones are refused.
        self._closed = True
        self.hub.close()
        self._release()

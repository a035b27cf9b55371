"""The embedded job store: one SQLite file in the data directory, for one host.

WAL journal, every change one `BEGIN IMMEDIATE` transaction (one writer at a time, readers
never blocked), `synchronous=FULL` so a job the service accepted survives a crash of the
process or the machine. Safe across threads (a connection per thread) and processes of
one host. Not for several hosts: SQLite's locks don't hold on network file systems; use
Redis there.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.jobs.config import JobsConfig
from app.jobs.model import MAX_ATTEMPTS, Job, JobState, JSONObject, NewJob
from app.jobs.store import (
    Clock,
    Deleted,
    DeleteOutcome,
    JobStore,
    Recovered,
    StoreUnavailable,
    Usage,
    encode_json,
    job_from_fields,
    worker_lost_problem,
)

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires_at REAL,
    upload_path TEXT NOT NULL,
    upload_bytes INTEGER NOT NULL,
    params TEXT NOT NULL,
    result TEXT,
    problem TEXT,
    callback_url TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE INDEX IF NOT EXISTS jobs_by_lease ON jobs (lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_by_expiry ON jobs (expires_at) WHERE expires_at IS NOT NULL;
"""
_PENDING = "state IN ('queued', 'running')"
# The caller's lease is valid: held (the claim's lease_owner) and not expired.
_HOLDS_LEASE = "id = ? AND state = 'running' AND lease_owner = ? AND lease_expires_at > ?"


class SqliteJobStore(JobStore):
    def __init__(
        self,
        path: Path,
        config: JobsConfig,
        clock: Clock = time.time,
        *,
        busy_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(config, clock)
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._guard():
            conn = self._conn()
            conn.execute("PRAGMA journal_mode = WAL")
            with self._write() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, _SCHEMA_VERSION):
                    raise RuntimeError(
                        f"job store {self.path} has schema version {version}; this service "
                        f"knows {_SCHEMA_VERSION}"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    # --- connections and transactions ----------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after a fork: connections aren't shared)."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,  # transactions are explicit
                check_same_thread=False,  # only so that close() can close them all
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous = FULL")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:  # locked past the timeout, disk I/O, full disk
            raise StoreUnavailable(f"SQLite job store {self.path}: {e}") from e

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: taken at once (IMMEDIATE), so no two writers interleave."""
        with self._guard():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read_one(self, sql: str, *args: object) -> sqlite3.Row | None:
        with self._guard():
            row: sqlite3.Row | None = self._conn().execute(sql, args).fetchone()
            return row

    @staticmethod
    def _job(db: sqlite3.Connection, job_id: str) -> Job | None:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else job_from_fields(row)

    # --- the interface --------------------------------------------------------------

    def enqueue(self, new: NewJob) -> Job:
        now = self.clock()
        with self._write() as db:
            count, used = db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(upload_bytes), 0) FROM jobs WHERE {_PENDING}"
            ).fetchone()
            if count >= self.config.max_queued_jobs:
                raise self.queue_full("jobs")
            if used + new.upload_bytes > self.config.upload_budget_bytes:
                raise self.queue_full("bytes")
            try:
                db.execute(
                    "INSERT INTO jobs (id, owner, state, created_at, updated_at, attempts, "
                    "upload_path, upload_bytes, params, callback_url) "
                    "VALUES (?, ?, 'queued', ?, ?, 0, ?, ?, ?, ?)",
                    (
                        new.id,
                        new.owner,
                        now,
                        now,
                        new.upload_path,
                        new.upload_bytes,
                        encode_json(new.params),
                        new.callback_url,
                    ),
                )
            except sqlite3.IntegrityError as e:
                raise ValueError("a job with this id exists already") from e
            job = self._job(db, new.id)
        assert job is not None
        return job

    def claim(self, worker: str) -> Job | None:
        if self._read_one("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1") is None:
            return None  # the common idle case, without taking the write lock
        now = self.clock()
        lease_owner = self.new_lease_owner(worker)
        with self._write() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_owner = ?, "
                "lease_expires_at = ?, updated_at = ? WHERE id = ?",
                (lease_owner, now + self.config.lease_s, now, row["id"]),
            )
            return self._job(db, row["id"])

    def renew(self, job_id: str, lease_owner: str) -> bool:
        now = self.clock()
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE {_HOLDS_LEASE}",
                (now + self.config.lease_s, now, job_id, lease_owner, now),
            )
            return cursor.rowcount == 1

    def complete(self, job_id: str, lease_owner: str, result: JSONObject) -> Job | None:
        return self._end(job_id, lease_owner, JobState.DONE, "result", encode_json(result))

    def fail(self, job_id: str, lease_owner: str, problem: JSONObject) -> Job | None:
        return self._end(job_id, lease_owner, JobState.FAILED, "problem", encode_json(problem))

    def _end(
        self, job_id: str, lease_owner: str, state: JobState, column: str, value: str
    ) -> Job | None:
        now = self.clock()
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE jobs SET state = ?, {column} = ?, lease_expires_at = NULL, "
                f"updated_at = ?, expires_at = ? WHERE {_HOLDS_LEASE}",
                (
                    state.value,
                    value,
                    now,
                    now + self.config.result_ttl_s,
                    job_id,
                    lease_owner,
                    now,
                ),
            )
            return self._job(db, job_id) if cursor.rowcount == 1 else None

    def release(self, job_id: str, lease_owner: str) -> bool:
        now = self.clock()
        with self._write() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = 'queued', attempts = attempts - 1, lease_owner = NULL, "
                f"lease_expires_at = NULL, updated_at = ? WHERE {_HOLDS_LEASE}",
                (now, job_id, lease_owner, now),
            )
            return cursor.rowcount == 1

    def peek(self, job_id: str) -> Job | None:
        row = self._read_one("SELECT * FROM jobs WHERE id = ?", job_id)
        return None if row is None else job_from_fields(row)

    def delete(self, job_id: str, owner: str) -> Deleted:
        now = self.clock()
        with self._write() as db:
            job = self._job(db, job_id)
            if job is None or job.owner != owner:
                return Deleted(DeleteOutcome.NOT_FOUND, None)
            if job.expires_at is not None and job.expires_at <= now:
                return Deleted(DeleteOutcome.NOT_FOUND, None)  # expired: the sweep's
            if job.state is JobState.RUNNING:
                return Deleted(DeleteOutcome.RUNNING, job)
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            return Deleted(DeleteOutcome.DELETED, job)

    def requeue_expired(self, limit: int = 100) -> Recovered:
        now = self.clock()
        expired_sql = "state = 'running' AND lease_expires_at <= ?"
        if self._read_one(f"SELECT 1 FROM jobs WHERE {expired_sql} LIMIT 1", now) is None:
            return Recovered()
        requeued: list[str] = []
        failed: list[Job] = []
        with self._write() as db:
            rows = db.execute(
                f"SELECT id, attempts FROM jobs WHERE {expired_sql} ORDER BY seq LIMIT ?",
                (now, limit),
            ).fetchall()
            for row in rows:
                if row["attempts"] < MAX_ATTEMPTS:
                    db.execute(
                        "UPDATE jobs SET state = 'queued', lease_owner = NULL, "
                        "lease_expires_at = NULL, updated_at = ? WHERE id = ?",
                        (now, row["id"]),
                    )
                    requeued.append(row["id"])
                else:
                    db.execute(
                        "UPDATE jobs SET state = 'failed', problem = ?, lease_expires_at = NULL, "
                        "updated_at = ?, expires_at = ? WHERE id = ?",
                        (
                            encode_json(worker_lost_problem(row["attempts"])),
                            now,
                            now + self.config.result_ttl_s,
                            row["id"],
                        ),
                    )
                    job = self._job(db, row["id"])
                    assert job is not None
                    failed.append(job)
        return Recovered(tuple(requeued), tuple(failed))

    def expire(self, limit: int = 100) -> list[Job]:
        now = self.clock()
        if self._read_one("SELECT 1 FROM jobs WHERE expires_at <= ? LIMIT 1", now) is None:
            return []
        with self._write() as db:
            rows = db.execute(
                "SELECT * FROM jobs WHERE expires_at <= ? ORDER BY expires_at LIMIT ?",
                (now, limit),
            ).fetchall()
            db.executemany("DELETE FROM jobs WHERE id = ?", [(row["id"],) for row in rows])
        return [job_from_fields(row) for row in rows]

    def usage(self) -> Usage:
        with self._guard():
            rows = (
                self._conn()
                .execute(
                    "SELECT state, COUNT(*) AS n, COALESCE(SUM(upload_bytes), 0) AS bytes "
                    "FROM jobs GROUP BY state"
                )
                .fetchall()
            )
        counts = {JobState(row["state"]): (row["n"], row["bytes"]) for row in rows}
        return Usage(
            queued=counts.get(JobState.QUEUED, (0, 0))[0],
            running=counts.get(JobState.RUNNING, (0, 0))[0],
            done=counts.get(JobState.DONE, (0, 0))[0],
            failed=counts.get(JobState.FAILED, (0, 0))[0],
            pending_bytes=sum(
                counts.get(s, (0, 0))[1] for s in (JobState.QUEUED, JobState.RUNNING)
            ),
        )

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self._local = threading.local()

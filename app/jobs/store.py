"""The job store interface, shared by the SQLite and the Redis implementation.

Every method is one atomic step (a SQLite transaction, a Redis Lua script), safe when
several threads, processes or replicas call it at once:

- `enqueue` admits a job unless the pending jobs or their upload bytes are at the bound
  (`QueueFull`);
- `claim` hands the oldest queued job to one caller, under a lease (`Job.lease_owner`,
  new at every claim) that lasts `lease_s` unless `renew`ed;
- `complete` / `fail` end a running job only while the caller's lease is valid: held (the
  compare-and-set is on `lease_owner`) and not expired. A job ends once, and a worker
  whose lease ran out can't end it, even before another worker has taken the job over;
- `requeue_expired` puts running jobs whose lease ran out back in the queue for their
  second attempt, or fails them with the reason after the second;
- `expire` deletes ended jobs whose result has outlived `result_ttl_s`.

Methods are blocking; async callers run them in a thread. Store failures (Redis down,
SQLite locked past its timeout) raise `StoreUnavailable`.
"""

from __future__ import annotations

import json
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, Protocol

from app.errors import PROBLEM_BASE
from app.jobs.config import JobsConfig
from app.jobs.model import MAX_ATTEMPTS, Job, JobState, JSONObject, NewJob

Clock = Callable[[], float]


class QueueFull(Exception):
    """No room for one more job: too many pending, or their uploads fill the byte budget.
    The routes answer 503 with `Retry-After: retry_after_s`."""

    def __init__(self, reason: Literal["jobs", "bytes"], retry_after_s: int) -> None:
        super().__init__(f"job queue full ({reason}); retry after {retry_after_s} s")
        self.reason = reason
        self.retry_after_s = retry_after_s


class StoreUnavailable(Exception):
    """The store could not be reached or did not answer in time (a 503, not a lost job)."""


class DeleteOutcome(StrEnum):
    DELETED = "deleted"  # it was queued (now cancelled) or ended (now forgotten)
    RUNNING = "running"  # a worker runs it: not deleted
    NOT_FOUND = "not-found"  # no such job for this owner


@dataclass(frozen=True)
class Deleted:
    outcome: DeleteOutcome
    job: Job | None  # the job as it was, when it was deleted


@dataclass(frozen=True)
class Recovered:
    """What `requeue_expired` did: ids put back in the queue, jobs it failed (their
    callbacks and uploads are the caller's to handle)."""

    requeued: tuple[str, ...] = ()
    failed: tuple[Job, ...] = ()


@dataclass(frozen=True)
class Usage:
    queued: int
    running: int
    done: int
    failed: int
    pending_bytes: int  # uploads of queued and running jobs

    @property
    def pending(self) -> int:
        return self.queued + self.running


class JobStore(ABC):
    """The operations the routes and the workers need; see the module docstring."""

    def __init__(self, config: JobsConfig, clock: Clock = time.time) -> None:
        self.config = config
        self.clock = clock

    @abstractmethod
    def enqueue(self, new: NewJob) -> Job:
        """Admit a queued job, or raise `QueueFull` (nothing stored then)."""

    @abstractmethod
    def claim(self, worker: str) -> Job | None:
        """Take the oldest queued job: running, attempts + 1, a fresh lease. None if none."""

    @abstractmethod
    def renew(self, job_id: str, lease_owner: str) -> bool:
        """Extend a valid lease to now + lease_s; False when it was lost or had expired."""

    @abstractmethod
    def complete(self, job_id: str, lease_owner: str, result: JSONObject) -> Job | None:
        """Running → done with `result`, if the caller's lease is valid; the ended job, or
        None (the lease expired or was lost, or the job ended already)."""

    @abstractmethod
    def fail(self, job_id: str, lease_owner: str, problem: JSONObject) -> Job | None:
        """Running → failed with `problem`, under the same rule as `complete`."""

    @abstractmethod
    def release(self, job_id: str, lease_owner: str) -> bool:
        """Running → queued, the attempt not counted (a worker stopping, or a run deferred)."""

    @abstractmethod
    def peek(self, job_id: str) -> Job | None:
        """The job whoever owns it (for workers and housekeeping, never for a route)."""

    @abstractmethod
    def delete(self, job_id: str, owner: str) -> Deleted:
        """Cancel a queued job or forget an ended one; a running job is left alone."""

    @abstractmethod
    def requeue_expired(self, limit: int = 100) -> Recovered:
        """Up to `limit` running jobs whose lease expired: back to queued, or failed (with
        `worker_lost_problem`) when they had their MAX_ATTEMPTS."""

    @abstractmethod
    def expire(self, limit: int = 100) -> list[Job]:
        """Delete up to `limit` ended jobs past their `expires_at`; the deleted jobs."""

    @abstractmethod
    def usage(self) -> Usage:
        """Jobs per state and the pending upload bytes (for metrics and early refusals)."""

    @abstractmethod
    def close(self) -> None: ...

    def get(self, job_id: str, owner: str) -> Job | None:
        """The job if `owner` made it and it has not expired; None otherwise, so another
        owner can't tell a job that exists from one that doesn't."""
        job = self.peek(job_id)
        if job is None or not secrets.compare_digest(job.owner, owner):
            return None
        if job.expires_at is not None and job.expires_at <= self.clock():
            return None
        return job

    # --- helpers shared by the implementations -------------------------------------

    def new_lease_owner(self, worker: str) -> str:
        return f"{worker}/{secrets.token_urlsafe(9)}"

    def queue_full(self, reason: Literal["jobs", "bytes"]) -> QueueFull:
        return QueueFull(reason, self.config.retry_after_s)


def worker_lost_problem(attempts: int = MAX_ATTEMPTS) -> JSONObject:
    """The problem a job ends with when its worker was lost on its last attempt."""
    return {
        "type": PROBLEM_BASE + "job-worker-lost",
        "title": "The job's worker stopped while running it",
        "status": 500,
        "detail": f"the worker running this job stopped (its lease expired) on attempt "
        f"{attempts} of {MAX_ATTEMPTS}; the job is not retried again",
    }


def encode_json(value: JSONObject) -> str:
    """Compact JSON; NaN and infinities refused (they are not JSON)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _optional_float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


def _optional_json(value: Any) -> JSONObject | None:
    if value in (None, ""):
        return None
    decoded = json.loads(value)
    if not isinstance(decoded, dict):
        raise ValueError("a stored JSON field is not an object")
    return decoded


class Fields(Protocol):
    """A SQLite row or a Redis hash, read by column name."""

    def __getitem__(self, key: str, /) -> Any: ...


def job_from_fields(fields: Fields) -> Job:
    """A Job from a SQLite row or a Redis hash (where every value is a string)."""
    return Job(
        id=str(fields["id"]),
        owner=str(fields["owner"]),
        state=JobState(fields["state"]),
        created_at=float(fields["created_at"]),
        updated_at=float(fields["updated_at"]),
        expires_at=_optional_float(fields["expires_at"]),
        attempts=int(fields["attempts"]),
        lease_owner=str(fields["lease_owner"]) if fields["lease_owner"] else None,
        lease_expires_at=_optional_float(fields["lease_expires_at"]),
        upload_path=str(fields["upload_path"]),
        upload_bytes=int(fields["upload_bytes"]),
        params=_optional_json(fields["params"]) or {},
        result=_optional_json(fields["result"]),
        problem=_optional_json(fields["problem"]),
        callback_url=str(fields["callback_url"]) if fields["callback_url"] else None,
    )

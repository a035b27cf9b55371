"""The job record, its states, and the ids and owner hashes that name and guard it.

A job is created `queued`, becomes `running` when a worker claims it under a lease, and
ends `done` (with the diagnosis JSON) or `failed` (with a problem+json body). A running
job whose lease expires goes back to `queued` once (`MAX_ATTEMPTS`), then fails.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# A job runs at most twice: the first attempt, and one retry after its worker was lost
# (crash, SIGKILL, lease expired). A job that fails by itself is not retried.
MAX_ATTEMPTS = 2

# 24 random bytes: 192 bits, 32 URL-safe characters.
_ID_BYTES = 24
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{32}$")
ANONYMOUS = "anonymous"  # the owner of every job when the service runs without API keys

JSONObject = dict[str, Any]


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED)


PENDING_STATES = (JobState.QUEUED, JobState.RUNNING)


def new_job_id() -> str:
    """An unguessable id: 192 random bits from the OS's CSPRNG, URL-safe."""
    return secrets.token_urlsafe(_ID_BYTES)


def valid_job_id(job_id: str) -> bool:
    """Whether `job_id` has the shape `new_job_id` makes (checked before it names a file)."""
    return _ID_PATTERN.fullmatch(job_id) is not None


def job_ref(job_id: str) -> str:
    """The id's first 8 characters, for logs: enough to correlate, not enough to fetch."""
    return job_id[:8]


def owner_for(api_key: str | None) -> str:
    """The owner recorded on a job: SHA-256 of the caller's API key (never the key itself),
    or `ANONYMOUS` when the service runs without keys. Stable across processes and
    replicas, so any replica can check ownership."""
    if api_key is None:
        return ANONYMOUS
    digest = hashlib.sha256(b"covidct-job-owner\x00" + api_key.encode("utf-8", "replace"))
    return digest.hexdigest()


@dataclass(frozen=True)
class NewJob:
    """What a submission hands the store: its upload (already on disk) and its form fields."""

    id: str
    owner: str
    upload_path: str
    upload_bytes: int
    params: JSONObject = field(default_factory=dict)  # patient_id, threshold, ... of the form
    callback_url: str | None = None

    def __post_init__(self) -> None:
        if not valid_job_id(self.id):
            raise ValueError("id must come from new_job_id(). Received: a malformed id")
        if self.upload_bytes < 0:
            raise ValueError(f"upload_bytes must be >= 0. Received: {self.upload_bytes}")
        if not self.owner:
            raise ValueError("owner must not be empty (use ANONYMOUS). Received: ''")


@dataclass(frozen=True)
class Job:
    """One job as the store holds it. Times are seconds since the epoch (the store's clock).

    `lease_owner` names the claim that runs (or ran) the job: the worker's name and a random
    token, new at every claim, so a worker that lost its lease can't finish the job under
    the new one. `expires_at` is set when the job ends: the job and its result are deleted
    then. `upload_bytes` counts against the upload budget while the job is pending.
    """

    id: str
    owner: str
    state: JobState
    created_at: float
    updated_at: float
    expires_at: float | None
    attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    upload_path: str
    upload_bytes: int
    params: JSONObject
    result: JSONObject | None
    problem: JSONObject | None
    callback_url: str | None

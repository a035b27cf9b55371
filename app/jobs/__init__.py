"""Asynchronous jobs: a store (SQLite on one host, Redis for several replicas), uploads
waiting on disk under a byte budget, a worker loop, and signed callbacks.

The routes use `JobService` (submit, get, delete); each service process runs one
`JobWorker`. Nothing here reads the settings: `JobsConfig` is built from them at start-up.
"""

from __future__ import annotations

import time

from app.jobs.callbacks import (
    SIGNATURE_HEADER,
    CallbackRefused,
    CallbackSender,
    check_callback_url,
    sign,
)
from app.jobs.config import JobsConfig
from app.jobs.model import (
    ANONYMOUS,
    MAX_ATTEMPTS,
    Job,
    JobState,
    NewJob,
    new_job_id,
    owner_for,
)
from app.jobs.service import JobService
from app.jobs.store import (
    Clock,
    Deleted,
    DeleteOutcome,
    JobStore,
    QueueFull,
    Recovered,
    StoreUnavailable,
    Usage,
)
from app.jobs.uploads import UploadArea, UploadTooLarge
from app.jobs.worker import JobWorker, RunDeferred

__all__ = [
    "ANONYMOUS",
    "MAX_ATTEMPTS",
    "SIGNATURE_HEADER",
    "CallbackRefused",
    "CallbackSender",
    "DeleteOutcome",
    "Deleted",
    "Job",
    "JobService",
    "JobState",
    "JobStore",
    "JobWorker",
    "JobsConfig",
    "NewJob",
    "QueueFull",
    "Recovered",
    "RunDeferred",
    "StoreUnavailable",
    "UploadArea",
    "UploadTooLarge",
    "Usage",
    "check_callback_url",
    "new_job_id",
    "open_service",
    "open_store",
    "owner_for",
    "sign",
]


def open_store(config: JobsConfig, clock: Clock = time.time) -> JobStore:
    """The store `config.store_url` names: SQLite (the default) or Redis."""
    if config.store_kind == "redis":
        from app.jobs.redis_store import RedisJobStore

        return RedisJobStore.from_url(config.store_url, config, clock)
    from app.jobs.sqlite import SqliteJobStore

    return SqliteJobStore(config.sqlite_path, config, clock)


def open_service(config: JobsConfig, clock: Clock = time.time) -> JobService:
    """The store and the upload area of `config`, ready for the routes and the worker."""
    return JobService(open_store(config, clock), UploadArea(config.uploads_dir), config)

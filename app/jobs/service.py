"""What the routes call: submit, get, delete; and the clean-up that follows a job's end.

`JobService` ties the store (job records, the bounds) to the upload area (files), so an
upload never outlives its job: it is deleted when the job ends, is cancelled or expires,
and when a submission is refused. All methods block; async routes run them in a thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import BinaryIO

from app.jobs.callbacks import check_callback_url
from app.jobs.config import JobsConfig
from app.jobs.model import Job, JSONObject, NewJob, job_ref, new_job_id
from app.jobs.store import Deleted, DeleteOutcome, JobStore
from app.jobs.uploads import UploadArea, UploadTooLarge

logger = logging.getLogger(__name__)


class JobService:
    def __init__(self, store: JobStore, uploads: UploadArea, config: JobsConfig) -> None:
        self.store = store
        self.uploads = uploads
        self.config = config
        # Called with a job's id when it is deleted or expires: what else is kept per job
        # (e.g. its DICOM results, app/reports/store.py) goes with it.
        self.forget_hooks: list[Callable[[str], object]] = []

    def check_room(self, size_hint: int | None = None) -> None:
        """Refuse early, before an upload is copied: `QueueFull` when the queue or the byte
        budget is full already, `UploadTooLarge` when the upload can never fit."""
        if size_hint is not None and size_hint > self.config.upload_budget_bytes:
            raise UploadTooLarge(self.config.upload_budget_bytes)
        usage = self.store.usage()
        if usage.pending >= self.config.max_queued_jobs:
            raise self.store.queue_full("jobs")
        if usage.pending_bytes + (size_hint or 0) > self.config.upload_budget_bytes:
            raise self.store.queue_full("bytes")

    def submit(
        self,
        *,
        owner: str,
        source: BinaryIO,
        params: JSONObject,
        callback_url: str | None = None,
        size_hint: int | None = None,
        job_id: str | None = None,
    ) -> Job:
        """Queue a job for `source` (read to its end): the queued job, or `CallbackRefused`,
        `UploadTooLarge`, `QueueFull` (nothing kept on disk or in the store then).

        `job_id`: an id drawn earlier with `new_job_id()` (a study received over STOW-RS
        names its job before it is queued); a new one by default."""
        if callback_url is not None:
            check_callback_url(callback_url, self.config.callback_allowlist)
        self.check_room(size_hint)
        if job_id is None:
            job_id = new_job_id()
        else:  # a try cut short by a crash may have left a part of this very upload
            self.uploads.discard_part(job_id)
        name, size = self.uploads.write(job_id, source, max_bytes=self.config.upload_budget_bytes)
        new = NewJob(job_id, owner, name, size, params, callback_url)
        try:
            job = self.store.enqueue(new)
        except BaseException:
            self.uploads.delete(name)
            raise
        logger.info("job queued", extra={"job": job_ref(job.id), "bytes": size})
        return job

    def get(self, job_id: str, owner: str) -> Job | None:
        return self.store.get(job_id, owner)

    def delete(self, job_id: str, owner: str) -> Deleted:
        """Cancel a queued job or forget an ended one, with its upload."""
        deleted = self.store.delete(job_id, owner)
        if deleted.outcome is DeleteOutcome.DELETED and deleted.job is not None:
            self.uploads.delete(deleted.job.upload_path)
            self._forget(job_id)
            logger.info(
                "job deleted", extra={"job": job_ref(job_id), "state": deleted.job.state.value}
            )
        return deleted

    def ended(self, job: Job) -> None:
        """A job ended (done or failed): its upload is not needed any more."""
        self.uploads.delete(job.upload_path)

    def expire(self) -> list[Job]:
        """Delete ended jobs past their expiry, and whatever upload they left."""
        expired = self.store.expire()
        for job in expired:
            self.uploads.delete(job.upload_path)
            self._forget(job.id)
        if expired:
            logger.info("jobs expired", extra={"count": len(expired)})
        return expired

    def _forget(self, job_id: str) -> None:
        for hook in self.forget_hooks:
            try:
                hook(job_id)
            except Exception:  # a hook's failure must not keep the job record alive
                logger.exception("job clean-up hook failed", extra={"job": job_ref(job_id)})

    def sweep_uploads(self, older_than_s: float = 3600.0) -> int:
        """Delete upload files no pending job owns (left by a crash); see UploadArea.sweep."""

        def is_pending(job_id: str) -> bool:
            job = self.store.peek(job_id)
            return job is not None and not job.state.ended

        return self.uploads.sweep(is_pending, older_than_s=older_than_s)

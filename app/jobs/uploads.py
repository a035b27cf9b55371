"""Uploads waiting for their job's turn: files in the uploads directory, one per job.

A file is written as `.<id>.part`, flushed to disk, then renamed to `<id>.upload`, so a
reader never sees half a file. Jobs record the name relative to the directory, so
replicas that mount a shared directory at different paths agree. The byte budget is
kept by the store (atomically, with the job count); this module refuses a single upload
larger than the whole budget (`UploadTooLarge`) and deletes files once their job ends.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from app.durable import fsync_dir
from app.jobs.model import job_ref, valid_job_id

logger = logging.getLogger(__name__)

_SUFFIX = ".upload"
_PART_SUFFIX = ".part"
_CHUNK = 1024 * 1024


class UploadTooLarge(Exception):
    """One upload larger than the whole upload budget: it could never be queued (413)."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"upload exceeds the job upload budget of {limit_bytes} bytes")
        self.limit_bytes = limit_bytes


class UploadArea:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def name_for(self, job_id: str) -> str:
        if not valid_job_id(job_id):
            raise ValueError("job id must come from new_job_id(). Received: a malformed id")
        return job_id + _SUFFIX

    def path_of(self, name: str) -> Path:
        """The file a job's `upload_path` names (a name inside this directory, no more)."""
        path = self.directory / name
        if name in ("", ".", "..") or path.parent != self.directory:
            raise ValueError("an upload name must be a plain name inside the uploads directory")
        return path

    def write(self, job_id: str, source: BinaryIO, *, max_bytes: int) -> tuple[str, int]:
        """Copy `source` into the job's upload file; its name and size in bytes.

        Raises `UploadTooLarge` past `max_bytes` (nothing is left on disk then)."""
        name = self.name_for(job_id)
        part = self.directory / f".{job_id}{_PART_SUFFIX}"
        size = 0
        try:
            with part.open("xb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(max_bytes)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(part, self.directory / name)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        self._sync_directory()
        return name, size

    def discard_part(self, job_id: str) -> None:
        """Remove the unfinished copy of a job's upload (a write cut short by a crash)."""
        self.name_for(job_id)  # checks the id's shape before it names a file
        (self.directory / f".{job_id}{_PART_SUFFIX}").unlink(missing_ok=True)

    def delete(self, name: str) -> bool:
        """Remove an upload (a file, or a folder of files); False if it was gone already."""
        path = self.path_of(name)
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            return False
        return True

    def sweep(
        self,
        is_pending: Callable[[str], bool],
        *,
        older_than_s: float = 3600.0,
        now: float | None = None,
    ) -> int:
        """Delete uploads left behind (a crash between writing and queueing, or between a
        job's end and its clean-up): files older than `older_than_s` whose job is not
        pending. Younger files may belong to a submission still on its way."""
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for path in self.directory.iterdir():
            job_id = path.name.removeprefix(".").removesuffix(_PART_SUFFIX).removesuffix(_SUFFIX)
            try:
                old = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            orphan = old and (not valid_job_id(job_id) or not is_pending(job_id))
            if orphan and self.delete(path.name):
                logger.info("orphaned upload removed", extra={"job": job_ref(job_id)})
                removed += 1
        return removed

    def _sync_directory(self) -> None:
        """Make the rename durable (the directory entry), where the platform allows it."""
        fsync_dir(self.directory)

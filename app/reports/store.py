"""The DICOM results of finished jobs on disk: one folder per job id, deleted with the job.

A job's folder holds its objects as Part 10 files (`000.dcm`, `001.dcm` … in the order of
`DicomResults`: the SR, the key images, the overlays) and `manifest.json`: what was made,
why something was not (no overlays, a source that could not make results) and, with a
configured DICOMweb destination, the push outcome. It is written to `.<id>.part` and
renamed, so a reader never sees half of it. The files hold patient data (the copied
patient and study modules): they are deleted when the job is deleted or expires
(`JobService` calls `delete`), and never logged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from app.jobs.model import job_ref, valid_job_id

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PART = ".part"


class ResultFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _folder(self, job_id: str) -> Path:
        if not valid_job_id(job_id):
            raise ValueError("job id must come from new_job_id(). Received: a malformed id")
        return self.directory / job_id

    def write(self, job_id: str, parts: Iterable[bytes], manifest: dict[str, Any]) -> int:
        """Store a job's objects and manifest, replacing what was there; how many objects."""
        folder = self._folder(job_id)
        part = self.directory / f".{job_id}{_PART}"
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir()
        count = 0
        try:
            for count, data in enumerate(parts, start=1):
                (part / f"{count - 1:03d}.dcm").write_bytes(data)
            (part / MANIFEST).write_text(json.dumps({**manifest, "objects": count}))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(part, folder)
        except BaseException:
            shutil.rmtree(part, ignore_errors=True)
            raise
        return count

    def manifest(self, job_id: str) -> dict[str, Any] | None:
        """The job's manifest; None when nothing was stored for it."""
        try:
            value = json.loads((self._folder(job_id) / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def update_manifest(self, job_id: str, **fields: Any) -> None:
        """Add fields to a stored manifest (e.g. the push outcome); no-op when none."""
        manifest = self.manifest(job_id)
        if manifest is None:
            return
        path = self._folder(job_id) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**manifest, **fields}))
        os.replace(tmp, path)

    def objects(self, job_id: str) -> Iterator[bytes]:
        """The job's Part 10 files, in order (none when nothing was stored)."""
        folder = self._folder(job_id)
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.dcm")):
            yield path.read_bytes()

    def sweep(self, job_exists: Callable[[str], bool], *, older_than_s: float = 3600.0) -> int:
        """Delete results left behind (a crash between a job's deletion and theirs, or a
        part folder of a write cut short): folders older than `older_than_s` whose job no
        longer exists. How many were removed."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.directory.iterdir():
            job_id = path.name.removeprefix(".").removesuffix(_PART)
            try:
                old = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            part = path.name.endswith(_PART)
            if old and (part or not valid_job_id(job_id) or not job_exists(job_id)):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
        if removed:
            logger.info("orphaned dicom results removed", extra={"count": removed})
        return removed

    def delete(self, job_id: str) -> bool:
        """Remove a job's results; False when there were none."""
        if not valid_job_id(job_id):
            return False
        shutil.rmtree(self.directory / f".{job_id}{_PART}", ignore_errors=True)
        folder = self.directory / job_id
        if not folder.exists():
            return False
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("dicom results deleted", extra={"job": job_ref(job_id)})
        return True

"""Studies being received over STOW-RS: on disk until they have been quiet long enough to
become one job each.

    <dir>/incoming/          parts as they stream in (moved into a study once checked)
    <dir>/studies/<job id>/  one pending study: study.json and <SOP Instance UID>.dcm files
    <dir>/index/<key>        per owner and Study Instance UID: the pending job, and the jobs
                             the study became before (for GET /jobs?study_instance_uid=)
    <dir>/locks/<n>.lock     64 lock files; a study's key picks one (flock)

A study's job id is drawn when its first instance arrives, so every STOW-RS answer can
name it. Each instance is flushed to disk before it is acknowledged, and a study's record
(study.json) is replaced atomically, so what was acknowledged survives a crash; pending
studies are found on disk again at start-up and flushed once quiet. Instances arriving
after their study was flushed start another job.

Every change to one study happens under its lock (an flock, which holds across threads,
processes, and replicas sharing the directory where the file system honours it), and a
flush skips a study whose job already exists in the store (a crash between queueing the
job and clearing the study), so a study becomes one job, once. Tag values never reach logs;
files are named by job id, by SOP Instance UID (digits and dots), or by a hash.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from app.dicomweb.instances import CheckedInstance, InstanceRefused
from app.dicomweb.multipart import part_file
from app.dicomweb.response import FailureReason
from app.durable import fsync_dir, fsync_file
from app.jobs.model import job_ref, new_job_id, valid_job_id

logger = logging.getLogger(__name__)

_STRIPES = 64
_META = "study.json"
_SUFFIX = ".dcm"
Clock = Callable[[], float]


@dataclass(frozen=True)
class StudyLimits:
    """What one pending study may hold: the zip route's limits on one upload, and the job
    upload budget."""

    max_instances: int
    max_bytes: int
    max_frames: int


@dataclass(frozen=True)
class PendingStudy:
    """A study being received. `last_at`: when its last instance arrived (the quiet period
    counts from it). `patient_id` and `study_uid` are tag values: never logged."""

    job_id: str
    owner: str
    key: str
    study_uid: str
    patient_id: str
    request_id: str
    created_at: float
    last_at: float
    instances: int = 0
    bytes: int = 0
    frames: int = 0

    def quiet(self, now: float, quiet_s: float) -> bool:
        return now - self.last_at >= quiet_s


# What `flush` hands the study's zip to; raises to keep the study for a later try.
Submit = Callable[[PendingStudy, BinaryIO, int], None]


class PendingStudies:
    def __init__(
        self, directory: Path, limits: StudyLimits, *, quiet_s: float, clock: Clock = time.time
    ) -> None:
        self.directory = Path(directory)
        self.limits = limits
        self.quiet_s = quiet_s
        self.clock = clock
        self.incoming = self.directory / "incoming"
        self.studies = self.directory / "studies"
        self.index = self.directory / "index"
        self.locks = self.directory / "locks"
        for d in (self.incoming, self.studies, self.index, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    # --- names and locks -------------------------------------------------------------

    @staticmethod
    def key_for(owner: str, study_uid: str) -> str:
        """The study's name on disk: a hash of its owner and Study Instance UID."""
        data = b"covidct-stow\x00" + owner.encode() + b"\x00" + study_uid.encode()
        return hashlib.sha256(data).hexdigest()[:40]

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        path = self.locks / f"{int(key[:8], 16) % _STRIPES}.lock"
        with path.open("a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def new_part(self) -> tuple[Path, BinaryIO]:
        """A file for one part as it streams in."""
        return part_file(self.incoming)

    def _study_dir(self, job_id: str) -> Path:
        if not valid_job_id(job_id):
            raise ValueError("a pending study is named by a job id. Received: a malformed id")
        return self.studies / job_id

    # --- records -------------------------------------------------------------------

    def get(self, job_id: str) -> PendingStudy | None:
        """The pending study that will become job `job_id`, if it is still receiving."""
        if not valid_job_id(job_id):
            return None
        try:
            raw = json.loads((self.studies / job_id / _META).read_text(encoding="utf-8"))
            return PendingStudy(**raw)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (ValueError, TypeError):
            logger.warning("pending study record unreadable", extra={"job": job_ref(job_id)})
            return None

    def _write_meta(self, study: PendingStudy) -> None:
        _write_atomic(self._study_dir(study.job_id) / _META, dataclasses.asdict(study))

    def _read_index(self, key: str) -> dict[str, Any]:
        try:
            raw = json.loads((self.index / key).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raw = {}
        except ValueError:
            logger.warning("pending study index unreadable; started afresh")
            raw = {}
        return {"pending": raw.get("pending"), "jobs": list(raw.get("jobs", []))}

    def _write_index(self, key: str, index: dict[str, Any]) -> None:
        if index["pending"] is None and not index["jobs"]:
            (self.index / key).unlink(missing_ok=True)
        else:
            _write_atomic(self.index / key, index)

    # --- receiving -----------------------------------------------------------------

    def add(
        self,
        owner: str,
        instance: CheckedInstance,
        path: Path,
        size: int,
        *,
        request_id: str,
        submitted: Callable[[str], bool],
    ) -> str:
        """Move a checked instance (its file in `path`) into its pending study, started if
        none is; the study's job id. `submitted(job_id)`: whether that job already exists
        (then the study was flushed, and a new one starts). An instance already there
        (the same SOP Instance UID, sent again) is kept once. Raises InstanceRefused (out
        of resources) when the study would pass a limit; the file is the caller's then."""
        key = self.key_for(owner, instance.study_uid)
        now = self.clock()
        with self._locked(key):
            index = self._read_index(key)
            study = self.get(index["pending"]) if index["pending"] else None
            if study is not None and submitted(study.job_id):
                self._forget(key, index, study.job_id)  # flushed; its clean-up was cut short
                study = None
            if study is None:
                study = PendingStudy(
                    job_id=new_job_id(),
                    owner=owner,
                    key=key,
                    study_uid=instance.study_uid,
                    patient_id=instance.patient_id,
                    request_id=request_id,
                    created_at=now,
                    last_at=now,
                )
                self._study_dir(study.job_id).mkdir()
                self._write_meta(study)
                index["pending"] = study.job_id
                self._write_index(key, index)
                logger.info("stow: study receiving", extra={"job": job_ref(study.job_id)})
            target = self._study_dir(study.job_id) / f"{instance.sop_instance_uid}{_SUFFIX}"
            if target.exists():  # sent again: keep the first copy, the study is not quiet
                path.unlink(missing_ok=True)
                self._write_meta(dataclasses.replace(study, last_at=now))
                return study.job_id
            limits = self.limits
            if (
                study.instances + 1 > limits.max_instances
                or study.bytes + size > limits.max_bytes
                or study.frames + instance.frames > limits.max_frames
            ):
                logger.info(
                    "stow: instance over a study limit", extra={"job": job_ref(study.job_id)}
                )
                raise InstanceRefused(
                    FailureReason.OUT_OF_RESOURCES,
                    instance.sop_class_uid,
                    instance.sop_instance_uid,
                )
            fsync_file(path)
            os.replace(path, target)
            fsync_dir(target.parent)
            self._write_meta(
                dataclasses.replace(
                    study,
                    last_at=now,
                    instances=study.instances + 1,
                    bytes=study.bytes + size,
                    frames=study.frames + instance.frames,
                )
            )
            return study.job_id

    # --- becoming jobs ---------------------------------------------------------------

    def pending(self) -> list[PendingStudy]:
        found = []
        for entry in sorted(self.studies.iterdir()):
            study = self.get(entry.name)
            if study is not None:
                found.append(study)
        return found

    def due(self) -> list[PendingStudy]:
        """Pending studies that have been quiet for the quiet period."""
        now = self.clock()
        return [s for s in self.pending() if s.quiet(now, self.quiet_s)]

    def flush(
        self, job_id: str, submit: Submit, submitted: Callable[[str], bool]
    ) -> PendingStudy | None:
        """Turn a quiet pending study into its job: its instances zipped (stored, one
        member per instance, as the zip route takes them) and handed to `submit`; then the
        study is cleared. The study, when this call flushed it. When `submit` raises, the
        study stays for a later try."""
        study = self.get(job_id)
        if study is None:
            return None
        with self._locked(study.key):
            study = self.get(job_id)  # as it is now, under the lock
            if study is None or not study.quiet(self.clock(), self.quiet_s):
                return None
            index = self._read_index(study.key)
            if submitted(job_id):  # queued before a crash cut the clean-up short
                self._forget(study.key, index, job_id)
                return None
            if study.instances == 0:  # nothing was kept (every instance refused)
                self._forget(study.key, index, job_id, keep=False)
                return None
            fd, name = _zip_file(self.incoming)
            archive = Path(name)
            try:
                with os.fdopen(fd, "w+b") as out:
                    members = sorted(self._study_dir(job_id).glob(f"*{_SUFFIX}"))
                    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
                        for member in members:
                            zf.write(member, arcname=member.name)
                    size = out.tell()
                    out.seek(0)
                    submit(study, out, size)
            finally:
                archive.unlink(missing_ok=True)
            self._forget(study.key, index, job_id)
        logger.info(
            "stow: study became a job",
            extra={"job": job_ref(job_id), "instances": study.instances},
        )
        return study

    def _forget(self, key: str, index: dict[str, Any], job_id: str, *, keep: bool = True) -> None:
        """Clear a pending study (under its lock); `keep`: remember its job in the index."""
        if index["pending"] == job_id:
            index["pending"] = None
        if keep and job_id not in [j for j, _ in index["jobs"]]:
            index["jobs"].append([job_id, self.clock()])
        self._write_index(key, index)
        shutil.rmtree(self._study_dir(job_id), ignore_errors=True)

    # --- routes and housekeeping ---------------------------------------------------

    def cancel(self, job_id: str, owner: str) -> bool:
        """Drop a pending study of `owner` with its instances; whether there was one."""
        study = self.get(job_id)
        if study is None or not secrets.compare_digest(study.owner, owner):
            return False
        with self._locked(study.key):
            if self.get(job_id) is None:
                return False
            self._forget(study.key, self._read_index(study.key), job_id, keep=False)
        logger.info("stow: pending study cancelled", extra={"job": job_ref(job_id)})
        return True

    def jobs_of(self, owner: str, study_uid: str) -> list[str]:
        """The job ids a study of `owner` became or will become, newest first."""
        index = self._read_index(self.key_for(owner, study_uid))
        ids = [job_id for job_id, _ in index["jobs"]]
        if index["pending"]:
            ids.append(index["pending"])
        return ids[::-1]

    def usage(self) -> tuple[int, int]:
        """(pending studies, their bytes on disk): they count against the job bounds."""
        studies = self.pending()
        return len(studies), sum(s.bytes for s in studies)

    def sweep(self, *, keep_jobs_s: float, older_than_s: float = 3600.0) -> None:
        """Remove parts left by a crash (older than `older_than_s`) and index entries of
        jobs older than `keep_jobs_s` (their results have expired)."""
        now, wall = self.clock(), time.time()  # file times are the wall clock's
        for path in self.incoming.iterdir():
            try:
                if path.stat().st_mtime < wall - older_than_s:
                    path.unlink(missing_ok=True)
            except FileNotFoundError:
                continue
        for entry in self.studies.iterdir():  # a crash between mkdir and its record
            try:
                old = entry.stat().st_mtime < wall - older_than_s
            except FileNotFoundError:
                continue
            if old and not (entry / _META).exists():
                shutil.rmtree(entry, ignore_errors=True)
        for path in self.index.iterdir():
            if path.name.startswith("."):
                continue
            key = path.name
            with self._locked(key):
                index = self._read_index(key)
                index["jobs"] = [[j, t] for j, t in index["jobs"] if t > now - keep_jobs_s]
                if index["pending"] is not None and self.get(index["pending"]) is None:
                    index["pending"] = None
                self._write_index(key, index)


def _zip_file(directory: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=".study-", suffix=".zip", dir=directory)


def _write_atomic(path: Path, value: object) -> None:
    part = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    with part.open("w", encoding="utf-8") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    fsync_dir(path.parent)

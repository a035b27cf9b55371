"""Uploads on disk under the byte budget, and the service that keeps them tied to their
job: refused submissions leave nothing, ended, cancelled and expired jobs lose their file."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest

from app.jobs import (
    CallbackRefused,
    DeleteOutcome,
    JobService,
    JobState,
    QueueFull,
    UploadArea,
    UploadTooLarge,
    new_job_id,
    owner_for,
)

OWNER = owner_for("key-a")


def service_for(kit: Any, clock: Any, **config: Any) -> JobService:
    cfg = kit.config(**config)
    return JobService(kit.make(cfg, clock), UploadArea(cfg.uploads_dir), cfg)


def submit(service: JobService, payload: bytes, **extra: Any) -> Any:
    return service.submit(owner=OWNER, source=io.BytesIO(payload), params={"p": 1}, **extra)


def files(service: JobService) -> list[str]:
    return sorted(p.name for p in service.uploads.directory.iterdir())


def test_write_is_whole_or_nothing(tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads")
    job_id = new_job_id()
    name, size = area.write(job_id, io.BytesIO(b"x" * 3_000_000), max_bytes=3_000_000)
    assert (name, size) == (f"{job_id}.upload", 3_000_000)
    assert area.path_of(name).read_bytes() == b"x" * 3_000_000
    with pytest.raises(UploadTooLarge):
        area.write(new_job_id(), io.BytesIO(b"x" * 3_000_001), max_bytes=3_000_000)
    assert [p.name for p in area.directory.iterdir()] == [name]  # no part file left
    assert area.delete(name) is True and area.delete(name) is False


def test_names_stay_inside_the_directory(tmp_path: Path) -> None:
    area = UploadArea(tmp_path / "uploads")
    for name in ("../jobs.sqlite3", "a/b", "..", ""):
        with pytest.raises(ValueError):
            area.path_of(name)
    with pytest.raises(ValueError):
        area.name_for("../../etc/passwd")


def test_submit_keeps_the_upload_until_the_job_ends(kit: Any, clock: Any) -> None:
    service = service_for(kit, clock)
    job = submit(service, b"PK\x03\x04" + b"z" * 96)
    assert job.state is JobState.QUEUED and job.upload_bytes == 100
    assert service.uploads.path_of(job.upload_path).read_bytes() == b"PK\x03\x04" + b"z" * 96
    claimed = service.store.claim("w")
    assert claimed is not None and claimed.lease_owner is not None
    ended = service.store.complete(job.id, claimed.lease_owner, {"diagnosis": "covid"})
    assert ended is not None
    service.ended(ended)
    assert files(service) == []


def test_a_job_named_in_advance_survives_a_write_cut_short(kit: Any, clock: Any) -> None:
    # A study received over STOW-RS names its job before it is queued; a crash while its
    # upload was being written leaves that job's part file, which the next try replaces.
    service = service_for(kit, clock)
    job_id = new_job_id()
    (service.uploads.directory / f".{job_id}.part").write_bytes(b"half")
    job = submit(service, b"whole upload", job_id=job_id)
    assert job.id == job_id and service.store.peek(job_id) is not None
    assert files(service) == [f"{job_id}.upload"]
    assert service.uploads.path_of(job.upload_path).read_bytes() == b"whole upload"


def test_refused_submissions_leave_nothing(kit: Any, clock: Any) -> None:
    service = service_for(kit, clock, upload_budget_bytes=100, max_queued_jobs=2)
    first = submit(service, b"a" * 60)
    with pytest.raises(QueueFull) as refused:
        submit(service, b"b" * 41)  # 60 + 41 > 100, found out after copying it
    assert refused.value.reason == "bytes"
    with pytest.raises(QueueFull):
        submit(service, b"b" * 41, size_hint=41)  # found out before copying it
    with pytest.raises(UploadTooLarge):
        submit(service, b"c" * 101)  # larger than the whole budget: never fits
    with pytest.raises(UploadTooLarge):
        submit(service, b"c" * 101, size_hint=101)
    second = submit(service, b"d" * 40)
    with pytest.raises(QueueFull) as refused:
        submit(service, b"")
    assert refused.value.reason == "jobs"
    with pytest.raises(CallbackRefused):  # the allowlist is empty
        submit(service, b"e", callback_url="http://127.0.0.1:9/hook")
    assert files(service) == sorted([first.upload_path, second.upload_path])
    assert service.store.usage().queued == 2


def test_cancel_deletes_the_upload(kit: Any, clock: Any) -> None:
    service = service_for(kit, clock)
    job = submit(service, b"zip")
    assert service.delete(job.id, owner_for("key-b")).outcome is DeleteOutcome.NOT_FOUND
    assert files(service) == [job.upload_path]
    assert service.get(job.id, owner_for("key-b")) is None
    assert service.get(job.id, OWNER) is not None
    assert service.delete(job.id, OWNER).outcome is DeleteOutcome.DELETED
    assert files(service) == []
    assert service.get(job.id, OWNER) is None


def test_expiry_deletes_result_and_upload(kit: Any, clock: Any) -> None:
    service = service_for(kit, clock, result_ttl_s=600)
    job = submit(service, b"zip")
    claimed = service.store.claim("w")
    assert claimed is not None and claimed.lease_owner is not None
    # The job ends, but its process dies before removing the upload.
    service.store.complete(job.id, claimed.lease_owner, {"diagnosis": "covid"})
    assert files(service) == [job.upload_path]
    clock.advance(599)
    assert service.expire() == [] and service.get(job.id, OWNER) is not None
    clock.advance(1)
    assert [j.id for j in service.expire()] == [job.id]
    assert service.get(job.id, OWNER) is None and service.store.peek(job.id) is None
    assert files(service) == []


def test_sweep_removes_only_old_orphans(kit: Any, clock: Any) -> None:
    service = service_for(kit, clock)
    pending = submit(service, b"queued")
    area = service.uploads
    orphan, _ = area.write(new_job_id(), io.BytesIO(b"crash before enqueue"), max_bytes=100)
    young_orphan, _ = area.write(new_job_id(), io.BytesIO(b"being enqueued"), max_bytes=100)
    part = area.directory / f".{new_job_id()}.part"
    part.write_bytes(b"crash while copying")
    hour_ago = area.path_of(orphan).stat().st_mtime - 7200
    for name in (pending.upload_path, orphan, part.name):
        os.utime(area.directory / name, (hour_ago, hour_ago))
    assert service.sweep_uploads(older_than_s=3600) == 2
    assert files(service) == sorted([pending.upload_path, young_orphan])

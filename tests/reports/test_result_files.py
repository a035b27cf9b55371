"""Kept DICOM results: whole or nothing on disk, and gone with their job (deleted or expired)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from app.jobs import JobsConfig, new_job_id, open_service, owner_for
from app.reports.store import ResultFiles

OWNER = owner_for(None)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_write_read_replace_delete(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path / "results")
    job_id = new_job_id()
    assert files.manifest(job_id) is None and list(files.objects(job_id)) == []
    assert files.write(job_id, [b"sr", b"ko"], {"source": "dicom"}) == 2
    assert list(files.objects(job_id)) == [b"sr", b"ko"]
    assert files.manifest(job_id) == {"source": "dicom", "objects": 2}
    files.update_manifest(job_id, push={"outcome": "stored"})
    assert files.manifest(job_id) == {
        "source": "dicom",
        "objects": 2,
        "push": {"outcome": "stored"},
    }
    assert files.write(job_id, [b"sr2"], {"source": "dicom"}) == 1  # a second run replaces
    assert list(files.objects(job_id)) == [b"sr2"]
    assert [p.name for p in files.directory.iterdir()] == [job_id]  # no part folder left
    assert files.delete(job_id) is True and files.delete(job_id) is False
    with pytest.raises(ValueError):
        files.write("../escape", [b"x"], {})


def test_failed_write_leaves_the_old_results(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path / "results")
    job_id = new_job_id()
    files.write(job_id, [b"old"], {"source": "dicom"})

    def broken() -> object:
        yield b"new"
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.write(job_id, broken(), {"source": "dicom"})  # type: ignore[arg-type]
    assert list(files.objects(job_id)) == [b"old"]
    assert [p.name for p in files.directory.iterdir()] == [job_id]


@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_results_go_with_their_job(tmp_path: Path, how: str) -> None:
    clock = Clock()
    config = JobsConfig(data_dir=tmp_path, result_ttl_s=60.0)
    service = open_service(config, clock)
    files = ResultFiles(tmp_path / "dicom-results")
    service.forget_hooks.append(files.delete)
    job = service.submit(owner=OWNER, source=io.BytesIO(b"zip"), params={})
    claimed = service.store.claim("w")
    assert claimed is not None and claimed.id == job.id and claimed.lease_owner is not None
    files.write(job.id, [b"sr"], {"source": "dicom"})
    assert service.store.complete(job.id, claimed.lease_owner, {}) is not None
    if how == "deleted":
        service.delete(job.id, OWNER)
    else:
        clock.now += 61.0
        assert [j.id for j in service.expire()] == [job.id]
    assert files.manifest(job.id) is None and not (files.directory / job.id).exists()
    service.store.close()


def test_sweep_removes_old_orphans_only(tmp_path: Path) -> None:
    files = ResultFiles(tmp_path / "results")
    kept, orphan, young = new_job_id(), new_job_id(), new_job_id()
    for job_id in (kept, orphan, young):
        files.write(job_id, [b"sr"], {"source": "dicom"})
    part = files.directory / f".{new_job_id()}.part"
    part.mkdir()
    hour_ago = time.time() - 7200
    for path in (files.directory / kept, files.directory / orphan, part):
        os.utime(path, (hour_ago, hour_ago))
    assert files.sweep(lambda job_id: job_id == kept) == 2
    assert sorted(p.name for p in files.directory.iterdir()) == sorted([kept, young])

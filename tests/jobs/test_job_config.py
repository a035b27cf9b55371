"""JobsConfig's checks and store choice, and the records' own checks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from app.jobs import JobsConfig, JobState, NewJob, new_job_id, open_service, owner_for
from app.jobs.redis_store import RedisJobStore
from app.jobs.sqlite import SqliteJobStore


def test_the_default_store_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    config = JobsConfig(data_dir=tmp_path / "data")
    assert config.store_kind == "sqlite"
    assert config.sqlite_path == tmp_path / "data" / "jobs.sqlite3"
    assert config.uploads_dir == tmp_path / "data" / "uploads"
    service = open_service(config)
    assert isinstance(service.store, SqliteJobStore)
    job = service.submit(owner=owner_for(None), source=io.BytesIO(b"zip"), params={})
    assert job.owner == "anonymous" and job.state is JobState.QUEUED
    assert (tmp_path / "data" / "uploads" / job.upload_path).read_bytes() == b"zip"
    service.store.close()


def test_an_explicit_sqlite_path(tmp_path: Path) -> None:
    config = JobsConfig(data_dir=tmp_path, store_url=f"sqlite://{tmp_path}/elsewhere.db")
    assert config.store_kind == "sqlite" and config.sqlite_path == tmp_path / "elsewhere.db"


def test_redis_urls_choose_redis_and_keep_their_password_out_of_logs(tmp_path: Path) -> None:
    config = JobsConfig(
        data_dir=tmp_path, store_url="redis://:hunter2@redis.internal:6380/2", callback_secret="s"
    )
    assert config.store_kind == "redis"
    assert config.store_description() == "redis://redis.internal:6380/2"
    assert "hunter2" not in repr(config) and "callback_secret" not in repr(config)
    for url in ("rediss://redis.internal", "unix:///run/redis.sock"):
        assert JobsConfig(data_dir=tmp_path, store_url=url).store_kind == "redis"


def test_open_service_connects_to_redis(tmp_path: Path, redis_url: str) -> None:
    service = open_service(JobsConfig(data_dir=tmp_path, store_url=redis_url))
    assert isinstance(service.store, RedisJobStore)
    assert service.store.usage().pending >= 0
    service.store.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"store_url": "postgres://db/jobs"}, "store_url"),
        ({"lease_s": 0}, "lease_s"),
        ({"result_ttl_s": -1}, "result_ttl_s"),
        ({"upload_budget_bytes": 0}, "upload_budget_bytes"),
        ({"max_queued_jobs": 0}, "max_queued_jobs"),
        ({"callback_backoff_s": -1}, "callback_backoff_s"),
        ({"callback_allowlist": ("a.example", " "), "callback_secret": "s"}, "empty host"),
        ({"callback_allowlist": ("a.example",)}, "callback_secret"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JobsConfig(data_dir=tmp_path, **overrides)  # type: ignore[arg-type]


def test_allowlist_entries_are_normalised(tmp_path: Path) -> None:
    config = JobsConfig(
        data_dir=tmp_path, callback_allowlist=(" RIS.Example ",), callback_secret="s"
    )
    assert config.callback_allowlist == ("ris.example",)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"id": "../../etc/passwd"}, "id"),
        ({"upload_bytes": -1}, "upload_bytes"),
        ({"owner": ""}, "owner"),
    ],
)
def test_new_jobs_are_checked(fields: dict[str, object], message: str) -> None:
    values: dict[str, object] = {
        "id": new_job_id(),
        "owner": "o",
        "upload_path": "u",
        "upload_bytes": 1,
    }
    values.update(fields)
    with pytest.raises(ValueError, match=message):
        NewJob(**values)  # type: ignore[arg-type]

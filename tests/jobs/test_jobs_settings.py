"""The job and STOW-RS settings (COVIDCT_JOBS_*, COVIDCT_STOW_QUIET_S) become the frozen
configs the service runs with, checked at start-up with messages that name the setting."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in list(os.environ):
        if name.startswith("COVIDCT_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(f"COVIDCT_{name.upper()}", value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    config = settings(monkeypatch).service_config()
    jobs = config.jobs
    assert (jobs.data_dir, jobs.store_kind, jobs.sqlite_path) == (
        Path("var/jobs"),
        "sqlite",
        Path("var/jobs/jobs.sqlite3"),
    )
    assert (jobs.result_ttl_s, jobs.upload_budget_bytes, jobs.max_queued_jobs) == (
        86400,
        8 * 1024**3,
        200,
    )
    assert (jobs.lease_s, jobs.retry_after_s, jobs.poll_interval_s) == (60, 30, 0.5)
    assert (jobs.callback_allowlist, jobs.callback_attempts, jobs.callback_timeout_s) == ((), 5, 10)
    assert (config.job_workers, config.stow.quiet_s) == (1, 10)


def test_every_setting_reaches_its_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = settings(
        monkeypatch,
        jobs_data_dir=str(tmp_path),
        jobs_store_url="redis://:pa55word@redis.internal:6380/2",
        jobs_result_ttl_s="60",
        jobs_upload_budget_bytes="1000",
        jobs_max_queued="7",
        jobs_lease_s="12",
        jobs_retry_after_s="9",
        jobs_callback_allowlist='["Hooks.Example:8443"]',
        jobs_callback_secret="s3cret",
        jobs_callback_attempts="2",
        jobs_callback_backoff_s="0.5",
        jobs_callback_timeout_s="3",
        jobs_poll_interval_s="0.25",
        jobs_worker_concurrency="3",
        stow_quiet_s="2.5",
    ).service_config()
    jobs = config.jobs
    assert (jobs.data_dir, jobs.store_kind, jobs.store_url) == (
        tmp_path,
        "redis",
        "redis://:pa55word@redis.internal:6380/2",
    )
    assert "pa55word" not in repr(jobs) and "s3cret" not in repr(jobs)
    assert jobs.store_description() == "redis://redis.internal:6380/2"
    assert (jobs.result_ttl_s, jobs.upload_budget_bytes, jobs.max_queued_jobs) == (60, 1000, 7)
    assert (jobs.lease_s, jobs.retry_after_s, jobs.poll_interval_s) == (12, 9, 0.25)
    assert (jobs.callback_allowlist, jobs.callback_secret) == (("hooks.example:8443",), "s3cret")
    assert (jobs.callback_attempts, jobs.callback_backoff_s, jobs.callback_timeout_s) == (2, 0.5, 3)
    assert (config.job_workers, config.stow.quiet_s) == (3, 2.5)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"jobs_callback_allowlist": '["hooks.example"]'}, "callback_secret"),
        ({"jobs_store_url": "mysql://db/jobs"}, "store_url"),
        ({"jobs_max_queued": "0"}, "jobs_max_queued"),
        ({"stow_quiet_s": "-1"}, "stow_quiet_s"),
        ({"jobs_worker_concurrency": "0"}, "jobs_worker_concurrency"),
    ],
)
def test_bad_values_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], named: str
) -> None:
    with pytest.raises(ValidationError, match=named):
        settings(monkeypatch, **env)

"""Helpers for tests that run the real app."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from app.settings import Settings


def make_settings(model_dir: Path, **overrides: object) -> Settings:
    """Settings for tests: no .env file, a small batch."""
    values: dict[str, object] = {"model_dir": model_dir, "max_batch_size": 4}
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def wait_ready(client: TestClient, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = client.get("/health")
        if r.status_code == 200:
            return
        assert r.json()["status"] == "loading", r.json()
        time.sleep(0.2)
    raise TimeoutError("model did not become ready")

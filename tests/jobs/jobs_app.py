"""The real app for the job route tests: jobs in a temporary directory, API keys on, and a
stand-in model whose scores are known and which a test can hold mid-batch. Not a test
module."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.contract import ModelCard
from app.inference import InferenceEngine, ModelConfig
from app.main import create_app
from dicom_factory import synthetic_ct
from models.export import untrained_card
from support import make_settings

API_KEY, OTHER_KEY = "jobs-key-1", "jobs-key-2"
KEY = {"X-API-Key": API_KEY}
DEADLINE_S = 60.0  # bound of every wait; never reached when all is well


class GateModel:
    """Scores a slice 0.9 when its ROI is mostly dark (< 300), else 0.1; while `gate` is
    clear, each model call waits for it (so a test holds a job `running`)."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a model call has started

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        assert self.gate.wait(DEADLINE_S), "the test never opened the gate"
        dark = (batch[:, 240:340, 120:370, 0] < 300).mean(axis=(1, 2))
        return np.where(dark > 0.5, 0.9, 0.1).astype(np.float32)


def jobs_app(
    data_dir: Path, *, loading: threading.Event | None = None, **overrides: object
) -> tuple[FastAPI, GateModel]:
    """The app and its model. `loading`: the model stays loading until it is set."""
    model = GateModel(untrained_card(seed=0, head_init_std=0.02))

    def loader(config: ModelConfig) -> InferenceEngine:
        if loading is not None:
            assert loading.wait(DEADLINE_S), "the test never let the model load"
        return InferenceEngine(model, config.batching)

    values: dict[str, object] = {
        "decode_workers": 0,
        "jobs_data_dir": data_dir,
        "api_keys": [API_KEY, OTHER_KEY],
        "jobs_poll_interval_s": 0.05,
    }
    values.update(overrides)
    return create_app(make_settings(Path("unused-model-dir"), **values), loader=loader), model


@contextmanager
def running(app: FastAPI, *, ready: bool = True) -> Iterator[TestClient]:
    with TestClient(app) as client:
        deadline = time.monotonic() + DEADLINE_S
        while ready and client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/health").json()
            time.sleep(0.02)  # polling interval, bounded by the deadline
        yield client


def study_zip(n: int = 3) -> bytes:
    """A zip of `n` synthetic CT slices, lung-dark in the paper's ROI (patient data planted)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(n):
            values = np.full((512, 512), 1064, np.uint16)
            values[240:340, 120:370] = 100
            zf.writestr(f"s/{i}.dcm", synthetic_ct(values, z=-float(i), instance=i + 1))
    return buf.getvalue()


def submit(client: TestClient, archive: bytes, key: str = API_KEY, **form: Any) -> Any:
    data = {"patient_id": "patient-7", **form}
    return client.post(
        "/jobs", files={"file": ("s.zip", archive)}, data=data, headers={"X-API-Key": key}
    )


def wait_job(client: TestClient, job_id: str, key: str = API_KEY) -> Any:
    """The job once it has ended (the service's long poll: a bounded wait)."""
    r = client.get(f"/jobs/{job_id}", params={"wait": DEADLINE_S}, headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    assert r.json()["state"] in ("done", "failed"), r.json()
    return r.json()


def until(condition: Any, what: str) -> None:
    """Poll `condition()` (a state another thread changes) until it holds; bounded."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)  # polling interval, bounded by the deadline

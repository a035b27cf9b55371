"""Shared fixtures: a real SavedModel whose outputs vary with the input, and a running app."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.inference import FROZEN_WEIGHTS_ENV
from app.ingest import configure_libraries
from app.logs import protect_library_logs
from app.main import create_app
from support import WIDE_HEAD_STD, make_settings, wait_ready

TEST_SEED = 0

# This process trains, folds and compares models in eager Keras, where oneDNN's frozen-
# weights cache would hand one layer's weights to another of the same shape. The service
# turns it on in load_engine; test_inference checks that mode in a process of its own.
os.environ[FROZEN_WEIGHTS_ENV] = "0"

# What the service does at start-up: pydicom reads untrusted input without echoing tag
# values, GDCM is out of the decoders. Tests that call ingest directly rely on it.
configure_libraries()


def shared_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A temporary folder of this whole run: under pytest-xdist, the one its workers share
    (each worker's own base folder lies in it); without it, the session's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded SavedModel, built once per run: the first worker to ask builds it under a
    lock, the others wait for it and read the same files (nothing writes into it later)."""
    from models.architecture import build_fpn_resnet50v2
    from models.export import export_saved_model, untrained_card

    root = shared_tmp(tmp_path_factory)
    out = root / "seeded-model"
    with open(root / "seeded-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (out / "saved_model.pb").exists():
            building = root / f"seeded-model.{os.getpid()}"
            shutil.rmtree(building, ignore_errors=True)
            model = build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=TEST_SEED)
            card = untrained_card(seed=TEST_SEED, head_init_std=WIDE_HEAD_STD)
            export_saved_model(model, building, card)
            building.rename(out)
    return out


@pytest.fixture(scope="session")
def client(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The real ASGI app with the seeded SavedModel, loaded and warm."""
    jobs = tmp_path_factory.mktemp("jobs")  # its job store and uploads, not var/jobs
    app = create_app(make_settings(test_model_dir, jobs_data_dir=jobs))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def production_warning_filters() -> None:
    """The service's warning filters (set at its start); pytest resets filters per test."""
    protect_library_logs()

"""Shared fixtures: a real SavedModel whose outputs vary with the input, and a running app."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.architecture import build_fpn_resnet50v2
    from models.export import export_saved_model, untrained_card

    out = tmp_path_factory.mktemp("models") / "seeded"
    model = build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=TEST_SEED)
    export_saved_model(model, out, untrained_card(seed=TEST_SEED, head_init_std=WIDE_HEAD_STD))
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

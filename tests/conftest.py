"""Shared fixtures: a real SavedModel whose outputs vary with the input, and a running app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from support import make_settings, wait_ready

# With the paper's head initialisation (std 0.001) every slice scores ≈ 0.5, so tests that
# compare probabilities would prove nothing; this seeded, wider head makes outputs vary.
TEST_HEAD_INIT_STD = 0.5
TEST_SEED = 0


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from app.contract import ModelCard
    from models.architecture import build_fpn_resnet50v2
    from models.export import export_saved_model

    out = tmp_path_factory.mktemp("models") / "seeded"
    model = build_fpn_resnet50v2(head_init_std=TEST_HEAD_INIT_STD, seed=TEST_SEED)
    card = ModelCard(
        version="test-seeded-0",
        weights_source="untrained",
        weights_detail=f"seeded random init (seed {TEST_SEED}, head std {TEST_HEAD_INIT_STD})",
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    export_saved_model(model, out, card)
    return out


@pytest.fixture(scope="session")
def client(test_model_dir: Path) -> Iterator[TestClient]:
    """The real ASGI app with the seeded SavedModel, loaded and warm."""
    app = create_app(make_settings(test_model_dir))
    with TestClient(app) as c:
        wait_ready(c)
        yield c

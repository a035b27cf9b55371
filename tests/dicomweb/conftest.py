"""Fixtures of the DICOMweb tests: the app with a stand-in model, a real Orthanc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from orthanc_server import orthanc_install  # noqa: F401 (a fixture)
from stow_support import fast_app
from support import started


@pytest.fixture(scope="module")
def stow_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The real app with DarkLungModel, its jobs in a fresh directory, quiet period 0.2 s."""
    with started(fast_app(tmp_path_factory.mktemp("jobs"))) as client:
        yield client


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "jobs"

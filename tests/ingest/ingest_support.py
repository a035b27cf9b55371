"""Helpers of the ingest tests: zip and ingest in one call, images in HU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom

from app.domain import Study
from app.errors import CovidCTError
from app.ingest import IngestLimits, ingest_zip
from dicom_factory import PHI_STRINGS
from shared_data import zip_files


def ingest(files: list[tuple[str, bytes | Path]], **limits: Any) -> Study:
    """ingest_zip of these (member name, bytes or path) pairs, with these limits changed."""
    return ingest_zip(zip_files(files), IngestLimits(**limits))


def hu_image(shape: tuple[int, int] = (64, 64), seed: int = 0) -> np.ndarray:
    """HU values from air to bone."""
    return np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)


def stored(path: Path) -> np.ndarray:
    """A file's stored values, decoded by pydicom alone (the independent reference)."""
    return pydicom.dcmread(path).pixel_array


def assert_no_leak(error: CovidCTError) -> None:
    for planted in PHI_STRINGS:
        assert planted not in error.detail and planted not in str(error.extra)

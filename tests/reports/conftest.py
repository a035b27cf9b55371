"""Fixtures of the DICOM result tests; the sources and helpers are in report_inputs.py."""

from __future__ import annotations

import pytest

from app.reports import SourceStudy, source_study_from_headers
from report_inputs import p002_headers, p002_infected, synthetic_headers
from shared_data import P002


@pytest.fixture
def synthetic_study() -> SourceStudy:
    return source_study_from_headers(synthetic_headers())


@pytest.fixture(scope="session")
def p002_study() -> SourceStudy:
    if not P002.is_dir():
        pytest.skip(f"real CT fixtures not found at {P002.parent} (set COVIDCT_SHARED_DATA)")
    return source_study_from_headers(p002_headers(), derive_invalid_uids=True)


@pytest.fixture(scope="session")
def p002_probabilities(p002_study: SourceStudy) -> list[float]:
    """0.9 for the 68 slices marked infected, 0.1 for the others: stands in for the model."""
    infected = p002_infected()
    names = [p.name for p in sorted(P002.glob("*.dcm"))]
    return [0.9 if name in infected else 0.1 for name in names]

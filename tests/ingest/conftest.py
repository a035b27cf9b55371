"""Every ingest test: the patient data planted in the synthetic files and member names
never reaches a log record."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from dicom_factory import PHI_STRINGS


@pytest.fixture(autouse=True)
def no_patient_data_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    for planted in PHI_STRINGS:
        assert planted not in caplog.text

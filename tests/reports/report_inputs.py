"""Sources and inputs for the DICOM result tests (the fixtures are in conftest.py).

Two sources: a synthetic five-slice series whose patient and study values are made-up
patient data (so that tests can look for them where they must and must not appear), and
the real P002 headers from ../shared/data (skipped with a reason when absent).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage

from app.domain import Verdict
from app.reports import (
    ModelIdentity,
    Overlay,
    ReportInput,
    SliceScore,
    SourceStudy,
)
from shared_data import P002, P002_LABELS

# Made-up patient data: none of it may reach a log line or an error message.
PATIENT = {
    "PatientName": "Müller Jörg",  # no caret: highdicom would warn, quoting it, if handed it
    "PatientID": "PHI-ID-4711",
    "PatientBirthDate": "19700102",
    "PatientSex": "M",
    "PatientAge": "050Y",
    "StudyDate": "20200401",
    "StudyTime": "101500",
    "StudyID": "STUDY-PHI-9",
    "AccessionNumber": "ACC-PHI-77",
    "ReferringPhysicianName": "Referrer^Ruth",
    "StudyDescription": "CT CHEST PHI-DESCRIPTION",
}
# Attributes of other modules: a result must not copy them.
NOT_COPIED = {
    "SeriesDescription": "SOURCE-SERIES-DESCRIPTION",
    "InstitutionName": "PHI General Hospital",
    "StationName": "PHI-STATION",
}
STUDY_UID = "2.25.1000001"
SERIES_UID = "2.25.1000002"
SYNTHETIC_SLICES = 5
TRAINED = ModelIdentity(
    "fpn-resnet50v2-covidctset", "1.2.0", "trained: COVID-CTset fold 1", untrained=False
)
UNTRAINED = ModelIdentity(
    "fpn-resnet50v2-covidctset", "0.0.0+untrained.seed0", "untrained", untrained=True
)


def synthetic_headers(count: int = SYNTHETIC_SLICES) -> list[Dataset]:
    headers = []
    for i in range(count):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = f"2.25.{2000000 + i}"
        ds.StudyInstanceUID = STUDY_UID
        ds.SeriesInstanceUID = SERIES_UID
        ds.Modality = "CT"
        ds.BodyPartExamined = "CHEST"
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 64
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        for keyword, value in {**PATIENT, **NOT_COPIED}.items():
            setattr(ds, keyword, value)
        headers.append(ds)
    return headers


def p002_headers() -> list[Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(P002.glob("*.dcm"))]


def p002_infected() -> set[str]:
    """File names of the slices the radiologists marked as infected (the CSV's labels)."""
    with P002_LABELS.open(newline="") as f:
        return {row["file"] for row in csv.DictReader(f) if row["infected"] == "1"}


def report_input(
    study: SourceStudy,
    probabilities: Sequence[float],
    model: ModelIdentity,
    *,
    threshold: float = 0.1,
    overlays: Sequence[tuple[int, np.ndarray]] = (),
) -> ReportInput:
    """All slices of `study` selected, scored with `probabilities`; the verdict per the
    paper's rule (k >= max(1, ceil(t n)), counted here, not by app.diagnosis)."""
    selected = study.slices[: len(probabilities)]  # the first len(probabilities) slices
    scores = tuple(SliceScore(s, p) for s, p in zip(selected, probabilities, strict=True))
    k = sum(p > 0.5 for p in probabilities)
    n = len(probabilities)
    if n == 0:
        verdict = Verdict("indeterminate", 0, 0, 0, threshold, reason="no slice selected")
    else:
        required = max(1, math.ceil(threshold * n - 1e-9))
        outcome = "covid" if k >= required else "normal"
        verdict = Verdict(outcome, k, n, required, threshold, reason=f"{k} of {n} COVID")
    return ReportInput(
        study=study,
        verdict=verdict,
        scores=scores,
        model=model,
        overlays=tuple(Overlay(study.slices[i], rgb) for i, rgb in overlays),
    )

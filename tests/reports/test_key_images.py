"""The Key Object Selection: exactly the slices scored COVID, in the source study."""

from __future__ import annotations

import io

import pydicom

from app.reports import SourceStudy, build_key_images, part10_bytes, source_study_from_headers
from dicom3tools import assert_valid
from report_inputs import (
    PATIENT,
    STUDY_UID,
    TRAINED,
    UNTRAINED,
    p002_headers,
    p002_infected,
    report_input,
)
from shared_data import P002, needs_data

PROBABILITIES = [0.9, 0.2, 0.7, 0.1, 0.6]
DESCRIPTION = ("113012", "DCM")  # Key Object Description


def referenced_uids(document: pydicom.Dataset) -> list[str]:
    return [
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in document.ContentSequence
        if item.ValueType == "IMAGE"
    ]


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    return item.CodeValue, item.CodingSchemeDesignator


def description(document: pydicom.Dataset) -> str:
    [text] = [
        item.TextValue
        for item in document.ContentSequence
        if item.ValueType == "TEXT" and _code(item.ConceptNameCodeSequence[0]) == DESCRIPTION
    ]
    return str(text)


def test_key_images_are_the_covid_slices(synthetic_study: SourceStudy) -> None:
    document = build_key_images(report_input(synthetic_study, PROBABILITIES, TRAINED))
    assert document is not None
    back = pydicom.dcmread(io.BytesIO(part10_bytes(document)))
    # Probabilities 0.9, 0.7 and 0.6 are above 0.5: slices 1, 3 and 5.
    assert referenced_uids(back) == ["2.25.2000000", "2.25.2000002", "2.25.2000004"]
    assert back.StudyInstanceUID == STUDY_UID
    assert back.Modality == "KO"
    assert back.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    assert str(back.PatientName) == PATIENT["PatientName"]
    assert back.PatientID == PATIENT["PatientID"]
    assert "3 of 5 selected slices scored COVID-19" in description(back)
    assert "UNTRAINED" not in back.SeriesDescription
    # Last: skipped (outside CI) where dciodvfy is missing, after everything else ran.
    assert_valid(document, "KeyObjectSelectionDocument")


def test_untrained_key_images_warn(synthetic_study: SourceStudy) -> None:
    document = build_key_images(report_input(synthetic_study, PROBABILITIES, UNTRAINED))
    assert document is not None
    assert document.SeriesDescription.startswith("UNTRAINED MODEL - NOT FOR CLINICAL USE")
    assert description(document).startswith("UNTRAINED MODEL - NOT FOR CLINICAL USE")


def test_no_covid_slice_no_key_images(synthetic_study: SourceStudy) -> None:
    report = report_input(synthetic_study, [0.1, 0.2, 0.3, 0.4, 0.5], TRAINED)
    assert build_key_images(report) is None


@needs_data
def test_p002_key_images_are_the_labelled_slices(
    p002_study: SourceStudy, p002_probabilities: list[float]
) -> None:
    document = build_key_images(report_input(p002_study, p002_probabilities, TRAINED))
    assert document is not None
    # Expected: the stand-in UIDs of the files the CSV marks infected, derived again here.
    study = source_study_from_headers(p002_headers(), derive_invalid_uids=True)
    names = [p.name for p in sorted(P002.glob("*.dcm"))]
    infected = p002_infected()
    expected = [
        s.sop_instance_uid for s, n in zip(study.slices, names, strict=True) if n in infected
    ]
    assert len(expected) == 68
    assert referenced_uids(document) == expected
    # Last: skipped (outside CI) where dciodvfy is missing, after everything else ran.
    assert_valid(document, "KeyObjectSelectionDocument")

"""The builders' input: identifiers read from source headers, stand-ins, consistency checks."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from app.domain import Verdict
from app.reports import (
    ModelIdentity,
    Overlay,
    ReportInput,
    ReportInputError,
    SliceScore,
    SourceStudy,
    source_study_from_headers,
)
from app.reports.source import orientation_labels, uuid_uid
from report_inputs import (
    PATIENT,
    SERIES_UID,
    STUDY_UID,
    TRAINED,
    p002_headers,
    p002_infected,
    report_input,
    synthetic_headers,
)
from shared_data import needs_data


def test_uuid_uid_is_the_ps3_5_example() -> None:
    # PS3.5 B.2 gives this UUID and its UID as the worked example.
    value = uuid.UUID("f81d4fae-7dec-11d0-a765-00a0c91e6bf6")
    assert uuid_uid(value) == "2.25.329800735698586629295641978511506172918"


@pytest.mark.parametrize(
    ("cosines", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),  # axial, head first supine
        ([-1, 0, 0, 0, -1, 0], ("R", "A")),
        ([0, 1, 0, 0, 0, -1], ("P", "F")),  # sagittal
        ([0.8, 0.6, 0, 0, 0, -1], ("LP", "F")),  # oblique: strongest axis first
    ],
)
def test_orientation_labels(cosines: list[float], expected: tuple[str, str]) -> None:
    assert orientation_labels(cosines) == expected


def test_synthetic_headers_give_their_identifiers() -> None:
    study = source_study_from_headers(synthetic_headers())
    assert study.study_instance_uid == STUDY_UID
    assert study.derived_uids == ()
    assert [s.sop_instance_uid for s in study.slices] == [f"2.25.{2000000 + i}" for i in range(5)]
    assert {s.series_instance_uid for s in study.slices} == {SERIES_UID}
    assert study.slices[0].patient_orientation == ("L", "P")
    assert study.slices[2].instance_number == 3
    assert "PixelData" not in study.header


def test_invalid_uids_are_refused_by_attribute_name_only() -> None:
    headers = synthetic_headers()
    headers[1].SOPInstanceUID = ""
    headers[1].StudyInstanceUID = "not-a-uid-PHI"
    with pytest.raises(ReportInputError) as caught:
        source_study_from_headers(headers)
    message = str(caught.value)
    assert "slice 2" in message and "SOPInstanceUID" in message
    assert "not-a-uid-PHI" not in message


def test_a_study_uid_that_is_no_uuid_gets_no_stand_in() -> None:
    headers = synthetic_headers()
    headers[0].StudyInstanceUID = "free text PHI"
    with pytest.raises(ReportInputError, match="neither a DICOM UID nor a UUID") as caught:
        source_study_from_headers(headers, derive_invalid_uids=True)
    assert "PHI" not in str(caught.value)


@needs_data
def test_p002_headers_are_refused_without_stand_ins() -> None:
    # COVID-CT-MD was de-identified into UUID strings and empty SOP Instance UIDs.
    headers = p002_headers()
    raw_study_uid = str(headers[0].StudyInstanceUID)
    with pytest.raises(ReportInputError) as caught:
        source_study_from_headers(headers)
    assert "SOPInstanceUID" in str(caught.value)
    assert raw_study_uid not in str(caught.value)


@needs_data
def test_p002_stand_ins_follow_ps3_5_and_stay_unique() -> None:
    headers = p002_headers()
    study = source_study_from_headers(headers, derive_invalid_uids=True)
    raw_study, raw_series = str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID)
    assert study.study_instance_uid == f"2.25.{uuid.UUID(raw_study).int}"
    assert study.slices[0].series_instance_uid == f"2.25.{uuid.UUID(raw_series).int}"
    assert set(study.derived_uids) == {"SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"}
    sop_uids = [s.sop_instance_uid for s in study.slices]
    assert len(set(sop_uids)) == len(headers) == 133
    again = source_study_from_headers(p002_headers(), derive_invalid_uids=True)
    assert [s.sop_instance_uid for s in again.slices] == sop_uids  # deterministic
    assert len(p002_infected()) == 68  # the labels the P002 tests rely on


def test_scores_must_agree_with_the_verdict(synthetic_study: SourceStudy) -> None:
    good = report_input(synthetic_study, [0.9, 0.2, 0.7, 0.1, 0.6], TRAINED)
    assert good.verdict.k == 3
    wrong_k = Verdict("covid", 2, 5, 1, 0.1)
    with pytest.raises(ReportInputError, match="disagree"):
        ReportInput(synthetic_study, wrong_k, good.scores, TRAINED)
    wrong_n = Verdict("covid", 3, 6, 1, 0.1)
    with pytest.raises(ReportInputError, match="disagree"):
        ReportInput(synthetic_study, wrong_n, good.scores, TRAINED)


def test_a_score_from_another_study_is_refused(synthetic_study: SourceStudy) -> None:
    other_headers = synthetic_headers()
    for i, ds in enumerate(other_headers):
        ds.StudyInstanceUID = "2.25.999"
        ds.SOPInstanceUID = f"2.25.{3000000 + i}"
    other = source_study_from_headers(other_headers)
    score = SliceScore(other.slices[0], 0.2)
    with pytest.raises(ReportInputError, match="outside the study"):
        ReportInput(synthetic_study, Verdict("normal", 0, 1, 1, 0.1), (score,), TRAINED)


@pytest.mark.parametrize("p", [-0.01, 1.01, float("nan")])
def test_probability_outside_0_1_is_refused(synthetic_study: SourceStudy, p: float) -> None:
    with pytest.raises(ReportInputError):
        SliceScore(synthetic_study.slices[0], p)


def test_numpy_probability_becomes_a_float(synthetic_study: SourceStudy) -> None:
    score = SliceScore(synthetic_study.slices[0], np.float32(0.75))  # type: ignore[arg-type]
    assert type(score.covid_probability) is float and score.covid


def test_overlay_must_be_rgb_uint8(synthetic_study: SourceStudy) -> None:
    with pytest.raises(ReportInputError, match="uint8"):
        Overlay(synthetic_study.slices[0], np.zeros((64, 64), np.uint8))
    with pytest.raises(ReportInputError, match="uint8"):
        Overlay(synthetic_study.slices[0], np.zeros((64, 64, 3), np.float32))


def test_model_identity_fits_long_strings() -> None:
    with pytest.raises(ReportInputError, match="name"):
        ModelIdentity("x" * 65, "1", "trained", untrained=False)
    with pytest.raises(ReportInputError, match="version"):
        ModelIdentity("m", "1\\2", "trained", untrained=False)


def test_header_patient_values_are_kept_only_in_the_header(synthetic_study: SourceStudy) -> None:
    assert synthetic_study.header.PatientID == PATIENT["PatientID"]
    assert PATIENT["PatientID"] not in repr(synthetic_study.slices)

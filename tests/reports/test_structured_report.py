"""The TID 1500 SR: valid for dciodvfy, and read back with highdicom's content tree API
(never with the code that wrote it), the same finding, numbers and references."""

from __future__ import annotations

import io
import logging

import highdicom as hd
import pydicom
import pytest
from highdicom.sr.utils import find_content_items
from pydicom.sr.coding import Code

from app.reports import ResultUids, SourceStudy, build_structured_report, part10_bytes
from dicom3tools import assert_valid
from report_inputs import NOT_COPIED, PATIENT, STUDY_UID, TRAINED, UNTRAINED, report_input

COVID_19 = Code("840539006", "SCT", "COVID-19")
PRESENT, ABSENT, INDETERMINATE = (
    Code("52101004", "SCT", "Present"),
    Code("272519000", "SCT", "Absent"),
    Code("82334004", "SCT", "Indeterminate"),
)
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")
ALGORITHM_VERSION = Code("111003", "DCM", "Algorithm Version")
ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
COMMENT = Code("121106", "DCM", "Comment")
WARNING = "UNTRAINED MODEL - NOT FOR CLINICAL USE"
PROBABILITIES = [0.9, 0.2, 0.7, 0.1, 0.6]  # k = 3 of n = 5; required = max(1, ceil(0.5)) = 1


def read_back(sr: hd.sr.Comprehensive3DSR) -> hd.sr.Comprehensive3DSR:
    """Through bytes, as a PACS would hand it back."""
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(part10_bytes(sr))))


def patient_group(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    groups = [
        g
        for g in sr.content.get_image_measurement_groups(finding_type=COVID_19)
        if not g.source_images
    ]
    assert len(groups) == 1
    return groups[0]


def numbers(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> dict[str, float]:
    return {m.name.value: m.value for m in group.get_measurements()}


def comments(sr: hd.sr.Comprehensive3DSR) -> list[str]:
    return [i.value for i in find_content_items(sr.content[0], name=COMMENT, recursive=True)]


def test_synthetic_report_is_valid_and_reads_back(synthetic_study: SourceStudy) -> None:
    report = report_input(synthetic_study, PROBABILITIES, TRAINED)
    sr = build_structured_report(report)
    back = read_back(sr)

    group = patient_group(back)
    [evaluation] = group.get_qualitative_evaluations(name=COVID_19)
    assert evaluation.value == PRESENT
    assert numbers(group) == {"K": 3.0, "N": 5.0, "REQUIRED": 1.0, "T": 0.1}
    assert find_content_items(group[0], name=ALGORITHM_NAME)[0].value == TRAINED.name
    assert find_content_items(group[0], name=ALGORITHM_VERSION)[0].value == TRAINED.version
    parameters = [i.value for i in find_content_items(group[0], name=ALGORITHM_PARAMETERS)]
    assert parameters == [f"weights: {TRAINED.weights_source}"]

    for index, p in enumerate(PROBABILITIES):
        uid = f"2.25.{2000000 + index}"  # the header's SOP Instance UID (report_inputs)
        [slice_group] = back.content.get_image_measurement_groups(
            finding_type=COVID_19, referenced_sop_instance_uid=uid
        )
        [measurement] = slice_group.get_measurements()
        assert measurement.value == p
        assert slice_group.source_images[0].referenced_sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    # Last: skipped (outside CI) where dciodvfy is missing, after everything else ran.
    assert_valid(sr, "Comprehensive3DSR")


def test_header_places_it_in_the_source_study(synthetic_study: SourceStudy) -> None:
    sr = read_back(build_structured_report(report_input(synthetic_study, PROBABILITIES, TRAINED)))
    assert sr.StudyInstanceUID == STUDY_UID
    assert sr.SeriesInstanceUID not in {s.series_instance_uid for s in synthetic_study.slices}
    assert sr.Modality == "SR"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.CompletionFlag == "COMPLETE"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    for keyword, value in PATIENT.items():
        assert str(sr.get(keyword)) == value, keyword
    for keyword, value in NOT_COPIED.items():
        assert sr.get(keyword) != value, keyword
    evidence = {e[2] for e in sr.get_evidence()}
    assert evidence == {f"2.25.{2000000 + i}" for i in range(5)}


def test_algorithm_in_contributing_equipment(synthetic_study: SourceStudy) -> None:
    sr = read_back(build_structured_report(report_input(synthetic_study, PROBABILITIES, TRAINED)))
    [item] = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "covidct"]
    assert item.ManufacturerModelName == TRAINED.name
    assert item.SoftwareVersions == TRAINED.version
    assert TRAINED.weights_source in item.ContributionDescription
    assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert (sr.Manufacturer, sr.ManufacturerModelName) == ("covidct", TRAINED.name)


def test_untrained_model_says_so_where_nobody_misses_it(synthetic_study: SourceStudy) -> None:
    sr = read_back(build_structured_report(report_input(synthetic_study, PROBABILITIES, UNTRAINED)))
    assert sr.SeriesDescription.startswith(WARNING)
    assert comments(sr)[0].startswith(WARNING)
    assert patient_group(sr).tracking_identifier.endswith(WARNING)
    params = [i.value for i in find_content_items(patient_group(sr)[0], name=ALGORITHM_PARAMETERS)]
    assert WARNING in params
    assert WARNING in sr.ContributingEquipmentSequence[0].ContributionDescription


def test_trained_model_carries_no_untrained_warning(synthetic_study: SourceStudy) -> None:
    sr = build_structured_report(report_input(synthetic_study, PROBABILITIES, TRAINED))
    assert "UNTRAINED" not in part10_bytes(sr).decode("latin-1")


def test_normal_finding_is_absent(synthetic_study: SourceStudy) -> None:
    report = report_input(synthetic_study, [0.1, 0.2, 0.3, 0.4, 0.5], TRAINED)  # 0.5 not > 0.5
    sr = read_back(build_structured_report(report))
    group = patient_group(sr)
    assert group.get_qualitative_evaluations(name=COVID_19)[0].value == ABSENT
    assert numbers(group)["K"] == 0.0


def test_indeterminate_without_scores(synthetic_study: SourceStudy) -> None:
    report = report_input(synthetic_study, [], TRAINED)
    sr = build_structured_report(report)
    back = read_back(sr)
    group = patient_group(back)
    assert group.get_qualitative_evaluations(name=COVID_19)[0].value == INDETERMINATE
    assert numbers(group) == {"K": 0.0, "N": 0.0, "REQUIRED": 0.0, "T": 0.1}
    assert len(back.content.get_image_measurement_groups()) == 1
    assert "no slice selected" in comments(back)[0]
    # The evidence is the series the verdict is about.
    assert len(back.get_evidence()) == len(synthetic_study.slices)
    # Last: skipped (outside CI) where dciodvfy is missing, after everything else ran.
    assert_valid(sr, "Comprehensive3DSR")


def test_uid_seed_makes_the_same_uids(synthetic_study: SourceStudy) -> None:
    report = report_input(synthetic_study, PROBABILITIES, TRAINED)
    first = build_structured_report(report, uids=ResultUids("job-42"))
    again = build_structured_report(report, uids=ResultUids("job-42"))
    other = build_structured_report(report, uids=ResultUids("job-43"))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    assert first.SOPInstanceUID != other.SOPInstanceUID


def test_no_patient_data_in_logs(
    synthetic_study: SourceStudy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    build_structured_report(report_input(synthetic_study, PROBABILITIES, UNTRAINED))
    assert caplog.records, "expected the builders' and highdicom's debug records"
    text = "\n".join(r.getMessage() for r in caplog.records)
    for value in PATIENT.values():
        if len(value) > 3:  # "M" (sex) occurs in any text
            assert value not in text


def test_p002_report(p002_study: SourceStudy, p002_probabilities: list[float]) -> None:
    sr = build_structured_report(report_input(p002_study, p002_probabilities, UNTRAINED))
    back = read_back(sr)
    assert back.StudyInstanceUID == p002_study.study_instance_uid
    groups = back.content.get_image_measurement_groups(finding_type=COVID_19)
    [group] = [g for g in groups if not g.source_images]
    assert group.get_qualitative_evaluations(name=COVID_19)[0].value == PRESENT
    # 68 slices labelled infected in the CSV; 133 slices; ceil(0.1 * 133) = 14.
    assert numbers(group) == {"K": 68.0, "N": 133.0, "REQUIRED": 14.0, "T": 0.1}
    slice_groups = [g for g in groups if g.source_images]
    referenced = [g.source_images[0].referenced_sop_instance_uid for g in slice_groups]
    assert referenced == [s.sop_instance_uid for s in p002_study.slices]
    probabilities = [g.get_measurements()[0].value for g in slice_groups]
    assert probabilities == p002_probabilities
    assert any("stand-in UIDs" in line for line in comments(back))
    # Last: skipped (outside CI) where dciodvfy is missing, after everything else ran.
    verdict = assert_valid(sr, "Comprehensive3DSR")
    # P002's study date, time and ID are empty (de-identified): DICOMDIR warnings, explained.
    assert any("DICOMDIR - Study Date" in w for w in verdict.warnings)

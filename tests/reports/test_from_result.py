"""Ingest keeps what a DICOM result references; `dicom_results` builds it from a result."""

from __future__ import annotations

import io
import logging

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.coding import Code

from app.contract import ModelCard
from app.diagnosis import judge_patient, judge_series
from app.domain import PatientResult, Selection, SeriesResult, Study
from app.ingest import IngestLimits, ingest_zip
from app.reports import DicomResults, SliceOverlay, dicom_results, part10_bytes
from dicom_factory import PHI_NAME, synthetic_ct, tiff_bytes
from models.export import untrained_card
from shared_data import zip_files

COVID = Code("840539006", "SCT", "COVID-19")
STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
SERIES_UID = "1.2.826.0.1.3680043.8.498.78"
N = 4


def ingest_files(files: list[tuple[str, bytes]]) -> Study:
    return ingest_zip(zip_files(files), IngestLimits())


def _slice(number: int) -> bytes:
    values = np.full((64, 64), 1024 + 40, np.uint16)
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(values, z=-float(number), instance=number)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.79.{number}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def study() -> Study:
    return ingest_files([(f"s/{i}.dcm", _slice(i)) for i in (3, 1, 4, 2)])


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return untrained_card(seed=0, head_init_std=0.02)


def read_back(results: DicomResults) -> hd.sr.Comprehensive3DSR:
    """The SR as a receiver parses it: from its Part 10 bytes."""
    data = part10_bytes(results.structured_report)
    return hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(data)))


def _result(study: Study, probabilities: list[float]) -> PatientResult:
    series = study.series[0]
    n = len(series.slices)
    selection = Selection(np.full(n, 100), 10.0, np.ones(n, bool), True)
    p = np.array(probabilities, dtype=np.float32)
    verdict = judge_series(selection, p, threshold=0.1)
    top, best = judge_patient([verdict], threshold=0.1)
    deciding = series.index if best is not None else None
    return PatientResult(top, (SeriesResult(series, selection, p, verdict),), deciding)


def test_ingest_keeps_identifiers_and_a_pixel_free_header(study: Study) -> None:
    [series] = study.series
    # head → feet: z = -1 first; the identifiers travel with each slice
    expected = [f"1.2.826.0.1.3680043.8.498.79.{i}" for i in (1, 2, 3, 4)]
    assert [s.sop_instance_uid for s in series.slices] == expected
    assert {s.series_instance_uid for s in series.slices} == {SERIES_UID}
    assert {s.study_instance_uid for s in series.slices} == {STUDY_UID}
    assert {s.sop_class_uid for s in series.slices} == {"1.2.840.10008.5.1.4.1.1.2"}
    header = series.source_header
    assert header is not None and "PixelData" not in header
    assert str(header.PatientName) == PHI_NAME
    # never in a repr (a log line or a traceback would carry it)
    assert STUDY_UID not in repr(series.slices[0])
    assert PHI_NAME not in repr(series)


def test_tiff_study_has_no_dicom_results(card: ModelCard) -> None:
    tiffs = [(f"t/{i}.tif", tiff_bytes(np.full((64, 64), 1064, np.uint16))) for i in range(N)]
    study = ingest_files(tiffs)
    result = _result(study, [0.9, 0.1, 0.1, 0.1])
    assert dicom_results(study, result, card, job_id="job-1") is None


def test_results_reference_the_scored_slices(
    study: Study, card: ModelCard, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    result = _result(study, [0.9, 0.2, 0.8, 0.1])  # slices 1 and 3 (head → feet) COVID
    overlay = SliceOverlay(0, 2, np.zeros((512, 512, 3), np.uint8))
    results = dicom_results(study, result, card, job_id="job-2", overlays=[overlay])
    assert results is not None
    sr = read_back(results)
    assert sr.StudyInstanceUID == STUDY_UID and sr.PatientName == PHI_NAME
    uids = [s.sop_instance_uid for s in study.series[0].slices]
    for uid, p in zip(uids, (0.9, 0.2, 0.8, 0.1), strict=True):
        [group] = sr.content.get_image_measurement_groups(referenced_sop_instance_uid=uid)
        assert float(group.get_measurements()[0].value) == pytest.approx(p, abs=1e-6)
    groups = sr.content.get_image_measurement_groups(finding_type=COVID)
    [patient] = [g for g in groups if not g.source_images]
    numbers = {m.name.value: float(m.value) for m in patient.get_measurements()}
    assert numbers == {"K": 2.0, "N": 4.0, "REQUIRED": 1.0, "T": pytest.approx(0.1)}
    assert results.key_images is not None
    ko = hd.ko.KeyObjectSelectionDocument.from_dataset(results.key_images)
    referenced = {
        item.ReferencedSOPInstanceUID
        for study_item in ko.CurrentRequestedProcedureEvidenceSequence
        for series_item in study_item.ReferencedSeriesSequence
        for item in series_item.ReferencedSOPSequence
    }
    assert referenced == {uids[0], uids[2]}
    [sc] = results.overlays
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == uids[2]
    assert list(sc.PatientOrientation) == ["L", "P"]
    # a second build gives the same UIDs (a repeated STOW-RS replaces)
    again = dicom_results(study, result, card, job_id="job-2")
    assert again is not None
    assert again.structured_report.SOPInstanceUID == sr.SOPInstanceUID
    for record in caplog.records:
        assert PHI_NAME not in record.getMessage() and STUDY_UID not in record.getMessage()


def test_indeterminate_result_reports_without_scores(study: Study, card: ModelCard) -> None:
    series = study.series[0]
    n = len(series.slices)
    selection = Selection(np.zeros(n, int), 0.0, np.zeros(n, bool), False)
    p = np.full(n, np.nan, np.float32)
    verdict = judge_series(selection, np.zeros(0, np.float32), threshold=0.1)
    top, best = judge_patient([verdict], threshold=0.1)
    assert best is None
    result = PatientResult(top, (SeriesResult(series, selection, p, verdict),), None)
    results = dicom_results(study, result, card, job_id="job-3")
    assert results is not None and results.key_images is None
    groups = read_back(results).content.get_image_measurement_groups(finding_type=COVID)
    [patient] = [g for g in groups if not g.source_images]
    value = patient.get_qualitative_evaluations(name=COVID)[0].value
    assert value == Code("82334004", "SCT", "Indeterminate")

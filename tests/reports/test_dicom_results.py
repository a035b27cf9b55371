"""All results of one job together: one study, three new series, Part 10 bytes, stable UIDs."""

from __future__ import annotations

import io

import numpy as np
import pydicom

from app.reports import SourceStudy, build_results, part10_bytes
from dicom3tools import assert_valid
from report_inputs import STUDY_UID, TRAINED, UNTRAINED, report_input
from shared_data import P002

PROBABILITIES = [0.9, 0.2, 0.7, 0.1, 0.6]
KINDS = {"SR": "Comprehensive3DSR", "KO": "KeyObjectSelectionDocument", "OT": "SCImage"}


def heat_map_over(ct_slice: np.ndarray) -> np.ndarray:
    """A stand-in for the Grad-CAM rendering: the lung window in grey, a red blob on top."""
    hu = ct_slice.astype(np.float32) - 1024.0
    grey = (np.clip((hu + 1350.0) / 1500.0, 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rows, cols = np.mgrid[: grey.shape[0], : grey.shape[1]]
    blob = np.exp(-((rows - 300.0) ** 2 + (cols - 150.0) ** 2) / (2 * 40.0**2))
    rgb[..., 0] = np.maximum(rgb[..., 0], (blob * 255).astype(np.uint8))
    return rgb


def test_results_share_the_study_in_new_series(synthetic_study: SourceStudy) -> None:
    rgb = np.zeros((512, 512, 3), np.uint8)
    report = report_input(synthetic_study, PROBABILITIES, TRAINED, overlays=[(0, rgb)])
    results = build_results(report, uid_seed="job-7")
    objects = list(results)
    assert [o.Modality for o in objects] == ["SR", "KO", "OT"]
    assert {o.StudyInstanceUID for o in objects} == {STUDY_UID}
    series = {o.SeriesInstanceUID for o in objects}
    assert len(series) == 3 and not series & {s.series_instance_uid for s in synthetic_study.slices}
    for obj in objects:
        back = pydicom.dcmread(io.BytesIO(part10_bytes(obj)))
        assert back.SOPInstanceUID == obj.SOPInstanceUID
        assert back.file_meta.MediaStorageSOPInstanceUID == obj.SOPInstanceUID
    again = build_results(report, uid_seed="job-7")
    assert [o.SOPInstanceUID for o in again] == [o.SOPInstanceUID for o in objects]


def test_without_covid_slices_or_overlays_only_the_report(synthetic_study: SourceStudy) -> None:
    results = build_results(report_input(synthetic_study, [0.1] * 5, TRAINED))
    assert results.key_images is None and results.overlays == ()
    assert [o.Modality for o in results] == ["SR"]


def test_p002_results_are_valid(p002_study: SourceStudy, p002_probabilities: list[float]) -> None:
    index = 69  # IM0070, mid-chest, labelled infected
    assert p002_probabilities[index] > 0.5
    ct_slice = pydicom.dcmread(P002 / "IM0070.dcm").pixel_array
    overlay = heat_map_over(ct_slice)
    report = report_input(p002_study, p002_probabilities, UNTRAINED, overlays=[(index, overlay)])
    results = build_results(report, uid_seed="p002-job")
    objects = list(results)
    assert [o.Modality for o in objects] == ["SR", "KO", "OT"]
    for obj in objects:
        assert obj.StudyInstanceUID == p002_study.study_instance_uid
    [image] = results.overlays
    assert image.SourceImageSequence[0].ReferencedSOPInstanceUID == (
        p002_study.slices[index].sop_instance_uid
    )
    # Last: skipped (outside CI) where dciodvfy is missing, after everything else ran.
    for obj in objects:
        assert_valid(obj, KINDS[obj.Modality])

"""The pipeline's Study and PatientResult → the DICOM results of one job.

Ingest keeps, per DICOM slice, the four identifiers a result must reference
(`SliceInfo.sop_class_uid` …) and, per series, one header without pixel data
(`Series.source_header`). This module turns them, with the deciding series' scores, into a
`ReportInput` and builds the results (`build_results`). A study without DICOM source (TIFF
only) has no results: `dicom_results` returns None.

Which series: the deciding series when there is one; when the patient is indeterminate
(no deciding series), the first DICOM series of the study, with no scores (its verdict's
n is 0). A deciding series read from TIFF files has no DICOM source either: None.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from pydicom.dataset import Dataset

from app.contract import ModelCard
from app.domain import PatientResult, Series, SeriesResult, Study
from app.reports.results import DicomResults, build_results
from app.reports.source import (
    ModelIdentity,
    Overlay,
    ReportInput,
    SliceScore,
    SourceStudy,
    source_study_from_headers,
)

# Every judged series leaves ingest in the standard display (rows anterior → posterior,
# columns patient right → left): an overlay drawn on it is oriented so, whatever the
# source's stored orientation (PS3.3 C.7.6.1.1.1: row direction L, column direction P).
DISPLAY_ORIENTATION: tuple[str, str] = ("L", "P")


@dataclass(frozen=True, eq=False)
class SliceOverlay:
    """An overlay (PNG or uint8 RGB) over slice `index` of `PatientResult.series[series]`."""

    series: int
    index: int
    image: bytes | np.ndarray


def has_dicom_source(study: Study) -> bool:
    return any(s.kind == "dicom" for s in study.series)


def dicom_results(
    study: Study,
    result: PatientResult,
    card: ModelCard,
    *,
    job_id: str,
    overlays: Sequence[SliceOverlay] = (),
    derive_invalid_uids: bool = True,
) -> DicomResults | None:
    """The SR, key images and overlays of one result, their UIDs derived from `job_id`;
    None when the result has no DICOM source. Blocking (CPU): call it off the event loop.

    `derive_invalid_uids`: a source whose UIDs are missing or not valid (de-identified
    research data) gets deterministic stand-ins, which the report states (app/reports/
    source.py); False refuses it with `ReportInputError`."""
    report = report_input(
        study, result, card, overlays=overlays, derive_invalid_uids=derive_invalid_uids
    )
    return build_results(report, uid_seed=job_id) if report is not None else None


def report_input(
    study: Study,
    result: PatientResult,
    card: ModelCard,
    *,
    overlays: Sequence[SliceOverlay] = (),
    derive_invalid_uids: bool = True,
) -> ReportInput | None:
    """What `dicom_results` builds from; None without a DICOM source."""
    chosen = _reported_series(study, result)
    if chosen is None:
        return None
    position, series_result = chosen
    source = source_of(series_result.series, derive_invalid_uids=derive_invalid_uids)
    probabilities = series_result.covid_probability
    scored = np.flatnonzero(~np.isnan(probabilities)) if result.verdict.n else np.zeros(0, int)
    scores = tuple(SliceScore(source.slices[i], float(probabilities[i])) for i in scored)
    return ReportInput(
        study=source,
        verdict=result.verdict,
        scores=scores,
        model=ModelIdentity.from_card(card),
        overlays=tuple(_overlay(source, o) for o in overlays if o.series == position),
    )


def source_of(series: Series, *, derive_invalid_uids: bool = True) -> SourceStudy:
    """The series' kept identifiers and header as the builders' `SourceStudy`."""
    rows, columns = series.resampled_from or series.pixels.shape[1:]
    header = series.source_header if series.source_header is not None else Dataset()
    headers = []
    for i, info in enumerate(series.slices):
        ds = Dataset() if i else _copy(header)
        for keyword, value in (
            ("SOPClassUID", info.sop_class_uid),
            ("SOPInstanceUID", info.sop_instance_uid),
            ("SeriesInstanceUID", info.series_instance_uid),
            ("StudyInstanceUID", info.study_instance_uid),
        ):
            setattr(ds, keyword, value or "")
        if info.instance_number is not None:
            ds.InstanceNumber = info.instance_number
        ds.Rows, ds.Columns = int(rows), int(columns)
        headers.append(ds)
    source = source_study_from_headers(headers, derive_invalid_uids=derive_invalid_uids)
    # overlays are drawn on the slices as ingest left them: in the standard display
    slices = tuple(replace(s, patient_orientation=DISPLAY_ORIENTATION) for s in source.slices)
    return SourceStudy(header=source.header, slices=slices, derived_uids=source.derived_uids)


def _copy(header: Dataset) -> Dataset:
    ds = Dataset()
    ds.update(header)
    return ds


def _reported_series(study: Study, result: PatientResult) -> tuple[int, SeriesResult] | None:
    if not has_dicom_source(study):
        return None
    if result.deciding_series is not None:
        for position, r in enumerate(result.series):
            if r.series.index == result.deciding_series:
                return (position, r) if r.series.kind == "dicom" else None
        return None
    for position, r in enumerate(result.series):
        if r.series.kind == "dicom":
            return position, r
    return None


def _overlay(source: SourceStudy, overlay: SliceOverlay) -> Overlay:
    slice_ = source.slices[overlay.index]
    if isinstance(overlay.image, bytes):
        return Overlay.from_png(slice_, overlay.image)
    return Overlay(slice_, np.asarray(overlay.image, dtype=np.uint8))

"""DICOM results of a finished job: a TID 1500 Comprehensive 3D SR, a Key Object Selection
of the slices scored COVID-19 and Secondary Capture overlays, all in the source study,
built with highdicom from a `ReportInput` (docs/dicom-results.md).

Entry points: `dicom_results` (the pipeline's Study and PatientResult → `DicomResults`),
`source_study_from_headers` (the kept source headers → `SourceStudy`),
`build_results` (a `ReportInput` → `DicomResults`) and `part10_bytes` (one object → a
Part 10 file). The three builders can be called one by one as well.
"""

from app.reports.from_result import SliceOverlay, dicom_results, has_dicom_source
from app.reports.key_images import build_key_images
from app.reports.overlays import build_overlays
from app.reports.provenance import NOT_DIAGNOSTIC_LABEL, UNTRAINED_LABEL, ResultUids
from app.reports.results import DicomResults, build_results, part10_bytes
from app.reports.source import (
    ModelIdentity,
    Overlay,
    ReportInput,
    ReportInputError,
    SliceScore,
    SourceSlice,
    SourceStudy,
    source_study_from_headers,
)
from app.reports.structured_report import build_structured_report

__all__ = [
    "NOT_DIAGNOSTIC_LABEL",
    "UNTRAINED_LABEL",
    "DicomResults",
    "ModelIdentity",
    "Overlay",
    "ReportInput",
    "ReportInputError",
    "ResultUids",
    "SliceOverlay",
    "SliceScore",
    "SourceSlice",
    "SourceStudy",
    "build_key_images",
    "build_overlays",
    "build_results",
    "build_structured_report",
    "dicom_results",
    "has_dicom_source",
    "part10_bytes",
    "source_study_from_headers",
]

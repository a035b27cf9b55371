"""A finished job's DICOM results: its Part 10 files and the manifest that describes them.

Blocking (highdicom builds in Python): the job runner calls `make_job_results` in a worker
thread. The manifest never holds patient data: counts, flags and reasons in words.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from app.contract import ModelCard
from app.domain import PatientResult, Study
from app.reports.from_result import SliceOverlay, report_input
from app.reports.results import build_results, part10_bytes
from app.reports.source import ReportInputError

logger = logging.getLogger(__name__)

NO_EXPLAIN_SIGNATURE = (
    "no overlays: the job asked to explain, but the served model has no usable 'explain' "
    "signature (export it again with python -m models to add one)"
)
NO_COVID_SLICE = "no overlays: no slice was judged COVID, so none was explained"


@dataclass(frozen=True)
class JobResults:
    parts: tuple[bytes, ...]
    manifest: dict[str, Any] = field(default_factory=dict)


def make_job_results(
    study: Study,
    result: PatientResult,
    card: ModelCard,
    *,
    job_id: str,
    explain: bool = False,
    overlays: Sequence[SliceOverlay] | None = None,
) -> JobResults:
    """The job's DICOM objects and manifest. `explain`: the job asked for overlays;
    `overlays` None then means the model could not explain (the manifest says why)."""
    manifest: dict[str, Any] = {
        "source": "dicom",
        "structured_report": False,
        "key_images": False,
        "overlays": 0,
        "derived_uids": [],
    }
    if explain and overlays is None:
        manifest["overlays_note"] = NO_EXPLAIN_SIGNATURE
    elif explain and not overlays:
        manifest["overlays_note"] = NO_COVID_SLICE
    try:
        report = report_input(study, result, card, overlays=overlays or ())
        results = build_results(report, uid_seed=job_id) if report is not None else None
    except ReportInputError as e:
        # the message names attributes, never values (app/reports/source.py)
        logger.warning("dicom results not made", extra={"error": type(e).__name__})
        manifest.update(source="unusable", problem=f"no DICOM results: {e}")
        return JobResults((), manifest)
    if report is None or results is None:
        manifest["source"] = "none"
        return JobResults((), manifest)
    parts = tuple(part10_bytes(ds) for ds in results)
    manifest.update(
        structured_report=True,
        key_images=results.key_images is not None,
        overlays=len(results.overlays),
        derived_uids=list(report.study.derived_uids),
    )
    return JobResults(parts, manifest)

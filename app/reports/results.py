"""All DICOM results of one finished job, built in one call, and their Part 10 bytes."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset

from app.reports.key_images import build_key_images
from app.reports.overlays import build_overlays
from app.reports.provenance import ResultUids
from app.reports.source import ReportInput
from app.reports.structured_report import build_structured_report


@dataclass(frozen=True, eq=False)
class DicomResults:
    structured_report: hd.sr.Comprehensive3DSR
    key_images: hd.ko.KeyObjectSelectionDocument | None  # None: no slice scored COVID
    overlays: tuple[hd.sc.SCImage, ...]  # empty: the job asked for no explanation

    def __iter__(self) -> Iterator[Dataset]:
        yield self.structured_report
        if self.key_images is not None:
            yield self.key_images
        yield from self.overlays


def build_results(report: ReportInput, *, uid_seed: str | None = None) -> DicomResults:
    """The SR, the key-image selection and the overlays of one result. With `uid_seed`
    (e.g. the job id) the objects' UIDs are derived from it: building again gives the same
    UIDs, so a repeated STOW-RS replaces what it stored instead of adding copies."""
    uids = ResultUids(uid_seed)
    return DicomResults(
        structured_report=build_structured_report(report, uids=uids),
        key_images=build_key_images(report, uids=uids),
        overlays=build_overlays(report, uids=uids),
    )


def part10_bytes(dataset: Dataset) -> bytes:
    """The object as a DICOM Part 10 file (preamble, file meta), e.g. one part of a
    multipart/related; type="application/dicom" answer or one member of a zip."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()

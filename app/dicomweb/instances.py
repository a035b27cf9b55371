"""One instance received over STOW-RS, checked as the zip route checks a DICOM member.

The header is read with the ingest's own reader (`app.ingest.dicom.read_dicom`): the same
checks (CT, monochrome, 16 bits, size, frames, a decoder for the transfer syntax), so an
instance accepted here is one the job's ingest will take. Two checks come first, from the
file meta information alone: a DICOM PS3.10 file ('DICM'), and not the deflated transfer
syntax (pydicom inflates a deflated data set whole, without a bound: a decompression
bomb). Tag values never reach logs or error messages.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from app import errors
from app.dicomweb.response import FailureReason
from app.ingest import IngestLimits
from app.ingest.dicom import read_dicom
from app.ingest.frames import Category, Skip

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # PS3.5 9.1: digits and dots, at most 64
_REASONS: dict[Category, FailureReason] = {
    "syntax": FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED,
    "image": FailureReason.SOP_CLASS_NOT_SUPPORTED,
    "other": FailureReason.SOP_CLASS_NOT_SUPPORTED,
    "corrupt": FailureReason.CANNOT_UNDERSTAND,
    "encrypted": FailureReason.CANNOT_UNDERSTAND,
}


def valid_uid(value: str) -> bool:
    return len(value) <= 64 and _UID.fullmatch(value) is not None


@dataclass(frozen=True)
class CheckedInstance:
    """An instance this service can take: its identifiers and how many frames it holds."""

    study_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    patient_id: str  # Patient ID (0010,0020); "" when absent. Never logged.
    frames: int


class InstanceRefused(Exception):
    """An instance this service does not take, with the STOW-RS failure reason."""

    def __init__(
        self, reason: FailureReason, sop_class_uid: str = "", sop_instance_uid: str = ""
    ) -> None:
        super().__init__(reason.name)
        self.reason = reason
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


def _text(value: object) -> str:
    return str(value or "").strip()


def check_instance(path: Path, index: int, limits: IngestLimits) -> CheckedInstance:
    """Read and check the instance in `path` (`index`: its 1-based part number, for logs).
    Raises InstanceRefused."""
    try:
        meta = read_file_meta_info(path)
    except Exception as e:  # no preamble and 'DICM', or a meta group that cannot be read
        logger.info("stow: part %d is not a DICOM file (%s)", index, type(e).__name__)
        raise InstanceRefused(FailureReason.CANNOT_UNDERSTAND) from e
    sop_class = _text(meta.get("MediaStorageSOPClassUID"))
    sop_instance = _text(meta.get("MediaStorageSOPInstanceUID"))
    syntax = _text(meta.get("TransferSyntaxUID"))
    if not syntax:
        raise InstanceRefused(FailureReason.CANNOT_UNDERSTAND, sop_class, sop_instance)
    if syntax == DeflatedExplicitVRLittleEndian:
        raise InstanceRefused(FailureReason.TRANSFER_SYNTAX_NOT_SUPPORTED, sop_class, sop_instance)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as e:  # malformed input makes pydicom raise many types
        logger.info("stow: part %d could not be parsed (%s)", index, type(e).__name__)
        raise InstanceRefused(FailureReason.CANNOT_UNDERSTAND, sop_class, sop_instance) from e
    sop_class = _text(ds.get("SOPClassUID")) or sop_class
    sop_instance = _text(ds.get("SOPInstanceUID")) or sop_instance
    study = _text(ds.get("StudyInstanceUID"))
    if not (valid_uid(sop_class) and valid_uid(sop_instance) and valid_uid(study)):
        logger.info("stow: part %d lacks a valid SOP Class, SOP Instance or Study UID", index)
        raise InstanceRefused(FailureReason.CANNOT_UNDERSTAND, sop_class, sop_instance)
    refused = InstanceRefused(FailureReason.CANNOT_UNDERSTAND, sop_class, sop_instance)
    try:
        frames = read_dicom(index, f"{sop_instance}.dcm", path.read_bytes(), limits)
    except Skip as s:
        logger.info("stow: part %d refused: %s", index, s.reason)
        refused.reason = _REASONS[s.category]
        raise refused from s
    except errors.TooManySlicesError as e:
        logger.info("stow: part %d holds more frames than a series may", index)
        refused.reason = FailureReason.OUT_OF_RESOURCES
        raise refused from e
    except Exception as e:  # malformed input makes pydicom raise many types
        logger.info("stow: part %d could not be parsed (%s)", index, type(e).__name__)
        raise refused from e
    return CheckedInstance(
        study_uid=study,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        patient_id=_text(ds.get("PatientID")),
        frames=len(frames),
    )

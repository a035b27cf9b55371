"""The STOW-RS answer (DICOM PS3.18 section 10.5.3 and Annex I): status code and body.

The body is the Store Instances Response Module as `application/dicom+json`:

- Retrieve URL (0008,1190), type 2: present and empty (this service keeps no instances to
  retrieve; a study becomes a job);
- Referenced SOP Sequence (0008,1199): the instances accepted, each with its SOP Class and
  SOP Instance UID and an empty Retrieve URL;
- Failed SOP Sequence (0008,1198): the instances refused, each with a Failure Reason
  (0008,1197) from PS3.18 Table I.2-2 (or this service's own code in the Cxxx range).

Status: 200 when every instance was accepted, 202 when some were and others failed, 409
when none was (PS3.18 Table 10.5.3-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

DICOM_JSON = "application/dicom+json"


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values this service answers with."""

    PROCESSING_FAILURE = 0x0110  # could not be kept (an I/O error)
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # not a CT image this service can judge
    OUT_OF_RESOURCES = 0xA700  # over a size or count limit of one study
    CANNOT_UNDERSTAND = 0xC000  # not a DICOM Part 10 file, unreadable, or UIDs missing
    TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122  # no decoder, or deflated (refused: bombs)
    # This service's own code (Cxxx, "cannot understand"): the instance's Study Instance UID
    # is not the one of POST /studies/{StudyInstanceUID}.
    STUDY_UID_MISMATCH = 0xC409


@dataclass(frozen=True)
class InstanceOutcome:
    """One part of a STOW-RS request: accepted (reason None) or failed with a reason. The
    UIDs are empty when they could not be read."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    reason: FailureReason | None = None
    job_id: str | None = None  # the job the instance joined, when accepted

    @property
    def accepted(self) -> bool:
        return self.reason is None


def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


def _reference(outcome: InstanceOutcome) -> dict[str, Any]:
    return {
        "00081150": _uid(outcome.sop_class_uid),
        "00081155": _uid(outcome.sop_instance_uid),
    }


def response_status(outcomes: list[InstanceOutcome]) -> int:
    accepted = sum(o.accepted for o in outcomes)
    if accepted == len(outcomes):
        return 200
    return 202 if accepted else 409


def response_body(outcomes: list[InstanceOutcome]) -> dict[str, Any]:
    """The Store Instances Response Module, as DICOM JSON (PS3.18 Annex F)."""
    body: dict[str, Any] = {"00081190": {"vr": "UR"}}
    failed = [
        {**_reference(o), "00081197": {"vr": "US", "Value": [int(o.reason)]}}
        for o in outcomes
        if o.reason is not None
    ]
    stored = [{**_reference(o), "00081190": {"vr": "UR"}} for o in outcomes if o.accepted]
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": stored}
    return body

"""DICOMweb in: STOW-RS (DICOM PS3.18 section 10.5), studies a PACS or router pushes.

    config.py     StowConfig: the quiet period after which a study becomes a job
    multipart.py  multipart/related parsed as a stream, each part to its own file
    instances.py  one instance checked as the zip route checks a DICOM member
    pending.py    studies being received, on disk until quiet; then one job each
    stow.py       one request's instances, checked and filed
    response.py   the Store Instances Response (application/dicom+json) and its status

The routes (POST /studies, POST /studies/{StudyInstanceUID}) are in app/jobs_api.py.
"""

from app.dicomweb.config import StowConfig
from app.dicomweb.instances import CheckedInstance, InstanceRefused, check_instance
from app.dicomweb.multipart import ReceivedPart, read_parts, stow_boundary
from app.dicomweb.pending import PendingStudies, PendingStudy, StudyLimits
from app.dicomweb.response import (
    DICOM_JSON,
    FailureReason,
    InstanceOutcome,
    response_body,
    response_status,
)
from app.dicomweb.stow import StowReceiver, StowRequest

__all__ = [
    "DICOM_JSON",
    "CheckedInstance",
    "FailureReason",
    "InstanceOutcome",
    "InstanceRefused",
    "PendingStudies",
    "PendingStudy",
    "ReceivedPart",
    "StowConfig",
    "StowReceiver",
    "StowRequest",
    "StudyLimits",
    "check_instance",
    "read_parts",
    "response_body",
    "response_status",
    "stow_boundary",
]

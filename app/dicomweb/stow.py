"""One STOW-RS request's instances, each checked and added to its pending study."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from app.dicomweb.instances import InstanceRefused, check_instance
from app.dicomweb.multipart import DICOM_MEDIA_TYPE, ReceivedPart
from app.dicomweb.pending import PendingStudies
from app.dicomweb.response import FailureReason, InstanceOutcome
from app.ingest import IngestLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StowRequest:
    """Who stores, and where: `study_uid` is the StudyInstanceUID of
    POST /studies/{StudyInstanceUID} (None for POST /studies)."""

    owner: str
    request_id: str
    study_uid: str | None = None


class StowReceiver:
    """Checks received parts like the zip route checks members, and files them."""

    def __init__(
        self,
        studies: PendingStudies,
        limits: IngestLimits,
        submitted: Callable[[str], bool],
    ) -> None:
        self.studies = studies
        self.limits = limits
        self._submitted = submitted

    def accept_all(self, parts: list[ReceivedPart], request: StowRequest) -> list[InstanceOutcome]:
        """Each part's outcome, in request order; every part's file is gone afterwards
        (moved into its study, or removed). Blocking: run it in a thread."""
        outcomes = []
        try:
            for n, part in enumerate(parts):
                if n >= self.limits.max_members:  # more instances than one upload may hold
                    outcomes.append(InstanceOutcome(reason=FailureReason.OUT_OF_RESOURCES))
                else:
                    outcomes.append(self.accept(part, request))
                if part.path is not None:
                    part.path.unlink(missing_ok=True)
        finally:
            for part in parts:
                if part.path is not None:
                    part.path.unlink(missing_ok=True)
        stored = sum(o.accepted for o in outcomes)
        logger.info(
            "stow: request stored", extra={"stored": stored, "failed": len(outcomes) - stored}
        )
        return outcomes

    def accept(self, part: ReceivedPart, request: StowRequest) -> InstanceOutcome:
        if part.too_large:
            return InstanceOutcome(reason=FailureReason.OUT_OF_RESOURCES)
        if part.path is None or part.content_type != DICOM_MEDIA_TYPE:
            return InstanceOutcome(reason=FailureReason.CANNOT_UNDERSTAND)
        try:
            instance = check_instance(part.path, part.index, self.limits)
            if request.study_uid is not None and instance.study_uid != request.study_uid:
                raise InstanceRefused(
                    FailureReason.STUDY_UID_MISMATCH,
                    instance.sop_class_uid,
                    instance.sop_instance_uid,
                )
            job_id = self.studies.add(
                request.owner,
                instance,
                part.path,
                part.size,
                request_id=request.request_id,
                submitted=self._submitted,
            )
        except InstanceRefused as r:
            return InstanceOutcome(r.sop_class_uid, r.sop_instance_uid, r.reason)
        except OSError as e:
            logger.error("stow: part %d not kept (%s)", part.index, type(e).__name__)
            return InstanceOutcome(reason=FailureReason.PROCESSING_FAILURE)
        return InstanceOutcome(instance.sop_class_uid, instance.sop_instance_uid, None, job_id)

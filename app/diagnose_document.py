"""One upload to its diagnosis document, and the audit line that records it: the steps
POST /patients/diagnose and the job runner share (docs/api.md, docs/jobs.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import BinaryIO

from app.domain import PatientResult, Study
from app.explain import Explanations, attach, explain_result
from app.explain_queue import ExplainQueue
from app.inference import InferenceEngine
from app.logs import patient_hash
from app.pipeline import diagnose_upload
from app.runtime import Runtime
from app.schemas import DiagnosisOut, diagnosis_out


@dataclass(frozen=True)
class Diagnosed:
    """An upload's study and result, its document, and its explanations (None unless asked)."""

    study: Study
    result: PatientResult
    out: DiagnosisOut
    explanations: Explanations | None


async def diagnose_to_document(
    upload: bytes | BinaryIO,
    runtime: Runtime,
    engine: InferenceEngine,
    *,
    threshold: float | None,
    explainer: ExplainQueue | None,
    request_id: str,
    patient_id: str,
) -> Diagnosed:
    """The pipeline, then the explanations (before the document: it records their time),
    then the diagnosis document with the explanations attached."""
    study, result = await diagnose_upload(
        upload,
        engine,
        runtime.config.pipeline,
        threshold=threshold,
        decode_pool=runtime.decode_pool,
    )
    explanations = await explain_result(explainer, result) if explainer is not None else None
    out = diagnosis_out(
        request_id=request_id,
        patient_id=patient_id,
        study=study,
        result=result,
        card=engine.card,
    )
    if explanations is not None:
        attach(out, explanations)
    return Diagnosed(study, result, out, explanations)


def log_diagnosis_audit(
    logger: logging.Logger,
    out: DiagnosisOut,
    runtime: Runtime,
    engine: InferenceEngine,
    *,
    job: str | None = None,
) -> None:
    """The audit line of one diagnosis, on the caller's `logger`: no patient data, the
    patient id as a keyed hash; `job` the job reference when a job ran it."""
    extra: dict[str, object] = {"audit": True}
    if job is not None:
        extra["job"] = job
    extra.update(
        {
            "patient": patient_hash(out.patient_id, runtime.config.audit_key),
            "model_version": engine.card.version,
            "weights_source": engine.card.weights_source,
            "outcome": out.diagnosis,
            "k": out.k,
            "n": out.n,
            "series": len(out.series),
            "slices": sum(s.slices_total for s in out.series),
            "skipped_members": len(out.skipped),
        }
    )
    logger.info("diagnosis", extra=extra)

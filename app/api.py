"""HTTP routes. Each route only chains the pipeline; errors become responses in app/problems.py."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import (
    ExplainUnsupportedError,
    NotReadyError,
    ShuttingDownError,
    UnauthorizedError,
)
from app.explain import EXPLAIN_FIELD, attach, explain_result
from app.guard import API_KEY_HEADER, api_key_valid
from app.inference import InferenceEngine
from app.logs import patient_hash, request_id_var
from app.pipeline import diagnose_upload
from app.runtime import Runtime
from app.schemas import DiagnosisOut, FormBool, diagnosis_out, model_summary

logger = logging.getLogger(__name__)
router = APIRouter()


def get_runtime(request: Request) -> Runtime:
    """The running service's runtime (app/main.py puts it on the app)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_engine(runtime: RuntimeDep) -> InferenceEngine:
    """The engine for a request let in by the upload guard (while draining too: the door
    refuses new requests, those already in finish)."""
    if runtime.serving is not None:
        return runtime.serving
    if runtime.state in ("draining", "stopped"):
        raise ShuttingDownError("this replica takes no new work")
    raise NotReadyError(f"model state: {runtime.state}")


EngineDep = Annotated[InferenceEngine, Depends(get_engine)]

# Declared for the OpenAPI document; checked here and, before the body is read, by the
# upload guard (app/guard.py).
_api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="one of COVIDCT_API_KEYS; not needed when no key is configured",
)


def require_api_key(
    runtime: RuntimeDep, key: Annotated[str | None, Depends(_api_key_header)]
) -> None:
    if not api_key_valid(key, runtime.config.guard.api_keys):
        raise UnauthorizedError(f"send a valid key in the {API_KEY_HEADER} header")


_PROBLEM_SCHEMA = {
    "type": "object",
    "description": "RFC 9457 problem details; `type` is stable per failure (docs/api.md lists them)",
    "required": ["type", "title", "status", "detail", "request_id"],
    "properties": {
        "type": {"type": "string", "format": "uri"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "request_id": {"type": "string"},
    },
}
_PROBLEMS: dict[int | str, dict[str, object]] = {
    status: {
        "description": text,
        "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
    }
    for status, text in [
        (400, "not a zip, a corrupt or encrypted member, or a body that is not a form"),
        (401, "missing or wrong X-API-Key (when keys are configured)"),
        (413, "over a limit: upload bytes, members, slices, expansion (zip bomb)"),
        (415, "unsupported transfer syntax, or an image that cannot hold raw CT values"),
        (
            422,
            "no usable image, mixed slice sizes in a series, invalid form fields, or "
            "explain=true for a model without an explain signature",
        ),
        (
            503,
            "model not ready, too busy (inference queue or uploads), or shutting down; "
            "see Retry-After",
        ),
    ]
}


@router.post(
    "/patients/diagnose",
    response_model=DiagnosisOut,
    dependencies=[Depends(require_api_key)],
    responses=_PROBLEMS,
)
async def diagnose(
    runtime: RuntimeDep,
    engine: EngineDep,
    file: Annotated[UploadFile, File(description="zip of DICOM and/or 16-bit TIFF slices")],
    patient_id: Annotated[str, Form(min_length=1, max_length=128)],
    threshold: Annotated[
        float | None, Form(ge=0, le=1, description="patient threshold t; default 0.1")
    ] = None,
    explain: Annotated[FormBool, Form(description=EXPLAIN_FIELD)] = False,
) -> DiagnosisOut:
    explainer = runtime.explainer if explain else None
    if explain and explainer is None:  # refused before any work
        raise ExplainUnsupportedError(
            "the served model has no usable 'explain' signature; export it again with "
            "python -m models to add one, or ask without explain"
        )
    study, result = await diagnose_upload(
        file.file,
        engine,
        runtime.config.pipeline,
        threshold=threshold,
        decode_pool=runtime.decode_pool,
    )
    explanations = await explain_result(explainer, result) if explainer is not None else None
    out = diagnosis_out(
        request_id=request_id_var.get(),
        patient_id=patient_id,
        study=study,
        result=result,
        card=engine.card,
    )
    if explanations is not None:
        attach(out, explanations)
    logger.info(
        "diagnosis",
        extra={
            "audit": True,
            "patient": patient_hash(patient_id, runtime.config.audit_key),
            "model_version": engine.card.version,
            "weights_source": engine.card.weights_source,
            "outcome": out.diagnosis,
            "k": out.k,
            "n": out.n,
            "series": len(out.series),
            "slices": sum(s.slices_total for s in out.series),
            "skipped_members": len(out.skipped),
        },
    )
    return out


@router.get(
    "/health",
    responses={
        503: {"description": "model loading, failed or refused, or draining (see `status`)"}
    },
)
async def health(runtime: RuntimeDep) -> JSONResponse:
    body: dict[str, object] = {"status": runtime.state, "detail": runtime.detail}
    if runtime.card is not None:
        body["model"] = model_summary(runtime.card).model_dump()
        body["model_card"] = runtime.card.model_dump(mode="json")
        if runtime.card.untrained:
            body["warning"] = "model weights are UNTRAINED: diagnoses are meaningless"
    return JSONResponse(body, status_code=200 if runtime.state == "ready" else 503)


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {}}}},
)
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

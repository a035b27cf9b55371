"""HTTP routes. Each route only chains the pipeline; errors become responses in app/problems.py."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.diagnose_document import diagnose_to_document, log_diagnosis_audit
from app.errors import (
    ExplainUnsupportedError,
    NotReadyError,
    ShuttingDownError,
    UnauthorizedError,
)
from app.explain import EXPLAIN_FIELD
from app.guard import API_KEY_HEADER, api_key_valid
from app.inference import InferenceEngine
from app.logs import request_id_var
from app.runtime import Runtime
from app.schemas import DiagnosisOut, FormBool, model_summary

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
    "description": (
        "RFC 9457 problem details; `type` is stable per failure (docs/api.md lists them)"
    ),
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


# The form fields POST /patients/diagnose and POST /jobs share (one definition, one check).
UploadZip = Annotated[UploadFile, File(description="zip of DICOM and/or 16-bit TIFF slices")]
PatientIdForm = Annotated[str, Form(min_length=1, max_length=128)]
ThresholdForm = Annotated[
    float | None, Form(ge=0, le=1, description="patient threshold t; default 0.1")
]


@router.post(
    "/patients/diagnose",
    response_model=DiagnosisOut,
    dependencies=[Depends(require_api_key)],
    responses=_PROBLEMS,
)
async def diagnose(
    runtime: RuntimeDep,
    engine: EngineDep,
    file: UploadZip,
    patient_id: PatientIdForm,
    threshold: ThresholdForm = None,
    explain: Annotated[FormBool, Form(description=EXPLAIN_FIELD)] = False,
) -> DiagnosisOut:
    explainer = runtime.explainer if explain else None
    if explain and explainer is None:  # refused before any work
        raise ExplainUnsupportedError(
            "the served model has no usable 'explain' signature; export it again with "
            "python -m models to add one, or ask without explain"
        )
    diagnosed = await diagnose_to_document(
        file.file,
        runtime,
        engine,
        threshold=threshold,
        explainer=explainer,
        request_id=request_id_var.get(),
        patient_id=patient_id,
    )
    log_diagnosis_audit(logger, diagnosed.out, runtime, engine)
    return diagnosed.out


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

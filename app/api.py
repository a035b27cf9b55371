"""HTTP routes. Each route only chains the pipeline; errors become responses in app/problems.py."""

from __future__ import annotations

import hmac
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.errors import NotReadyError, UnauthorizedError
from app.inference import InferenceEngine
from app.logs import patient_hash, request_id_var
from app.pipeline import diagnose_upload
from app.schemas import DiagnosisOut, diagnosis_out, model_summary
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)
router = APIRouter()

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_engine(request: Request) -> InferenceEngine:
    runtime = request.app.state.runtime
    if runtime.engine is None or runtime.state != "ready":
        raise NotReadyError(f"model state: {runtime.state}")
    return runtime.engine


def require_api_key(request: Request, settings: SettingsDep) -> None:
    if not settings.api_keys:
        return
    given = request.headers.get("x-api-key", "").encode()
    # Compare with every key, in constant time, so timing tells nothing about which matched.
    matched = [hmac.compare_digest(given, key.encode()) for key in settings.api_keys]
    if not any(matched):
        raise UnauthorizedError("send a valid key in the X-API-Key header")


@router.post(
    "/patients/diagnose",
    response_model=DiagnosisOut,
    dependencies=[Depends(require_api_key)],
    responses={400: {}, 401: {}, 413: {}, 415: {}, 422: {}, 503: {}},
)
async def diagnose(
    settings: SettingsDep,
    engine: Annotated[InferenceEngine, Depends(get_engine)],
    file: Annotated[UploadFile, File(description="zip of DICOM and/or 16-bit TIFF slices")],
    patient_id: Annotated[str, Form(min_length=1, max_length=128)],
    threshold: Annotated[
        float | None, Form(ge=0, le=1, description="patient threshold t; default 0.1")
    ] = None,
) -> DiagnosisOut:
    t = settings.patient_threshold if threshold is None else threshold
    study, result = await diagnose_upload(file.file, engine, settings, threshold=t)
    out = diagnosis_out(
        request_id=request_id_var.get(),
        patient_id=patient_id,
        study=study,
        result=result,
        card=engine.card,
    )
    logger.info(
        "diagnosis",
        extra={
            "audit": True,
            "patient": patient_hash(patient_id),
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


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    runtime = request.app.state.runtime
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


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

"""Routes of the asynchronous side: jobs (POST /jobs, GET and DELETE /jobs/{id}) and
STOW-RS in (POST /studies, POST /studies/{StudyInstanceUID}). Each route only chains
`app.job_runner.JobsRuntime`; errors become problem+json in app/problems.py.

With API keys on, a job belongs to the key that made it: another key gets 404.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import zipfile
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from app.api import (
    _PROBLEM_SCHEMA,
    PatientIdForm,
    RuntimeDep,
    ThresholdForm,
    UploadZip,
    _api_key_header,
)
from app.dicomweb import (
    DICOM_JSON,
    StowRequest,
    read_parts,
    response_body,
    response_status,
    stow_boundary,
)
from app.dicomweb.instances import valid_uid
from app.errors import JobRunningError, MalformedRequestError, NotFoundError, UnauthorizedError
from app.guard import API_KEY_HEADER, api_key_valid
from app.job_runner import MAX_WAIT_S, JobsRuntime, JobView
from app.jobs import DeleteOutcome, owner_for
from app.logs import request_id_var
from app.schemas import FormBool, JobListOut, JobOut

router = APIRouter()

DICOM_MULTIPART = 'multipart/related; type="application/dicom"'  # GET /jobs/{id}/dicom
JOB_HEADER = "X-Covidct-Job"  # STOW-RS answers: the job id(s) the instances joined


def get_jobs(request: Request) -> JobsRuntime:
    """The running service's job side (app/main.py puts it on the app)."""
    jobs: JobsRuntime = request.app.state.jobs
    return jobs


JobsDep = Annotated[JobsRuntime, Depends(get_jobs)]


def get_owner(runtime: RuntimeDep, key: Annotated[str | None, Depends(_api_key_header)]) -> str:
    """The caller as a job owner: its API key's hash, or `anonymous` without keys."""
    keys = runtime.config.guard.api_keys
    if not api_key_valid(key, keys):
        raise UnauthorizedError(f"send a valid key in the {API_KEY_HEADER} header")
    return owner_for(key if keys else None)


OwnerDep = Annotated[str, Depends(get_owner)]
JobId = Annotated[str, Path(description="the id POST /jobs or POST /studies answered with")]


def _problems(*statuses: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "description": text,
            "content": {"application/problem+json": {"schema": _PROBLEM_SCHEMA}},
        }
        for status, text in statuses
    }


_UNAUTHORIZED = (401, "missing or wrong X-API-Key (when keys are configured)")
_INVALID = (422, "an invalid path or query parameter")
# The key is needed only when COVIDCT_API_KEYS is set: either the key, or nothing.
_KEY_OR_NONE: dict[str, Any] = {"security": [{"APIKeyHeader": []}, {}]}
_NOT_FOUND = (404, "no such job for this key, or it has expired")
_UNAVAILABLE = (503, "the job store cannot be reached; see Retry-After")


# --- jobs -----------------------------------------------------------------------------------


@router.post(
    "/jobs",
    status_code=202,
    response_model=JobOut,
    openapi_extra=_KEY_OR_NONE,
    responses=_problems(
        (400, "a body that is not a form"),
        _UNAUTHORIZED,
        (413, "upload over COVIDCT_MAX_UPLOAD_BYTES, or over the whole job upload budget"),
        (422, "invalid form fields, or a callback_url off the allowlist (or none allowed)"),
        (503, "job queue full (see Retry-After), store unavailable, model failed, draining"),
    ),
)
async def submit_job(
    jobs: JobsDep,
    owner: OwnerDep,
    response: Response,
    file: UploadZip,
    patient_id: PatientIdForm,
    threshold: ThresholdForm = None,
    callback_url: Annotated[
        str | None,
        Form(
            max_length=2048,
            description="POSTed {id, state, diagnosis} when the job ends, signed "
            "(X-Covidct-Signature); its host must be on COVIDCT_JOBS_CALLBACK_ALLOWLIST",
        ),
    ] = None,
    explain: Annotated[
        FormBool,
        Form(
            description="true: the slices judged COVID get Grad-CAM overlays, as with POST "
            "/patients/diagnose, and the DICOM results a Secondary Capture series of them; "
            "without an explain signature the job's `dicom.overlays_note` says why there "
            "are none"
        ),
    ] = False,
) -> JobOut:
    """Queue a diagnosis of the same form as POST /patients/diagnose: 202 and the job;
    its URL in `Location`."""
    jobs.check_accepting()
    params = {
        "patient_id": patient_id,
        "threshold": threshold,
        "request_id": request_id_var.get(),
        "source": "upload",
        "explain": explain,
    }
    job = await jobs.submit(
        owner=owner, source=file.file, params=params, callback_url=callback_url, size_hint=file.size
    )
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobView(job=job).out()


@router.get(
    "/jobs/{job_id}",
    response_model=JobOut,
    openapi_extra=_KEY_OR_NONE,
    responses=_problems(_UNAUTHORIZED, _NOT_FOUND, _INVALID, _UNAVAILABLE),
)
async def get_job(
    jobs: JobsDep,
    owner: OwnerDep,
    job_id: JobId,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_S,
            description="seconds to wait for a job that has not ended to end (long poll)",
        ),
    ] = 0,
) -> JobOut:
    """The job: queued | running | done (with the diagnosis) | failed (with the problem)."""
    view = await jobs.view(job_id, owner, wait_s=wait)
    if view is None:
        raise NotFoundError("no such job (or it has expired)")
    return view.out()


@router.get(
    "/jobs",
    response_model=JobListOut,
    openapi_extra=_KEY_OR_NONE,
    responses=_problems(_UNAUTHORIZED, _INVALID, _UNAVAILABLE),
)
async def jobs_of_study(
    jobs: JobsDep,
    owner: OwnerDep,
    study_instance_uid: Annotated[
        str,
        Query(
            min_length=1,
            max_length=64,
            pattern=r"^[0-9]+(\.[0-9]+)*$",
            description="the jobs a study stored over STOW-RS became (newest first)",
        ),
    ],
) -> JobListOut:
    views = await jobs.views_of_study(owner, study_instance_uid)
    return JobListOut(jobs=[v.out() for v in views])


@router.delete(
    "/jobs/{job_id}",
    status_code=204,
    response_class=Response,
    openapi_extra=_KEY_OR_NONE,
    responses={
        204: {"description": "cancelled (queued, or still receiving) or forgotten (ended)"},
        **_problems(
            _UNAUTHORIZED,
            _NOT_FOUND,
            (409, "the job is running: it cannot be deleted until it ends"),
            _INVALID,
            _UNAVAILABLE,
        ),
    },
)
async def delete_job(jobs: JobsDep, owner: OwnerDep, job_id: JobId) -> Response:
    outcome = await jobs.delete(job_id, owner)
    if outcome is DeleteOutcome.RUNNING:
        raise JobRunningError("the job is running; delete it once it has ended")
    if outcome is DeleteOutcome.NOT_FOUND:
        raise NotFoundError("no such job (or it has expired)")
    return Response(status_code=204)


@router.get(
    "/jobs/{job_id}/dicom",
    response_class=Response,
    openapi_extra=_KEY_OR_NONE,
    responses={
        200: {
            "description": "the job's DICOM results as Part 10 files: the TID 1500 SR, the "
            "key images (when a slice scored COVID-19) and the overlays (when explained), in "
            "that order (docs/dicom-results.md)",
            "content": {
                DICOM_MULTIPART: {"schema": {"type": "string", "format": "binary"}},
                "application/zip": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        **_problems(
            _UNAUTHORIZED,
            _NOT_FOUND,
            (409, "job-not-done: the job is queued, running, receiving or failed"),
            (422, "no-dicom-source: no DICOM source (TIFF only) or none usable; or invalid id"),
            _UNAVAILABLE,
        ),
    },
)
async def job_dicom(
    jobs: JobsDep,
    owner: OwnerDep,
    job_id: JobId,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """The DICOM results of a done job: `multipart/related; type="application/dicom"`, or a
    zip (`Accept: application/zip`) of `NNN.dcm` members in the same order."""
    objects = await jobs.dicom_objects(job_id, owner)
    if accept is not None and "application/zip" in accept.lower():
        body = await asyncio.to_thread(dicom_zip, objects)
        headers = {"Content-Disposition": 'attachment; filename="dicom-results.zip"'}
        return Response(body, media_type="application/zip", headers=headers)
    boundary = secrets.token_hex(16)
    return Response(
        multipart_body(objects, boundary),
        headers={"Content-Type": f"{DICOM_MULTIPART}; boundary={boundary}"},
    )


def multipart_body(parts: list[bytes], boundary: str) -> bytes:
    """A multipart/related body of application/dicom parts (PS3.18 8.6.1.2)."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    body = b"".join(head + part + b"\r\n" for part in parts)
    return body + f"--{boundary}--\r\n".encode()


def dicom_zip(parts: list[bytes]) -> bytes:
    """A zip of the Part 10 files, `000.dcm`, `001.dcm` … in order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for i, part in enumerate(parts):
            archive.writestr(f"{i:03d}.dcm", part)
    return buffer.getvalue()


# --- STOW-RS in -------------------------------------------------------------------------------

_DICOM_JSON_RESPONSE = {DICOM_JSON: {"schema": {"type": "object"}}}
_STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "every instance stored", "content": _DICOM_JSON_RESPONSE},
    202: {
        "description": "some instances stored, others failed (FailedSOPSequence)",
        "content": _DICOM_JSON_RESPONSE,
    },
    409: {
        "description": "no instance stored (each in FailedSOPSequence with its reason)",
        "content": _DICOM_JSON_RESPONSE,
    },
    **_problems(
        (400, "a malformed multipart body, no instance in it, or a malformed StudyInstanceUID"),
        _UNAUTHORIZED,
        (413, "request body over COVIDCT_MAX_UPLOAD_BYTES, or over the job upload budget"),
        (415, 'not multipart/related; type="application/dicom"'),
        _INVALID,
        (503, "job queue full (see Retry-After), store unavailable, model failed, draining"),
    ),
}


async def _store(
    request: Request, jobs: JobsRuntime, owner: str, study_uid: str | None
) -> Response:
    boundary = stow_boundary(request.headers.get("content-type"))
    if study_uid is not None and not valid_uid(study_uid):
        raise MalformedRequestError("the StudyInstanceUID in the path is not a valid UID")
    jobs.check_accepting()
    declared = request.headers.get("content-length", "").strip()
    await jobs.check_stow_room(int(declared) if declared.isdigit() else 0)
    parts = await read_parts(request.stream(), boundary, jobs.new_part, jobs.study_limits.max_bytes)
    if not parts:
        raise MalformedRequestError("the multipart/related body holds no part")
    stow = StowRequest(owner=owner, request_id=request_id_var.get(), study_uid=study_uid)
    outcomes = await jobs.store_instances(parts, stow)
    job_ids = list(dict.fromkeys(o.job_id for o in outcomes if o.job_id is not None))
    headers = {}
    if job_ids:
        headers[JOB_HEADER] = ", ".join(job_ids)
    if len(job_ids) == 1:
        headers["Content-Location"] = f"/jobs/{job_ids[0]}"
    return JSONResponse(
        response_body(outcomes),
        status_code=response_status(outcomes),
        media_type=DICOM_JSON,
        headers=headers,
    )


# The body (multipart/related; type="application/dicom") is described in the routes' text:
# OpenAPI tools have no serializer for multipart/related.
@router.post(
    "/studies", response_class=Response, responses=_STOW_RESPONSES, openapi_extra=_KEY_OR_NONE
)
async def store_studies(request: Request, jobs: JobsDep, owner: OwnerDep) -> Response:
    """STOW-RS (DICOM PS3.18 10.5): the body is `multipart/related;
    type="application/dicom"`, one DICOM PS3.10 file per part. Instances of any studies;
    each study becomes one job once quiet (COVIDCT_STOW_QUIET_S). The answer is the Store
    Instances Response (application/dicom+json); the job ids are in `X-Covidct-Job` (and
    `Content-Location` when there is one)."""
    return await _store(request, jobs, owner, None)


@router.post(
    "/studies/{study_instance_uid}",
    response_class=Response,
    responses=_STOW_RESPONSES,
    openapi_extra=_KEY_OR_NONE,
)
async def store_study(
    request: Request,
    jobs: JobsDep,
    owner: OwnerDep,
    study_instance_uid: Annotated[str, Path(max_length=64)],
) -> Response:
    """STOW-RS of one study: as POST /studies, and instances of another study fail
    (Failure Reason 0xC409)."""
    return await _store(request, jobs, owner, study_instance_uid)

"""The one place where exceptions become RFC 9457 problem+json responses, and the request
middleware (request id, latency metrics).

Every problem body carries a stable `type`, the request id, and a detail free of patient
data: archive members are referred to by index, submitted values are never echoed.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from traceback import extract_tb

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import PROBLEM_BASE, CovidCTError, QueueFullError
from app.logs import request_id_var

logger = logging.getLogger(__name__)
PROBLEM_JSON = "application/problem+json"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def problem(
    status: int, type_: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    metrics.ERRORS.labels(type_).inc()
    body = {
        "type": PROBLEM_BASE + type_,
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request_id_var.get(),
    }
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problem_for(exc: CovidCTError) -> JSONResponse:
    """The response for one of the service's failures; 503s say when to retry."""
    headers = {}
    if isinstance(exc, QueueFullError):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif exc.status == 503:
        headers["Retry-After"] = "10"
    elif exc.status == 401:
        headers["WWW-Authenticate"] = 'APIKey header="X-API-Key"'
    logger.info("request refused", extra={"problem": exc.type_, "status": exc.status})
    return problem(exc.status, exc.type_, exc.title, exc.detail, headers)


async def _covidct_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CovidCTError)
    return problem_for(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Field locations and messages only: never echo the submitted values.
    fields = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return problem(422, "invalid-request", "Request is invalid", fields)


_HTTP_TYPES = {400: "malformed-request", 404: "not-found", 405: "method-not-allowed"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, CovidCTError):
        # FastAPI wraps whatever fails while it reads the body (here: the upload guard's
        # byte limit, raised from `receive`) in a 400; answer with the real failure.
        return problem_for(exc.__cause__)
    type_ = _HTTP_TYPES.get(exc.status_code, "http-error")
    headers = dict(exc.headers) if exc.headers is not None else None
    return problem(exc.status_code, type_, str(exc.detail), str(exc.detail), headers)


def _unexpected() -> JSONResponse:
    return problem(500, "internal", "Internal error", "an unexpected error occurred")


def install_problem_handlers(app: FastAPI) -> None:
    """Exception handlers: every failure leaves as problem+json."""
    app.add_exception_handler(CovidCTError, _covidct_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)


class RequestContextMiddleware:
    """Request id (X-Request-ID, taken from the caller when well-formed), latency metrics, and
    the 500 problem for an unexpected error (here, so that it carries the request id too).

    The error is re-raised after the answer, so the server (and a TestClient) still sees it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        status, t0, observed, started = 500, time.perf_counter(), False, False

        def observe() -> None:
            nonlocal observed
            if not observed:
                observed = True
                path = getattr(scope.get("route"), "path", "unmatched")
                metrics.HTTP_REQUEST_DURATION.labels(path, scope["method"], str(status)).observe(
                    time.perf_counter() - t0
                )

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                message["headers"] = headers
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                observe()  # when the last byte is out, before the client can ask /metrics

        metrics.HTTP_REQUESTS_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # Type and code locations only: messages of library exceptions may quote
            # patient data.
            frames = [f"{f.filename}:{f.lineno} {f.name}" for f in extract_tb(exc.__traceback__)]
            logger.error(
                "unhandled error", extra={"exception": type(exc).__name__, "where": frames[-8:]}
            )
            if not started:
                await _unexpected()(scope, receive, send_with_id)
            raise
        finally:
            metrics.HTTP_REQUESTS_IN_FLIGHT.dec()
            observe()
            request_id_var.reset(token)

"""The door of POST /patients/diagnose: checks made before and while its body streams in.

FastAPI reads a form body before it resolves a route's dependencies, so a route-level key
check or size limit would come after a whole upload had been received and spooled. This
ASGI middleware answers first, in this order:

1. API key (when keys are configured): 401, body unread.
2. Content-Length over `max_upload_bytes`: 413, body unread.
3. More than `max_concurrent_uploads` diagnose requests in progress: 503 with Retry-After.
4. While the body streams: the bytes received so far over `max_upload_bytes`: 413 at once.

Answers are problem+json, built by app/problems.py like every other error.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors
from app.problems import problem_for
from app.settings import Settings

DIAGNOSE_PATH = "/patients/diagnose"
API_KEY_HEADER = "X-API-Key"


def api_key_valid(given: str | None, settings: Settings) -> bool:
    """True when no keys are configured or `given` is one of them.

    Compares SHA-256 digests (equal lengths, so nothing leaks about key lengths) with
    every configured key in constant time, so timing tells nothing about which matched.
    """
    if not settings.api_keys:
        return True
    # Header values arrive decoded as latin-1: encoding back gives the bytes the client sent
    # (UTF-8 for a non-ASCII key), comparable with the configured key's UTF-8.
    digest = hashlib.sha256((given or "").encode("latin-1", "replace")).digest()
    matched = [
        hmac.compare_digest(digest, hashlib.sha256(key.get_secret_value().encode()).digest())
        for key in settings.api_keys
    ]
    return given is not None and any(matched)


class UploadGuardMiddleware:
    """Access, size and concurrency checks for diagnose requests; byte counting for all."""

    def __init__(self, app: ASGIApp, settings: Callable[[], Settings]) -> None:
        self.app = app
        self.settings = settings
        self.in_progress = 0  # diagnose requests past the door (one event loop: no lock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = self.settings()
        counted = _counting(receive, settings.max_upload_bytes)
        if not _is_diagnose(scope):
            await self.app(scope, counted, send)
            return
        refusal = _refusal(scope, settings)
        if refusal is None and self.in_progress >= settings.max_concurrent_uploads:
            refusal = errors.QueueFullError(
                f"{self.in_progress} diagnose requests are in progress; the limit is "
                f"{settings.max_concurrent_uploads}",
                retry_after_s=settings.retry_after_s,
            )
        if refusal is not None:
            await _answer(refusal, scope, receive, send)
            return
        self.in_progress += 1
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except errors.UploadTooLargeError as e:  # raised by `counted`, not turned into a response
            if started:
                raise
            await _answer(e, scope, receive, send)
        finally:
            self.in_progress -= 1


def _is_diagnose(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"].rstrip("/") == DIAGNOSE_PATH


def _refusal(scope: Scope, settings: Settings) -> errors.CovidCTError | None:
    headers = dict(scope["headers"])
    key = headers.get(API_KEY_HEADER.lower().encode())
    if not api_key_valid(key.decode("latin-1") if key is not None else None, settings):
        return errors.UnauthorizedError(f"send a valid key in the {API_KEY_HEADER} header")
    declared = headers.get(b"content-length", b"").strip()
    if declared.isdigit() and int(declared) > settings.max_upload_bytes:
        return _too_large(settings.max_upload_bytes, f"Content-Length is {int(declared)}")
    return None


def _too_large(limit: int, what: str) -> errors.UploadTooLargeError:
    return errors.UploadTooLargeError(f"{what}; the upload limit is {limit} bytes")


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises UploadTooLargeError as soon as the body exceeds `limit` bytes."""
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit, f"the request body exceeds {limit} bytes")
        return message

    return counted


async def _answer(error: errors.CovidCTError, scope: Scope, receive: Receive, send: Send) -> None:
    await problem_for(error)(scope, receive, send)

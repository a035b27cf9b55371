"""The door of the uploads (POST /patients/diagnose, /jobs and /studies): checks made before
and while their body streams in.

FastAPI reads a form body before it resolves a route's dependencies, so a route-level key
check or size limit would come after a whole upload had been received and spooled. This
ASGI middleware answers first, in this order:

1. API key (when keys are configured): 401, body unread.
2. Content-Length over `max_upload_bytes`: 413, body unread.
3. The service is shutting down (the door is closed): 503 with Retry-After.
4. More than `max_concurrent_uploads` diagnose requests in progress: 503 with Retry-After.
5. While the body streams: the bytes received so far over `max_upload_bytes`: 413 at once.

Answers are problem+json, built by app/problems.py like every other error. The requests
let in are counted on a `Door`, which a graceful shutdown closes and waits on.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import errors
from app.problems import problem_for

DIAGNOSE_PATH = "/patients/diagnose"
JOBS_PATH = "/jobs"
STUDIES_PATH = "/studies"  # STOW-RS (app/dicomweb)
UPLOAD_PATHS = frozenset({DIAGNOSE_PATH, JOBS_PATH, STUDIES_PATH})
API_KEY_HEADER = "X-API-Key"


@dataclass(frozen=True)
class GuardConfig:
    """The door's rules: who may post, how much, how many at once."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no key needed
    max_upload_bytes: int = 1024 * 1024 * 1024  # the whole request body
    max_concurrent_uploads: int = 8  # diagnose requests in progress at once
    retry_after_s: int = 5  # Retry-After of the 503 when that many are in progress


def api_key_valid(given: str | None, keys: Sequence[str]) -> bool:
    """True when no keys are configured or `given` is one of them.

    Compares SHA-256 digests (equal lengths, so nothing leaks about key lengths) with
    every configured key in constant time, so timing tells nothing about which matched.
    """
    if not keys:
        return True
    # Header values arrive decoded as latin-1: encoding back gives the bytes the client sent
    # (UTF-8 for a non-ASCII key), comparable with the configured key's UTF-8.
    digest = hashlib.sha256((given or "").encode("latin-1", "replace")).digest()
    matched = [hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest()) for key in keys]
    return given is not None and any(matched)


class Door:
    """The diagnose requests let in and not yet answered; closed for a graceful shutdown.

    Used from the event loop only (no lock).
    """

    def __init__(self) -> None:
        self.in_progress = 0
        self.closed = False
        self._empty: asyncio.Event | None = None

    def enter(self) -> None:
        self.in_progress += 1

    def leave(self) -> None:
        self.in_progress -= 1
        if self.in_progress == 0 and self._empty is not None:
            self._empty.set()

    async def close_and_wait(self, timeout_s: float) -> bool:
        """Let no one in any more; wait until those inside have their answer. False when
        some are still inside after `timeout_s`."""
        self.closed = True
        if self.in_progress == 0:
            return True
        self._empty = asyncio.Event()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class UploadGuardMiddleware:
    """Access, size and concurrency checks for diagnose requests; byte counting for all."""

    def __init__(self, app: ASGIApp, config: GuardConfig, door: Door) -> None:
        self.app = app
        self.config = config
        self.door = door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config, door = self.config, self.door
        counted = _counting(receive, config.max_upload_bytes)
        if not _is_diagnose(scope):
            await self.app(scope, counted, send)
            return
        refusal = _refusal(scope, config)
        if refusal is None and door.closed:
            refusal = errors.ShuttingDownError("this replica takes no new work")
        if refusal is None and door.in_progress >= config.max_concurrent_uploads:
            refusal = errors.QueueFullError(
                f"{door.in_progress} diagnose requests are in progress; the limit is "
                f"{config.max_concurrent_uploads}",
                retry_after_s=config.retry_after_s,
            )
        if refusal is not None:
            await _answer(refusal, scope, receive, send)
            return
        door.enter()
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
            door.leave()


def _is_diagnose(scope: Scope) -> bool:
    """An upload: the synchronous diagnosis, a job (POST /jobs) or a STOW-RS store
    (POST /studies, POST /studies/{StudyInstanceUID})."""
    if scope["method"] != "POST":
        return False
    path = scope["path"].rstrip("/")
    return path in UPLOAD_PATHS or path.startswith(STUDIES_PATH + "/")


def _refusal(scope: Scope, config: GuardConfig) -> errors.CovidCTError | None:
    headers = dict(scope["headers"])
    key = headers.get(API_KEY_HEADER.lower().encode())
    if not api_key_valid(key.decode("latin-1") if key is not None else None, config.api_keys):
        return errors.UnauthorizedError(f"send a valid key in the {API_KEY_HEADER} header")
    declared = headers.get(b"content-length", b"").strip()
    if declared.isdigit() and int(declared) > config.max_upload_bytes:
        return _too_large(config.max_upload_bytes, f"Content-Length is {int(declared)}")
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

"""Callbacks: when a job ends, POST `{id, state, diagnosis}` to the job's callback_url.

The body is signed with HMAC-SHA256 under the configured secret; the receiver recomputes
it over the raw body and compares:

    X-Covidct-Signature: sha256=<hex digest of HMAC-SHA256(secret, body)>

Only hosts on the allowlist can be called (an empty allowlist refuses every callback),
checked when the job is submitted and again before each delivery, and redirects are not
followed, so the service can't be made to reach arbitrary internal hosts. Deliveries
that fail for a reason worth retrying (no connection, timeout, 408, 425, 429, 5xx) are
retried with exponential backoff; other answers end the delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import httpx

from app.jobs.config import JobsConfig
from app.jobs.model import Job, JobState, job_ref

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Covidct-Signature"
JOB_HEADER = "X-Covidct-Job"
_RETRY_STATUSES = frozenset({408, 425, 429})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class CallbackRefused(ValueError):
    """A callback_url the service won't call (the routes answer 422). The message never
    repeats the URL."""


def check_callback_url(url: str, allowlist: Sequence[str]) -> str:
    """`url` if it may be called: http(s), no credentials, its host on `allowlist`.

    Allowlist entries are `host` (any port) or `host:port`, compared exactly, case-
    insensitively (IPv6 literals in brackets: `[::1]:8080`). No wildcards."""
    if not allowlist:
        raise CallbackRefused("callbacks are not enabled: the callback host allowlist is empty")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise CallbackRefused("callback_url is not a valid URL") from e
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise CallbackRefused("callback_url must be an http or https URL with a host")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("callback_url must not carry credentials")
    host = parts.hostname.lower()
    port = port if port is not None else _DEFAULT_PORTS[parts.scheme]
    for entry in allowlist:
        allowed_host, allowed_port = _split_entry(entry)
        if allowed_host == host and allowed_port in (None, port):
            return url
    raise CallbackRefused("callback_url's host is not on the callback allowlist")


def _split_entry(entry: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + entry.strip())
    return (parts.hostname or "").lower(), parts.port


def sign(body: bytes, secret: str) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def callback_body(job: Job) -> bytes:
    """`{id, state, diagnosis}`; a failed job's problem+json under `problem`."""
    doc: dict[str, object] = {
        "id": job.id,
        "state": job.state.value,
        "diagnosis": job.result if job.state is JobState.DONE else None,
    }
    if job.state is JobState.FAILED:
        doc["problem"] = job.problem
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


Sleep = Callable[[float], Awaitable[None]]


class CallbackSender:
    """Delivers a job's callback with retries. `transport` and `sleep` are for tests."""

    def __init__(
        self,
        config: JobsConfig,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = asyncio.sleep,
        max_backoff_s: float = 300.0,
    ) -> None:
        self._config = config
        self._transport = transport
        self._sleep = sleep
        self._max_backoff_s = max_backoff_s

    def delays(self) -> list[float]:
        """The waits before the 2nd, 3rd, … attempt: backoff, doubled each time, capped."""
        base = self._config.callback_backoff_s
        return [
            min(base * 2**i, self._max_backoff_s) for i in range(self._config.callback_attempts - 1)
        ]

    async def deliver(self, job: Job) -> bool:
        """POST the job's callback; True once a receiver answered 2xx."""
        if job.callback_url is None:
            return False
        try:
            check_callback_url(job.callback_url, self._config.callback_allowlist)
        except CallbackRefused as e:
            logger.warning("callback refused", extra={"job": job_ref(job.id), "reason": str(e)})
            return False
        body = callback_body(job)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(body, self._config.callback_secret),
            JOB_HEADER: job.id,
        }
        waits = self.delays()
        async with httpx.AsyncClient(
            timeout=self._config.callback_timeout_s,
            follow_redirects=False,
            transport=self._transport,
        ) as client:
            for attempt in range(1, self._config.callback_attempts + 1):
                outcome = await self._attempt(client, job.callback_url, body, headers)
                extra = {"job": job_ref(job.id), "attempt": attempt, "outcome": outcome}
                if outcome == "delivered":
                    logger.info("callback delivered", extra=extra)
                    return True
                if outcome == "refused" or attempt > len(waits):
                    logger.warning("callback not delivered", extra=extra)
                    return False
                logger.info("callback failed, will retry", extra=extra)
                await self._sleep(waits[attempt - 1])
        return False

    @staticmethod
    async def _attempt(
        client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> str:
        """'delivered', 'retry' (worth another try) or 'refused' (not)."""
        try:
            response = await client.post(url, content=body, headers=headers)
        except httpx.TransportError:  # no connection, timeout, protocol error
            return "retry"
        if response.is_success:
            return "delivered"
        if response.status_code in _RETRY_STATUSES or response.status_code >= 500:
            return "retry"
        return "refused"

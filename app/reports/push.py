"""Push a job's DICOM results to a configured DICOMweb server over STOW-RS, with retries.

dicomweb-client does the STOW-RS request, its own retries off (they would retry any
exception five times with up to 16 s waits, inside each of ours); this module retries
the whole request on connection errors, timeouts, 408, 429 and 5xx answers, waiting
`backoff_s`, doubled after each try, and reports the outcome in words free of patient
data (status codes and error types only). The Authorization header value is a secret:
never logged (the dicomweb_client logger is among the redacted ones, app/logs.py).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

logger = logging.getLogger(__name__)

_RETRIED = frozenset({408, 429})  # request timeout, too many requests: worth another try


@dataclass(frozen=True)
class PushConfig:
    """Where finished jobs' results go: `url` "" is off. `authorization`: the value of the
    Authorization header (e.g. "Bearer …"), "" for none."""

    url: str = ""
    authorization: str = field(default="", repr=False)
    attempts: int = 3
    backoff_s: float = 2.0  # wait before the second try, doubled after each
    timeout_s: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class PushOutcome:
    outcome: str  # "stored" | "failed" | "skipped" (not tried)
    attempts: int
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "attempts": self.attempts, "detail": self.detail}


def push_results(
    parts: Sequence[bytes],
    config: PushConfig,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> PushOutcome:
    """STOW-RS the Part 10 `parts` to `config.url`. Blocking: call it in a worker thread."""
    datasets = [pydicom.dcmread(io.BytesIO(p)) for p in parts]
    headers = {"Authorization": config.authorization} if config.authorization else None
    client = DICOMwebClient(url=config.url, headers=headers, timeout=config.timeout_s)
    client.set_http_retry_params(retry=False)
    detail = ""
    for attempt in range(1, config.attempts + 1):
        try:
            answer = client.store_instances(datasets=datasets)
        except requests.HTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            detail = f"HTTP {status}"
            if status and status < 500 and status not in _RETRIED:  # refused for good
                return _failed(attempt, detail)
        except requests.RequestException as e:
            detail = type(e).__name__
        else:
            failed = answer.get("FailedSOPSequence") if answer is not None else None
            if failed:
                return _failed(attempt, f"{len(failed)} of {len(datasets)} instances refused")
            logger.info("dicom results pushed", extra={"objects": len(datasets)})
            return PushOutcome("stored", attempt)
        if attempt < config.attempts:
            sleep(config.backoff_s * 2 ** (attempt - 1))
    return _failed(config.attempts, detail)


def _failed(attempts: int, detail: str) -> PushOutcome:
    logger.warning("dicom results push failed", extra={"attempts": attempts, "detail": detail})
    return PushOutcome("failed", attempts, detail)

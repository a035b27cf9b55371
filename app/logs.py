"""Structured JSON logs carrying the request id. Never log patient data: no DICOM tag
values, no pixel data, no archive member names, no raw patient id (hash it)."""

from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            # Exception type only: messages of library exceptions may quote tag values.
            entry["exception"] = record.exc_info[0].__name__ if record.exc_info[0] else None
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    for name in ("app", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False
    # uvicorn's access log prints query strings and client addresses; the service's own
    # request log replaces it.
    logging.getLogger("uvicorn.access").disabled = True


def patient_hash(patient_id: str) -> str:
    """A short, stable pseudonym for correlating audit lines without the identifier."""
    return hashlib.sha256(patient_id.encode()).hexdigest()[:16]

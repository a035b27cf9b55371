"""Structured JSON logs carrying the request id. Never log patient data: no DICOM tag
values, no pixel data, no archive member names, no raw patient id (pseudonymise it).

The service's own messages are written to that rule. Libraries that read the upload
(pydicom, tifffile, the JPEG decoders, python-multipart) are not: pydicom, for one, quotes
invalid tag values in its warnings. Their records therefore lose their text when they are
created, before any handler sees them (:func:`protect_library_logs`), and Python warnings
are routed through logging so they are redacted the same way.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
import time
import warnings
from typing import Any

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# Loggers whose messages may quote what the client sent (tag values, file names, form
# fields). "py.warnings" is where logging.captureWarnings sends warnings.
UNTRUSTED_LOGGERS = (
    "pydicom",
    "highdicom",  # builds DICOM results from source headers (app/reports)
    "dicomweb_client",  # pushes them (app/reports/push.py); its debug lines quote headers
    "tifffile",
    "PIL",
    "imagecodecs",
    "pylibjpeg",
    "libjpeg",
    "openjpeg",
    "rle",
    "gdcm",
    "python_multipart",
    "multipart",
    "fastapi",
    "starlette",
    "py.warnings",
)
WITHHELD = "library message withheld: its text may quote patient data"
_WARNING_HEAD = re.compile(r"^(?P<where>[^\n]*?:\d+): (?P<category>\w+): ")
# Modules whose warnings.warn texts may quote tag values (matched against the warning's
# module): ignored at the source, so they reach neither stderr nor a test report.
_QUIET_WARNING_MODULES = r"(pydicom|tifffile|pylibjpeg|libjpeg|openjpeg|rle|PIL)(\.|$)"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
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


def _untrusted(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in UNTRUSTED_LOGGERS)


def _redact(record: logging.LogRecord) -> None:
    """Keep where and how bad (logger, level, source line, warning category), drop what."""
    message = WITHHELD
    if record.name == "py.warnings" and record.args:
        first = record.args[0] if isinstance(record.args, tuple) else record.args
        head = _WARNING_HEAD.match(str(first))
        if head:
            message = f"{head['category']} at {head['where']}: {WITHHELD}"
    if record.exc_info and record.exc_info[0] is not None:
        record.__dict__["exception"] = record.exc_info[0].__name__
    record.msg, record.args = message, ()
    record.exc_info, record.exc_text, record.stack_info = None, None, None


def protect_library_logs() -> None:
    """Redact library records at creation and silence their warnings; idempotent.

    Process-wide: a LogRecord factory (so caplog, the JSON handler and any handler an
    operator adds all see the redacted text), Python warnings routed into logging, and
    warnings issued by the image libraries ignored.
    """
    # (Re)applied on every call: a warnings.catch_warnings block (pytest runs each test in
    # one) restores the filters it found when it ends.
    warnings.filterwarnings("ignore", module=_QUIET_WARNING_MODULES)
    logging.captureWarnings(True)
    previous = logging.getLogRecordFactory()
    if getattr(previous, "covidct_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if _untrusted(record.name):
            _redact(record)
        return record

    factory.covidct_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def configure_logging(level: str = "INFO") -> None:
    protect_library_logs()
    # stdout carries the JSON lines alone; native libraries write their own fixed-text
    # diagnostics straight to stderr (TensorFlow's start-up lines, for one).
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    for name in ("app", "uvicorn", "uvicorn.error"):
        log = logging.getLogger(name)
        log.handlers[:] = [handler]
        log.setLevel(level)
        log.propagate = False
    # Everything else (libraries, warnings) reaches the root: JSON too, warnings and up.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # uvicorn's access log prints query strings and client addresses; the service's own
    # request log replaces it.
    logging.getLogger("uvicorn.access").disabled = True


# A random key per process when COVIDCT_AUDIT_HASH_KEY is unset: pseudonyms then correlate
# audit lines within one run of the service only.
_PROCESS_KEY = secrets.token_bytes(32)


def patient_hash(patient_id: str, key: bytes | None = None) -> str:
    """A short, stable pseudonym for correlating audit lines without the identifier.

    HMAC-SHA256 under a secret key, so a low-entropy identifier (a medical record number,
    a name) cannot be recovered by hashing a dictionary of candidates. 64 bits, hex.
    """
    digest = hmac.new(key or _PROCESS_KEY, patient_id.encode("utf-8", "replace"), hashlib.sha256)
    return digest.hexdigest()[:16]

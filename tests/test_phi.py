"""Patient data planted in DICOM tags, a TIFF tag, archive member names, the upload's file
name and an exception message never reaches the logs (the production JSON logging, every
logger at DEBUG, pydicom's own debug output, Python warnings) or an error body.

The one place planted data may appear is a successful answer: it echoes the caller's
patient id and the member names the caller sent (slice `source`).
"""

from __future__ import annotations

import io
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom import config as dicom_config

from app.logs import UNTRUSTED_LOGGERS, configure_logging, patient_hash, protect_library_logs
from dicom_factory import PHI_NAME, PHI_STRINGS, dicom_bytes, plant_phi, synthetic_ct, tiff_bytes
from hostile import corrupt_deflate, p002_slice, post
from shared_data import needs_data, zip_files

pytestmark = needs_data

PHI_DIR = "DOE_JOHN_1970"
UPLOAD_NAME = "DOE_JOHN_1970_chest.zip"
PATIENT_ID = "MRN4711XQ"


@dataclass
class Capture:
    json_lines: io.StringIO
    caplog: pytest.LogCaptureFixture
    warned: list[warnings.WarningMessage]
    bodies: list[str] = field(default_factory=list)

    def logs(self) -> str:
        return "\n".join(
            [self.json_lines.getvalue(), self.caplog.text, *(str(w.message) for w in self.warned)]
        )

    def assert_clean(self) -> None:
        text = "\n".join([self.logs(), *self.bodies])
        for planted in (*PHI_STRINGS, PHI_DIR, UPLOAD_NAME, PATIENT_ID):
            assert planted not in text, planted
        lines = [line for line in self.json_lines.getvalue().splitlines() if line]
        assert lines, "the JSON handler saw nothing"
        for line in lines:
            json.loads(line)  # structured, one object a line
            assert len(line) < 4096  # no dumps (pixel data, whole datasets)


@pytest.fixture
def captured(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[Capture]:
    """The production logging configuration writing into a buffer, caplog on every logger
    at DEBUG, pydicom's element-by-element debug output on, and warnings recorded."""
    manager = logging.root.manager
    loggers = [logging.getLogger(n) for n in list(manager.loggerDict)] + [logging.getLogger()]
    saved = [(log, log.level, list(log.handlers), log.propagate, log.disabled) for log in loggers]
    pydicom_debugging = dicom_config.debugging
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    configure_logging("DEBUG")  # its handler writes to the buffer
    monkeypatch.undo()
    for log in loggers:
        log.setLevel(logging.DEBUG)
    for name in ("app", "uvicorn", "uvicorn.error"):  # they do not propagate to caplog's root
        logging.getLogger(name).addHandler(caplog.handler)
    caplog.set_level(logging.DEBUG)
    dicom_config.debug(True)
    try:
        with warnings.catch_warnings(record=True) as warned:
            protect_library_logs()  # the process's warning filters, inside this block
            yield Capture(buffer, caplog, warned)
    finally:
        dicom_config.debug(pydicom_debugging)
        dicom_config.debugging = pydicom_debugging
        for log, level, handlers, propagate, disabled in saved:
            log.setLevel(level)
            log.handlers[:] = handlers
            log.propagate, log.disabled = propagate, disabled


def phi_slice(number: int = 60) -> bytes:
    return dicom_bytes(plant_phi(pydicom.dcmread(p002_slice(number))))


def phi_tiff() -> bytes:
    values = pydicom.dcmread(p002_slice(60)).pixel_array.astype(np.uint16)
    return tiff_bytes(values, description=f"{PHI_NAME} {PATIENT_ID} 19700131")


def in_phi_dir(*members: tuple[str, bytes]) -> bytes:
    return zip_files([(f"{PHI_DIR}/{name}", data) for name, data in members])


def send(client: TestClient, capture: Capture, archive: bytes) -> Any:
    r = post(client, archive, patient_id=PATIENT_ID, filename=UPLOAD_NAME)
    if r.status_code != 200:
        capture.bodies.append(r.text)
    return r


def test_valid_uploads_log_only_a_keyed_pseudonym(client: TestClient, captured: Capture) -> None:
    for archive in (
        in_phi_dir(("slice.dcm", phi_slice())),
        in_phi_dir(("IM00001.tif", phi_tiff())),
    ):
        r = send(client, captured, archive)
        assert r.status_code == 200, r.text
        assert r.json()["patient_id"] == PATIENT_ID  # echoed to the caller who sent it
    audit = [json.loads(line) for line in captured.json_lines.getvalue().splitlines()]
    audit = [entry for entry in audit if entry.get("audit")]
    assert len(audit) == 2
    for entry in audit:
        assert entry["patient"] == patient_hash(PATIENT_ID) != PATIENT_ID
        assert entry["request_id"] not in ("-", None)
        assert {"model_version", "outcome", "k", "n", "slices"} <= entry.keys()
    captured.assert_clean()


INVALID = {
    "8-bit": lambda: in_phi_dir(("a.dcm", synthetic_ct(np.zeros((64, 64), np.uint8), bits=8))),
    "mixed sizes": lambda: in_phi_dir(
        ("a.dcm", synthetic_ct(np.zeros((64, 64), np.uint16), z=0)),
        ("b.dcm", synthetic_ct(np.zeros((32, 32), np.uint16), z=1)),
    ),
    "unsupported syntax": lambda: in_phi_dir(("a.dcm", unsupported_syntax())),
    "truncated pixels": lambda: in_phi_dir(("a.dcm", phi_slice()[:-30_000])),
    "corrupt deflate": lambda: corrupt_deflate(phi_slice()),
    "text member": lambda: in_phi_dir((f"{PHI_NAME}.txt", f"{PHI_NAME} {PATIENT_ID}".encode())),
    "not a zip": lambda: phi_slice(),
    "bad charset": lambda: in_phi_dir(("a.dcm", bad_charset())),
    "float TIFF": lambda: in_phi_dir(("a.tif", tiff_bytes(np.zeros((8, 8), np.float32)))),
}


def unsupported_syntax() -> bytes:
    ds = plant_phi(pydicom.dcmread(p002_slice(60)))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    return dicom_bytes(ds)


def bad_charset() -> bytes:
    """An unknown character set named like the patient: pydicom warns, quoting it."""
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(np.zeros((8, 8), np.uint16))), force=True)
    ds.SpecificCharacterSet = PHI_NAME
    return dicom_bytes(ds)


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_uploads_leak_nothing(client: TestClient, captured: Capture, case: str) -> None:
    r = send(client, captured, INVALID[case]())
    assert r.status_code >= 400 or case == "bad charset", r.text
    captured.assert_clean()


def test_an_unexpected_error_leaks_nothing(
    client: TestClient, captured: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_: object) -> None:
        raise RuntimeError(f"cannot handle {PHI_NAME} born 19700131 in {PHI_DIR}")

    monkeypatch.setattr("app.pipeline.open_study", failing)
    raw = TestClient(client.app, raise_server_exceptions=False)
    r = send(raw, captured, in_phi_dir(("a.dcm", phi_slice())))
    assert r.status_code == 500
    body = r.json()
    assert body["type"].endswith("/internal") and body["request_id"] == r.headers["x-request-id"]
    errors = [json.loads(line) for line in captured.json_lines.getvalue().splitlines()]
    (error,) = [e for e in errors if e["message"] == "unhandled error"]
    assert error["exception"] == "RuntimeError" and error["request_id"] == body["request_id"]
    assert any("pipeline" in frame for frame in error["where"])
    captured.assert_clean()


def test_library_loggers_and_warnings_are_redacted(captured: Capture) -> None:
    """Whatever a library says about what it read loses its text, in every handler."""
    for name in UNTRUSTED_LOGGERS:
        log = logging.getLogger(f"{name}.sub")
        log.warning("value %s", PHI_NAME)
        log.debug(f"element (0010,0010) PN: '{PHI_NAME}'")
        try:
            raise ValueError(PHI_NAME)
        except ValueError:
            log.exception("failed on %s", PHI_DIR)
    # pydicom's own warning path: an unknown character set, named like the patient.
    ds = pydicom.dcmread(io.BytesIO(bad_charset()), force=True)
    ds.decode()
    assert str(ds.PatientName) == PHI_NAME  # read, with a warning quoting the charset
    # A warning raised from an untrusted module through the logging route.
    logging.getLogger("py.warnings").warning(
        "%s", f"/x/pydicom/charset.py:1: UserWarning: Unknown encoding '{PHI_NAME}'\n"
    )
    captured.assert_clean()
    assert "UserWarning" in captured.json_lines.getvalue()


def test_native_decoders_write_no_patient_data_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """Native decoders may print to file descriptor 2, past every Python handler (GDCM's
    libjpeg did, on this very input): nothing there may hold patient data."""
    from pydicom.encaps import encapsulate, generate_frames

    from app.ingest import IngestLimits, ingest_zip

    ds = plant_phi(pydicom.dcmread(p002_slice()))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 2] + frame[len(frame) // 2 + 7 :]])
    capfd.readouterr()
    ingest_zip(zip_files([(f"{PHI_DIR}/{PHI_NAME}.dcm", dicom_bytes(ds))]), IngestLimits())
    err = capfd.readouterr().err
    for planted in (*PHI_STRINGS, PHI_DIR):
        assert planted not in err, planted

"""dciodvfy (dicom3tools, Debian package `dicom3tools`) as a test oracle.

Outside CI a missing dciodvfy skips the validation with the reason; in CI (CI=true) it
fails: there the validator is part of the job (`apt-get install -y dicom3tools`).
Every warning dciodvfy may give must match one of KNOWN_WARNINGS, each explained in
docs/dicom-results.md; anything else fails the test that produced it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from app.reports import part10_bytes

KNOWN_WARNINGS = (
    # The rule's numbers are coded in the private scheme 99COVIDCT (declared in the
    # Coding Scheme Identification Sequence); dciodvfy knows only the registered schemes.
    re.compile(
        r"Unrecognized defined term <99COVIDCT> for value 1 of attribute "
        r"<Coding Scheme Designator>"
    ),
    # Copied from a source that has them empty (de-identified data such as P002): the
    # study's date, time and ID are Type 2, empty is valid; only a DICOMDIR would need them.
    re.compile(
        r"Missing attribute or value that would be needed to build DICOMDIR - "
        r"(Study Date|Study Time|Study ID|Patient ID)"
    ),
    # Copied verbatim from the source: a Patient's Name without "^" is the retired
    # single-component form, still valid; a result never rewrites patient data.
    re.compile(
        r"Value dubious for this VR - \(0x0010,0x0010\) PN Patient's Name .*"
        r"Retired Person Name form"
    ),
)
_VALUES = (  # how dciodvfy quotes values: = <value>, "value", = 'character'
    (re.compile(r" = <[^<>]*>"), " = <withheld>"),
    (re.compile(r'"[^"]*"'), '"withheld"'),
    (re.compile(r" = '[^']*'"), " = 'withheld'"),
)


@dataclass(frozen=True)
class Verdict:
    kind: str  # the IOD dciodvfy recognised, e.g. "Comprehensive3DSR"
    errors: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def unexplained_warnings(self) -> tuple[str, ...]:
        return tuple(w for w in self.warnings if not any(p.search(w) for p in KNOWN_WARNINGS))


def dciodvfy_path() -> str:
    path = shutil.which("dciodvfy")
    if path is None:
        reason = "dciodvfy not found (Debian package dicom3tools: apt-get install dicom3tools)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + "; CI must install it")
        pytest.skip(reason)
    return path


def validate(dataset: Dataset) -> Verdict:
    """Write `dataset` as a Part 10 file and run dciodvfy on it."""
    program = dciodvfy_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "object.dcm"
        path.write_bytes(part10_bytes(dataset))
        run = subprocess.run(
            [program, str(path)],
            capture_output=True,
            encoding="latin-1",  # it quotes values in their own bytes; latin-1 decodes any
            timeout=60,
            check=False,
        )
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    kind = next((line for line in lines if not line.startswith(("Error", "Warning"))), "")
    return Verdict(
        kind=kind,
        errors=tuple(_redact(line) for line in lines if line.startswith("Error")),
        warnings=tuple(_redact(line) for line in lines if line.startswith("Warning")),
    )


def _redact(line: str) -> str:
    """dciodvfy quotes values; a failing test's message must not carry patient data."""
    for pattern, replacement in _VALUES:
        line = pattern.sub(replacement, line)
    return line


def assert_valid(dataset: Dataset, kind: str) -> Verdict:
    verdict = validate(dataset)
    assert verdict.kind == kind, verdict
    assert verdict.errors == (), verdict.errors
    assert verdict.unexplained_warnings == (), verdict.unexplained_warnings
    return verdict

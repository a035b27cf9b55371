"""The real CT fixtures in ../shared/data, and small helpers to zip them in memory.

Tests never copy this data into the repository; they skip with a reason when it is absent.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("COVIDCT_SHARED_DATA", ROOT.parent / "shared" / "data"))
P002 = DATA / "covid-ct-md" / "P002"
NORMAL002 = DATA / "covid-ct-md" / "normal002"
P002_LABELS = DATA / "covid-ct-md" / "P002-slice-labels.csv"
VARIANTS = DATA / "dicom-variants"

needs_data = pytest.mark.skipif(
    not P002.is_dir(), reason=f"real CT fixtures not found at {DATA} (set COVIDCT_SHARED_DATA)"
)


def zip_files(files: Iterable[tuple[str, bytes | Path]], compress: bool = False) -> bytes:
    """Zip (archive name, bytes or path) pairs in memory."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, content in files:
            zf.writestr(name, content.read_bytes() if isinstance(content, Path) else content)
    return buf.getvalue()


def zip_dirs(*dirs: Path, pattern: str = "*.dcm") -> bytes:
    """Zip each folder's files under a folder of the same name."""
    return zip_files((f"{d.name}/{p.name}", p) for d in dirs for p in sorted(d.glob(pattern)))

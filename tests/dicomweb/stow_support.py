"""Helpers of the STOW-RS tests: instances, multipart bodies, P002 with valid UIDs, and the
real app with a stand-in model whose scores are known. Not a test module."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from dark_lung import DarkLungModel
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid

from dicom_factory import synthetic_ct
from models.export import untrained_card
from shared_data import P002, zip_files
from support import sharing_app

BOUNDARY = "covidct-test-boundary-0f3cf5c0"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
API_KEY, OTHER_KEY = "stow-key-1", "stow-key-2"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def uid(*parts: str) -> str:
    """A valid UID, the same for the same parts (pydicom's derived UIDs)."""
    return str(generate_uid(entropy_srcs=["covidct-tests", *parts]))


def ct_instance(
    study: str, number: int, *, dark: bool = True, modality: str = "CT", sop: str | None = None
) -> bytes:
    """A synthetic 512 × 512 CT slice of `study` (patient data planted, see dicom_factory):
    lung-dark in the paper's ROI or not, at z = -number mm."""
    values = np.full((512, 512), 1024 + 40, np.uint16)  # soft tissue
    if dark:
        values[240:340, 120:370] = 100  # air in the ROI: an open lung
    data = synthetic_ct(values, z=-float(number), instance=number, modality=modality)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = sop or uid(study, str(number))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def multipart(
    parts: Iterable[bytes], boundary: str = BOUNDARY, part_type: str | None = None
) -> bytes:
    """A multipart/related body of application/dicom parts."""
    header = f"Content-Type: {part_type or 'application/dicom'}\r\n\r\n".encode()
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + header + p + b"\r\n" for p in parts)
    return body + b"--" + boundary.encode() + b"--\r\n"


def stow(
    client: TestClient, parts: Iterable[bytes], study: str | None = None, key: str = API_KEY
) -> Any:
    return client.post(
        f"/studies/{study}" if study else "/studies",
        content=multipart(parts),
        headers={"Content-Type": STOW_TYPE, "X-API-Key": key},
    )


def failure_reasons(body: dict[str, Any]) -> list[int]:
    return [item["00081197"]["Value"][0] for item in body.get("00081198", {}).get("Value", [])]


def stored_uids(body: dict[str, Any]) -> list[str]:
    return [item["00081155"]["Value"][0] for item in body.get("00081199", {}).get("Value", [])]


def repaired_p002(folder: Path, names: Iterable[str] | None = None) -> list[Path]:
    """P002 slices with valid UIDs, written to `folder`. COVID-CT-MD's de-identification
    left SOP Instance UID empty and Study/Series UIDs as UUID text: no PACS takes such
    instances. Pixel data, geometry and every other tag are untouched."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = [P002 / n for n in names] if names is not None else sorted(P002.glob("*.dcm"))
    written = []
    for path in sources:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = uid("P002", "study")
        ds.SeriesInstanceUID = uid("P002", "series")
        ds.SOPInstanceUID = uid("P002", path.name)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / path.name)
        written.append(folder / path.name)
    return written


P002_STUDY = uid("P002", "study")


def zip_of(files: Iterable[Path]) -> bytes:
    return zip_files((f"P002/{p.name}", p) for p in files)


# --- the app with a stand-in model ---------------------------------------------------------


def fast_app(data_dir: Path, **overrides: object) -> FastAPI:
    """The real app (jobs in `data_dir`) with DarkLungModel in place of the SavedModel."""
    model = DarkLungModel(untrained_card(seed=0, head_init_std=0.02))
    values: dict[str, object] = {
        "decode_workers": 0,
        "jobs_data_dir": data_dir,
        "api_keys": [API_KEY, OTHER_KEY],
        "stow_quiet_s": 0.2,
        "jobs_poll_interval_s": 0.05,
    }
    values.update(overrides)
    return sharing_app(model, Path("unused-model-dir"), **values)


def wait_job(client: TestClient, job_id: str, key: str = API_KEY, wait_s: float = 60) -> Any:
    """The job once it has ended (the service's long poll; a bounded wait)."""
    r = client.get(f"/jobs/{job_id}", params={"wait": wait_s}, headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] in ("done", "failed"), body
    return body


def same_diagnosis(job: dict[str, Any], sync: dict[str, Any], atol: float = 0.0) -> None:
    """The job's document is the synchronous route's, but for the request id, the stage
    timings and the names of the files the slices came from; probabilities within `atol`."""
    for field in ("diagnosis", "k", "n", "required", "threshold", "deciding_series", "reason"):
        assert job[field] == sync[field], field
    assert job["warnings"] == sync["warnings"]
    assert job["model"] == sync["model"]
    assert len(job["series"]) == len(sync["series"])
    for a, b in zip(job["series"], sync["series"], strict=True):
        assert (a["key"], a["order"], a["verdict"], a["selection"]) == (
            b["key"],
            b["order"],
            b["verdict"],
            b["selection"],
        )
        strip = ("source", "covid_probability")
        assert [{k: v for k, v in s.items() if k not in strip} for s in a["slices"]] == [
            {k: v for k, v in s.items() if k not in strip} for s in b["slices"]
        ]
        pa = np.array(
            [
                np.nan if s["covid_probability"] is None else s["covid_probability"]
                for s in a["slices"]
            ]
        )
        pb = np.array(
            [
                np.nan if s["covid_probability"] is None else s["covid_probability"]
                for s in b["slices"]
            ]
        )
        np.testing.assert_allclose(pa, pb, rtol=0, atol=atol, equal_nan=True)

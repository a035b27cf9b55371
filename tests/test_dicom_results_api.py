"""GET /jobs/{id}/dicom: a done DICOM job's results as multipart/related or a zip; a TIFF
job's problem; a job not done; deleting the job deletes its results."""

from __future__ import annotations

import email.parser
import io
import zipfile
from collections.abc import Iterator
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dark_lung import DarkLungSeries, dark_lung_client
from fastapi.testclient import TestClient
from pydicom.sr.coding import Code

from app.explain_queue import ExplainConfig
from dicom_factory import PHI_NAME, tiff_bytes
from shared_data import zip_files

KEY = "dicom-results-key"
STUDY_UID = "1.2.826.0.1.3680043.8.498.91"
SERIES_UID = "1.2.826.0.1.3680043.8.498.92"
SOP_ROOT = "1.2.826.0.1.3680043.8.498.93"
COVID = Code("840539006", "SCT", "COVID-19")
DARK = {1, 2, 3}  # instance numbers whose ROI is lung-dark: the stand-in scores them 0.9


SERIES = DarkLungSeries(STUDY_UID, SERIES_UID, SOP_ROOT, frozenset(DARK))
sop_uid, ct_slice = SERIES.sop_uid, SERIES.ct_slice


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    data_dir = tmp_path_factory.mktemp("jobs")
    with dark_lung_client(
        jobs_data_dir=data_dir,
        api_keys=[KEY],
        jobs_poll_interval_s=0.05,
    ) as c:
        c.headers["X-API-Key"] = KEY
        c.data_dir = data_dir  # type: ignore[attr-defined]
        yield c


def submit(client: TestClient, files: list[tuple[str, bytes]], **form: Any) -> str:
    r = client.post(
        "/jobs",
        files={"file": ("study.zip", zip_files(files), "application/zip")},
        data={"patient_id": "p", **form},
    )
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


def ended(client: TestClient, job_id: str) -> dict[str, Any]:
    r = client.get(f"/jobs/{job_id}", params={"wait": 60})
    body: dict[str, Any] = r.json()
    assert body["state"] in ("done", "failed"), body
    return body


def multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    assert message.is_multipart()
    parts = []
    for part in message.get_payload():  # type: ignore[union-attr]
        assert part.get_content_type() == "application/dicom"
        parts.append(part.get_payload(decode=True))
    return parts


@pytest.fixture(scope="module")
def dicom_job(client: TestClient) -> str:
    job_id = submit(client, [(f"s/{i}.dcm", ct_slice(i)) for i in range(1, 7)], explain="true")
    body = ended(client, job_id)
    assert body["state"] == "done", body
    return job_id


def test_multipart_answer_holds_sr_and_key_images(client: TestClient, dicom_job: str) -> None:
    body = ended(client, dicom_job)
    dicom = body["dicom"]
    assert dicom["source"] == "dicom" and dicom["objects"] == 2 and dicom["key_images"]
    assert dicom["derived_uids"] == []
    # the stand-in model has no explain signature: the job says why there are no overlays
    assert dicom["overlays"] == 0 and "explain" in dicom["overlays_note"]
    r = client.get(f"/jobs/{dicom_job}/dicom")
    assert r.status_code == 200, r.text
    content_type = r.headers["content-type"]
    assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    sr_bytes, ko_bytes = multipart_parts(content_type, r.content)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(sr_bytes)))
    assert sr.StudyInstanceUID == STUDY_UID and str(sr.PatientName) == PHI_NAME
    groups = sr.content.get_image_measurement_groups(finding_type=COVID)
    [patient] = [g for g in groups if not g.source_images]
    assert patient.get_qualitative_evaluations(name=COVID)[0].value == Code(
        "52101004", "SCT", "Present"
    )
    k = body["diagnosis"]["k"]
    numbers = {m.name.value: float(m.value) for m in patient.get_measurements()}
    assert numbers["K"] == k == len(DARK)
    ko = pydicom.dcmread(io.BytesIO(ko_bytes))
    referenced = {
        item.ReferencedSOPInstanceUID
        for study in ko.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {sop_uid(i) for i in DARK}


def test_zip_answer_holds_the_same_objects(client: TestClient, dicom_job: str) -> None:
    multipart = client.get(f"/jobs/{dicom_job}/dicom")
    parts = multipart_parts(multipart.headers["content-type"], multipart.content)
    r = client.get(f"/jobs/{dicom_job}/dicom", headers={"Accept": "application/zip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert archive.namelist() == ["000.dcm", "001.dcm"]
        assert [archive.read(n) for n in archive.namelist()] == parts


def test_tiff_job_has_no_dicom_source(client: TestClient) -> None:
    page = tiff_bytes(np.full((512, 512), 1064, np.uint16))
    job_id = submit(client, [(f"t/{i}.tif", page) for i in range(3)])
    assert ended(client, job_id)["dicom"]["source"] == "none"
    r = client.get(f"/jobs/{job_id}/dicom")
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["type"].endswith("/no-dicom-source")


def test_unknown_job_is_not_found(client: TestClient) -> None:
    r = client.get("/jobs/" + "A" * 32 + "/dicom")
    assert r.status_code == 404 and r.json()["type"].endswith("/not-found")


def test_deleting_the_job_deletes_its_results(client: TestClient) -> None:
    job_id = submit(client, [(f"s/{i}.dcm", ct_slice(i)) for i in range(1, 4)])
    assert ended(client, job_id)["state"] == "done"
    folder = client.data_dir / "dicom-results" / job_id  # type: ignore[attr-defined]
    assert len(list(folder.glob("*.dcm"))) == 2
    assert client.delete(f"/jobs/{job_id}").status_code == 204
    assert not folder.exists()
    assert client.get(f"/jobs/{job_id}/dicom").status_code == 404


def test_failed_job_is_not_done(client: TestClient) -> None:
    job_id = submit(client, [("notes.txt", b"no image here")])
    assert ended(client, job_id)["state"] == "failed"
    r = client.get(f"/jobs/{job_id}/dicom")
    assert r.status_code == 409 and r.json()["type"].endswith("/job-not-done")


class BlobExplainer:
    """Stands in for the model's explain queue: a Gaussian blob at the centre of each map."""

    config = ExplainConfig(max_slices=2)

    async def explain(self, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, cols = np.mgrid[0:512, 0:512]
        blob = np.exp(-((rows - 256.0) ** 2 + (cols - 256.0) ** 2) / (2 * 40.0**2))
        heatmap = np.repeat(blob[None].astype(np.float32), len(stack), axis=0)
        return heatmap, np.zeros(len(stack), bool)


def test_explained_job_gets_overlays(client: TestClient) -> None:
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    runtime.explainer = BlobExplainer()
    try:
        job_id = submit(client, [(f"s/{i}.dcm", ct_slice(i)) for i in range(1, 7)], explain="true")
        body = ended(client, job_id)
    finally:
        runtime.explainer = None
    dicom = body["dicom"]
    # 3 slices judged COVID, at most 2 explained (the highest scores, then series order)
    assert dicom["overlays"] == 2 and dicom["overlays_note"] is None and dicom["objects"] == 4
    r = client.get(f"/jobs/{job_id}/dicom")
    objects = [
        pydicom.dcmread(io.BytesIO(p))
        for p in multipart_parts(r.headers["content-type"], r.content)
    ]
    assert [o.Modality for o in objects] == ["SR", "KO", "OT", "OT"]
    explained = [
        s["instance_number"] for s in body["diagnosis"]["series"][0]["slices"] if s["overlay_png"]
    ]
    assert len(explained) == 2
    referenced = [o.SourceImageSequence[0].ReferencedSOPInstanceUID for o in objects[2:]]
    assert sorted(referenced) == sorted(sop_uid(i) for i in explained)
    for sc in objects[2:]:
        assert "NOT FOR DIAGNOSTIC USE" in sc.SeriesDescription
        assert sc.StudyInstanceUID == STUDY_UID

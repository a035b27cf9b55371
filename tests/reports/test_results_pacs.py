"""A DICOM job's results through a real PACS: the service pushes them to Orthanc (with its
DICOMweb plugin) over STOW-RS when the job ends; read back over WADO-RS with
dicomweb-client, the SR's content tree parsed with highdicom holds the same finding,
numbers and references. The objects the route answers pass dciodvfy."""

from __future__ import annotations

import email.parser
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from dark_lung import DarkLungSeries, dark_lung_client
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from app.reports import part10_bytes
from app.reports.push import PushConfig, push_results
from dicom3tools import assert_valid
from orthanc_server import Orthanc, free_port, orthanc_install, start_orthanc  # noqa: F401 (a fixture)
from shared_data import P002, needs_data, zip_files

STUDY_UID = "1.2.826.0.1.3680043.8.498.101"
SERIES_UID = "1.2.826.0.1.3680043.8.498.102"
SOP_ROOT = "1.2.826.0.1.3680043.8.498.103"
COVID = Code("840539006", "SCT", "COVID-19")
PRESENT = Code("52101004", "SCT", "Present")
DARK = {2, 3, 5}  # instance numbers the stand-in model scores 0.9 (the others 0.1)
SLICES = range(1, 9)
KINDS = {"SR": "Comprehensive3DSR", "KO": "KeyObjectSelectionDocument"}  # dciodvfy's names


SERIES = DarkLungSeries(STUDY_UID, SERIES_UID, SOP_ROOT, frozenset(DARK))
sop_uid, ct_slice = SERIES.sop_uid, SERIES.ct_slice


@pytest.fixture(scope="module")
def pacs(
    orthanc_install: Any,  # noqa: F811 (the fixture)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Orthanc]:
    with start_orthanc(orthanc_install, tmp_path_factory.mktemp("orthanc"), {}) as server:
        yield server


@pytest.fixture(scope="module")
def client(pacs: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with dark_lung_client(
        jobs_data_dir=tmp_path_factory.mktemp("jobs"),
        jobs_poll_interval_s=0.05,
        results_stow_url=f"{pacs.url}/dicom-web",
        results_stow_backoff_s=0.1,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def job(client: TestClient) -> dict[str, Any]:
    return run_job(client, [(f"s/{i}.dcm", ct_slice(i)) for i in SLICES])


def route_objects(client: TestClient, job_id: str) -> list[pydicom.Dataset]:
    r = client.get(f"/jobs/{job_id}/dicom")
    assert r.status_code == 200, r.text
    head = b"Content-Type: " + r.headers["content-type"].encode() + b"\r\n\r\n"
    message = email.parser.BytesParser().parsebytes(head + r.content)
    return [
        pydicom.dcmread(io.BytesIO(part.get_payload(decode=True)))
        for part in message.get_payload()  # type: ignore[union-attr]
    ]


def test_job_status_shows_the_push(job: dict[str, Any]) -> None:
    assert job["dicom"]["push"] == {"outcome": "stored", "attempts": 1, "detail": ""}


def test_pacs_round_trip_keeps_finding_numbers_and_references(
    pacs: Orthanc, job: dict[str, Any]
) -> None:
    web = DICOMwebClient(url=f"{pacs.url}/dicom-web")
    found = web.search_for_instances(study_instance_uid=STUDY_UID)
    by_modality: dict[str, list[str]] = {}
    for item in found:
        ds = pydicom.Dataset.from_json(item)
        by_modality.setdefault(str(ds.get("Modality", "")), []).append(ds.SOPInstanceUID)
    assert sorted(by_modality) == ["KO", "SR"]  # only the results were pushed
    [sr_uid] = by_modality["SR"]
    [sr_series] = {
        pydicom.Dataset.from_json(i).SeriesInstanceUID
        for i in found
        if pydicom.Dataset.from_json(i).SOPInstanceUID == sr_uid
    }
    stored = web.retrieve_instance(STUDY_UID, sr_series, sr_uid)
    sr = hd.sr.Comprehensive3DSR.from_dataset(stored)
    groups = sr.content.get_image_measurement_groups(finding_type=COVID)
    [patient] = [g for g in groups if not g.source_images]
    assert patient.get_qualitative_evaluations(name=COVID)[0].value == PRESENT
    numbers = {m.name.value: float(m.value) for m in patient.get_measurements()}
    diagnosis = job["diagnosis"]
    assert numbers == {
        "K": float(len(DARK)),
        "N": float(diagnosis["n"]),
        "REQUIRED": float(diagnosis["required"]),
        "T": pytest.approx(0.1),
    }
    assert numbers["K"] == diagnosis["k"]
    # each slice the diagnosis scored has its group, referencing it; the others have none
    [series] = diagnosis["series"]
    scored = 0
    for item in series["slices"]:
        groups = sr.content.get_image_measurement_groups(
            referenced_sop_instance_uid=sop_uid(item["instance_number"])
        )
        if item["covid_probability"] is None:
            assert groups == []
            continue
        scored += 1
        expected = 0.9 if item["instance_number"] in DARK else 0.1
        assert item["covid_probability"] == pytest.approx(expected, abs=1e-6)
        [group] = groups
        assert float(group.get_measurements()[0].value) == pytest.approx(expected, abs=1e-6)
    assert scored == diagnosis["n"] >= len(DARK)


def test_route_objects_pass_dciodvfy(client: TestClient, job: dict[str, Any]) -> None:
    objects = route_objects(client, job["id"])
    assert [o.Modality for o in objects] == ["SR", "KO"]
    for obj in objects:
        assert_valid(obj, KINDS[obj.Modality])


def test_push_refused_is_not_retried(
    pacs: Orthanc, client: TestClient, job: dict[str, Any]
) -> None:
    parts = [part10_bytes(o) for o in route_objects(client, job["id"])]
    waits: list[float] = []
    config = PushConfig(url=f"{pacs.url}/no-such-root", attempts=3, backoff_s=1.0)
    outcome = push_results(parts, config, sleep=waits.append)
    assert (outcome.outcome, outcome.attempts, outcome.detail) == ("failed", 1, "HTTP 404")
    assert waits == []


def test_push_unreachable_is_retried_with_backoff(client: TestClient, job: dict[str, Any]) -> None:
    parts = [part10_bytes(o) for o in route_objects(client, job["id"])]
    waits: list[float] = []
    config = PushConfig(url=f"http://127.0.0.1:{free_port()}/dicom-web", attempts=3, backoff_s=1.0)
    outcome = push_results(parts, config, sleep=waits.append)
    assert (outcome.outcome, outcome.attempts, outcome.detail) == ("failed", 3, "ConnectionError")
    assert waits == [1.0, 2.0]


# --- P002 (real CT, COVID-CT-MD) -----------------------------------------------------------


def p002_files(folder: Path, *, repaired: bool) -> list[tuple[str, bytes | Path]]:
    """P002's slices; `repaired`: with valid UIDs (COVID-CT-MD left SOP Instance UIDs empty
    and Study/Series UIDs as UUID text, which no PACS takes). Nothing else changes."""
    if not repaired:
        return [(f"P002/{p.name}", p) for p in sorted(P002.glob("*.dcm"))]
    folder.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, bytes | Path]] = []
    for path in sorted(P002.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = P002_STUDY, P002_SERIES
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = p002_sop(path.name)
        ds.save_as(folder / path.name)
        files.append((f"P002/{path.name}", folder / path.name))
    return files


def p002_sop(name: str) -> str:
    return str(generate_uid(entropy_srcs=["covidct-results-pacs", "P002", name]))


P002_STUDY = str(generate_uid(entropy_srcs=["covidct-results-pacs", "P002", "study"]))
P002_SERIES = str(generate_uid(entropy_srcs=["covidct-results-pacs", "P002", "series"]))


def run_job(client: TestClient, files: list[tuple[str, bytes | Path]]) -> dict[str, Any]:
    r = client.post(
        "/jobs",
        files={"file": ("study.zip", zip_files(files), "application/zip")},
        data={"patient_id": "p"},
    )
    assert r.status_code == 202, r.text
    body: dict[str, Any] = client.get(f"/jobs/{r.json()['id']}", params={"wait": 60}).json()
    assert body["state"] == "done", body
    return body


@needs_data
def test_p002_round_trip(pacs: Orthanc, client: TestClient, tmp_path: Path) -> None:
    job = run_job(client, p002_files(tmp_path, repaired=True))
    assert job["dicom"]["derived_uids"] == []
    assert job["dicom"]["push"]["outcome"] == "stored", job["dicom"]
    web = DICOMwebClient(url=f"{pacs.url}/dicom-web")
    found = [pydicom.Dataset.from_json(i) for i in web.search_for_instances(P002_STUDY)]
    [sr_item] = [d for d in found if d.Modality == "SR"]
    stored = web.retrieve_instance(P002_STUDY, sr_item.SeriesInstanceUID, sr_item.SOPInstanceUID)
    sr = hd.sr.Comprehensive3DSR.from_dataset(stored)
    groups = sr.content.get_image_measurement_groups(finding_type=COVID)
    [patient] = [g for g in groups if not g.source_images]
    diagnosis = job["diagnosis"]
    numbers = {m.name.value: float(m.value) for m in patient.get_measurements()}
    assert (numbers["K"], numbers["N"], numbers["REQUIRED"]) == (
        diagnosis["k"],
        diagnosis["n"],
        diagnosis["required"],
    )
    # One search of the tree (highdicom parses it again per search: ~1 s each for P002).
    by_slice = {}
    for group in groups:
        if group.source_images:
            [image] = group.source_images
            by_slice[image.referenced_sop_instance_uid] = group
    [series] = diagnosis["series"]
    scored = [i for i in series["slices"] if i["covid_probability"] is not None]
    assert len(by_slice) == len(scored) > 0
    for item in scored:
        group = by_slice[p002_sop(item["source"].removeprefix("P002/"))]
        value = float(group.get_measurements()[0].value)
        assert value == pytest.approx(item["covid_probability"], abs=1e-6)
    for obj in route_objects(client, job["id"]):
        assert_valid(obj, KINDS[obj.Modality])


@needs_data
def test_p002_as_published_gets_stand_ins_and_no_push(client: TestClient) -> None:
    job = run_job(client, p002_files(Path("unused"), repaired=False))
    dicom = job["dicom"]
    assert dicom["source"] == "dicom" and dicom["structured_report"]
    assert dicom["derived_uids"] == ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"]
    assert dicom["push"]["outcome"] == "skipped"

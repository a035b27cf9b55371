"""Real peers over the network: the service runs as a uvicorn process with the seeded
SavedModel, and a standard DICOMweb client and a real PACS store P002 into it.

(a) dicomweb-client (the standard Python DICOMweb client) stores P002 over STOW-RS;
(b) Orthanc, holding P002, pushes the study with its own DICOMweb client (its
    `DicomWeb.Servers` setting pointing at the service);
each time the study becomes one job, and the job's diagnosis is the synchronous route's
on the same files. P002 is stored with valid UIDs (stow_support.repaired_p002): the
published files carry none a PACS accepts. To keep the suite's time, the study is a run of
24 contiguous P002 slices through the open lungs (the transport does not depend on the
count; the whole series through the network is tests/test_api.py's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests

from live_service import Service, run_service
from orthanc_server import IN_CI, OrthancInstall, start_orthanc
from shared_data import needs_data
from stow_support import P002_STUDY, repaired_p002, same_diagnosis, uid, zip_of
from support import BATCH_ATOL

pytestmark = [needs_data, pytest.mark.slow]

CLIENT_KEY, PACS_KEY = "dicomweb-client-key", "orthanc-pacs-key"
QUIET_S = 5  # Orthanc sends a study in one or a few back-to-back requests
JOB_DEADLINE_S = 900.0  # the slices through the full network on a busy 2-core CPU
# 24 contiguous slices through the open lungs (P002's IM0051 … IM0074).
SLICES = tuple(f"IM{i:04d}.dcm" for i in range(51, 75))


@pytest.fixture(scope="module")
def p002(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return repaired_p002(tmp_path_factory.mktemp("p002"), SLICES)


@pytest.fixture(scope="module")
def service(test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("service")
    with run_service(
        test_model_dir,
        workdir,
        CLIENT_KEY,
        api_keys=[CLIENT_KEY, PACS_KEY],
        stow_quiet_s=str(QUIET_S),
        jobs_poll_interval_s="0.2",
    ) as running:
        yield running


@pytest.fixture(scope="module")
def sync_answer(service: Service, p002: list[Path]) -> dict[str, Any]:
    """POST /patients/diagnose on the same files, zipped."""
    with service.client(timeout_s=JOB_DEADLINE_S) as c:
        r = c.post(
            "/patients/diagnose",
            files={"file": ("p002.zip", zip_of(p002))},
            data={"patient_id": "P002"},
        )
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    assert answer["n"] >= len(SLICES) // 2, "too few slices scored to compare anything"
    return answer


def finished(service: Service, job_id: str, key: str) -> dict[str, Any]:
    """The job once ended: GET /jobs/{id}?wait= repeated until a deadline."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    with service.client() as c:
        while True:
            r = c.get(f"/jobs/{job_id}", params={"wait": 60}, headers={"X-API-Key": key})
            assert r.status_code == 200, r.text
            job: dict[str, Any] = r.json()
            if job["state"] in ("done", "failed"):
                return job
            assert time.monotonic() < deadline, f"job still {job['state']}: {service.tail()}"


def test_dicomweb_client_stores_p002_and_the_job_diagnoses_it(
    service: Service, p002: list[Path], sync_answer: dict[str, Any]
) -> None:
    try:
        from dicomweb_client import DICOMwebClient
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("dicomweb-client not installed (the test extras: pip install -e '.[test]')")
    responses: list[requests.Response] = []

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        responses.append(response)

    client = DICOMwebClient(
        url=service.url, headers={"X-API-Key": CLIENT_KEY}, callback=keep, timeout=300
    )
    result = client.store_instances([pydicom.dcmread(p) for p in p002])
    assert [item.ReferencedSOPInstanceUID for item in result.ReferencedSOPSequence] == [
        uid("P002", p.name) for p in p002
    ]
    assert "FailedSOPSequence" not in result
    job_id = responses[-1].headers["X-Covidct-Job"]
    assert responses[-1].headers["Content-Location"] == f"/jobs/{job_id}"

    job = finished(service, job_id, CLIENT_KEY)
    assert (job["state"], job["source"], job["attempts"]) == ("done", "stow", 1), job
    same_diagnosis(job["diagnosis"], sync_answer, atol=BATCH_ATOL)
    assert len(job["diagnosis"]["series"][0]["slices"]) == len(SLICES)


def test_orthanc_pushes_p002_and_it_becomes_one_job(
    service: Service,
    p002: list[Path],
    sync_answer: dict[str, Any],
    orthanc_install: OrthancInstall,
    tmp_path: Path,
) -> None:
    servers = {"covidct": {"Url": service.url + "/", "HttpHeaders": {"X-API-Key": PACS_KEY}}}
    with start_orthanc(orthanc_install, tmp_path, servers) as pacs:
        study = pacs.upload(p002)
        pushed = pacs.stow("covidct", [study])
    assert int(pushed["InstancesCount"]) == len(SLICES)

    with service.client() as c:
        listed = c.get(
            "/jobs", params={"study_instance_uid": P002_STUDY}, headers={"X-API-Key": PACS_KEY}
        )
    [pending] = listed.json()["jobs"]  # one job for the study, however it was sent
    job = finished(service, pending["id"], PACS_KEY)
    assert (job["state"], job["source"]) == ("done", "stow"), job
    same_diagnosis(job["diagnosis"], sync_answer, atol=BATCH_ATOL)

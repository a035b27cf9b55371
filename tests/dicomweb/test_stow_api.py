"""POST /studies and POST /studies/{StudyInstanceUID} (STOW-RS, DICOM PS3.18 10.5) on the
real app with a stand-in model: the answer, the job a study becomes, its diagnosis (the
synchronous route's), the quiet period across requests and across a restart, the limits,
and no patient data in the logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.dicomweb import FailureReason
from dicom_factory import PHI_STRINGS
from shared_data import needs_data
from stow_support import (
    API_KEY,
    OTHER_KEY,
    P002_STUDY,
    STOW_TYPE,
    ct_instance,
    failure_reasons,
    fast_app,
    multipart,
    repaired_p002,
    same_diagnosis,
    stored_uids,
    stow,
    uid,
    wait_job,
    zip_of,
)
from support import started

KEY = {"X-API-Key": API_KEY}
OPEN_LUNG = [f"IM{n:04d}.dcm" for n in range(56, 68, 2)]  # six P002 slices through open lung


class Clock:
    """The pending studies' clock, held still by the test: a study is quiet when the test
    says so, however long the requests took."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(stow_client: TestClient) -> Iterator[Clock]:
    studies = stow_client.app.state.jobs.studies  # type: ignore[attr-defined]
    saved, studies.clock = studies.clock, Clock()
    try:
        yield studies.clock
    finally:
        studies.clock = saved


def quiet(clock: Clock) -> None:
    clock.now += 3600  # far past the quiet period: the flusher queues the study


def job_of(r: Any) -> str:
    job_id = str(r.headers["X-Covidct-Job"])
    assert r.headers["Content-Location"] == f"/jobs/{job_id}"
    return job_id


@needs_data
def test_a_study_sent_in_two_requests_is_one_job_with_the_sync_route_s_diagnosis(
    stow_client: TestClient, clock: Clock, tmp_path: Path
) -> None:
    files = repaired_p002(tmp_path / "p002", OPEN_LUNG)
    first = stow(stow_client, [p.read_bytes() for p in files[:3]])
    second = stow(stow_client, [p.read_bytes() for p in files[3:]], study=P002_STUDY)
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    assert first.headers["content-type"] == "application/dicom+json"
    job = job_of(first)
    assert job_of(second) == job
    assert stored_uids(first.json()) + stored_uids(second.json()) == [
        uid("P002", name) for name in OPEN_LUNG
    ]
    receiving = stow_client.get(f"/jobs/{job}", headers=KEY).json()
    assert (receiving["state"], receiving["receiving"], receiving["instances"]) == (
        "queued",
        True,
        6,
    )
    assert receiving["source"] == "stow"

    quiet(clock)
    done = wait_job(stow_client, job)
    assert (done["state"], done["source"], done["receiving"]) == ("done", "stow", False)
    sync = stow_client.post(
        "/patients/diagnose",
        files={"file": ("p002.zip", zip_of(files))},
        data={"patient_id": "P002"},
        headers=KEY,
    )
    assert sync.status_code == 200, sync.text
    same_diagnosis(done["diagnosis"], sync.json())  # the stand-in model scores exactly
    assert done["diagnosis"]["patient_id"] == "P002"  # PatientID of the instances
    # Each slice names the instance it came from: the job's zip has one member per SOP
    # Instance UID.
    sources = {s["source"] for s in done["diagnosis"]["series"][0]["slices"]}
    assert sources == {f"{uid('P002', n)}.dcm" for n in OPEN_LUNG}
    listed = stow_client.get("/jobs", params={"study_instance_uid": P002_STUDY}, headers=KEY)
    assert listed.json()["jobs"][0]["id"] == job


def test_instances_of_another_study_fail_with_409(stow_client: TestClient, clock: Clock) -> None:
    target, other = uid("api", "target"), uid("api", "other")
    r = stow(stow_client, [ct_instance(other, 1), ct_instance(other, 2)], study=target)
    assert r.status_code == 409
    assert r.headers["content-type"] == "application/dicom+json"
    assert failure_reasons(r.json()) == [FailureReason.STUDY_UID_MISMATCH] * 2
    assert "00081199" not in r.json() and "X-Covidct-Job" not in r.headers


def test_some_stored_some_failed_is_202(stow_client: TestClient, clock: Clock) -> None:
    study = uid("api", "mixed")
    r = stow(stow_client, [ct_instance(study, 1), ct_instance(study, 2, modality="MR"), b"junk"])
    assert r.status_code == 202
    body = r.json()
    assert stored_uids(body) == [uid(study, "1")]
    assert failure_reasons(body) == [
        FailureReason.SOP_CLASS_NOT_SUPPORTED,
        FailureReason.CANNOT_UNDERSTAND,
    ]
    failed = body["00081198"]["Value"]
    assert failed[0]["00081155"]["Value"] == [uid(study, "2")]
    job_of(r)
    assert stow_client.delete(f"/jobs/{job_of(r)}", headers=KEY).status_code == 204


@needs_data
def test_p002_as_published_fails_whole(stow_client: TestClient, clock: Clock) -> None:
    from shared_data import P002

    r = stow(stow_client, [(P002 / name).read_bytes() for name in OPEN_LUNG[:2]])
    assert r.status_code == 409  # no SOP Instance UID: nothing to reference
    assert failure_reasons(r.json()) == [FailureReason.CANNOT_UNDERSTAND] * 2


@pytest.mark.parametrize(
    ("content_type", "body", "status", "type_"),
    [
        ("multipart/form-data; boundary=x", b"", 415, "unsupported-media-type"),
        (
            'multipart/related; type="application/dicom+xml"; boundary=x',
            b"",
            415,
            "unsupported-media-type",
        ),
        (STOW_TYPE, b"garbage", 400, "malformed-request"),
        (STOW_TYPE, multipart([]), 400, "malformed-request"),
    ],
)
def test_bodies_stow_does_not_take(
    stow_client: TestClient, content_type: str, body: bytes, status: int, type_: str
) -> None:
    r = stow_client.post("/studies", content=body, headers={"Content-Type": content_type, **KEY})
    assert r.status_code == status
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"].endswith("/" + type_)


def test_a_malformed_study_uid_in_the_path_is_400(stow_client: TestClient) -> None:
    r = stow(stow_client, [ct_instance(uid("api", "x"), 1)], study="not-a-uid")
    assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (400, "malformed-request")


def test_the_upload_guard_answers_before_the_body(stow_client: TestClient) -> None:
    body = multipart([ct_instance(uid("api", "guard"), 1)])
    r = stow_client.post("/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (401, "unauthorized")
    limit = 1024 * 1024 * 1024  # COVIDCT_MAX_UPLOAD_BYTES' default
    big = {"Content-Type": STOW_TYPE, "Content-Length": str(limit + 1), **KEY}
    r = stow_client.post("/studies/1.2.3", content=b"", headers=big)
    assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (413, "too-large")


def test_a_receiving_study_belongs_to_its_key_and_can_be_cancelled(
    stow_client: TestClient, clock: Clock
) -> None:
    study = uid("api", "cancel")
    job = job_of(stow(stow_client, [ct_instance(study, 1)]))
    other = {"X-API-Key": OTHER_KEY}
    assert stow_client.get(f"/jobs/{job}", headers=other).status_code == 404
    assert stow_client.delete(f"/jobs/{job}", headers=other).status_code == 404
    assert stow_client.get("/jobs", params={"study_instance_uid": study}, headers=other).json() == {
        "jobs": []
    }
    assert stow_client.delete(f"/jobs/{job}", headers=KEY).status_code == 204
    assert stow_client.get(f"/jobs/{job}", headers=KEY).status_code == 404
    # The same study sent again is a new job.
    assert job_of(stow(stow_client, [ct_instance(study, 1)])) != job
    quiet(clock)


def test_a_pending_study_is_queued_after_a_restart(tmp_path: Path) -> None:
    study = uid("api", "restart")
    with started(fast_app(tmp_path, stow_quiet_s=3600)) as client:
        job = job_of(stow(client, [ct_instance(study, n) for n in (1, 2, 3)]))
    # The service stopped before the study was quiet; the next start finds it on disk
    # (here with a shorter quiet period, which has passed already) and queues it.
    with started(fast_app(tmp_path, stow_quiet_s=0)) as client:
        done = wait_job(client, job)
        assert done["state"] == "done" and done["source"] == "stow"
        assert len(done["diagnosis"]["series"][0]["slices"]) == 3
        listed = client.get("/jobs", params={"study_instance_uid": study}, headers=KEY).json()
        assert [j["id"] for j in listed["jobs"]] == [job]


def test_pending_studies_count_against_the_job_queue(tmp_path: Path) -> None:
    with started(
        fast_app(tmp_path, stow_quiet_s=3600, jobs_max_queued=1, jobs_retry_after_s=17)
    ) as client:
        assert stow(client, [ct_instance(uid("api", "q1"), 1)]).status_code == 200
        r = stow(client, [ct_instance(uid("api", "q2"), 1)])
        assert (r.status_code, r.headers["Retry-After"]) == (503, "17")
        assert r.json()["type"].endswith("/queue-full")


def test_no_patient_data_reaches_the_logs(
    stow_client: TestClient, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    study = uid("api", "phi")
    parts = [ct_instance(study, 1), ct_instance(study, 2, modality="MR"), ct_instance(uid("x"), 3)]
    app_logger = logging.getLogger("app")
    app_logger.addHandler(caplog.handler)  # "app" does not propagate in production logging
    caplog.set_level(logging.DEBUG)
    try:
        r = stow(stow_client, parts, study=study)
        assert r.status_code == 202
        quiet(clock)
        assert wait_job(stow_client, job_of(r))["state"] == "done"
    finally:
        app_logger.removeHandler(caplog.handler)
    # The service's records (the test's own HTTP client logs the URLs it calls).
    text = "\n".join(r.getMessage() + repr(vars(r)) for r in caplog.records if r.name != "httpx")
    assert "stow: request stored" in text
    for planted in (*PHI_STRINGS, study, uid(study, "1"), uid(study, "2")):
        assert planted not in text, planted

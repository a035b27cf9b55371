"""POST /jobs, GET and DELETE /jobs/{id} on the real app (app/jobs_api.py, app/job_runner.py)
with a stand-in model: the job's document is the synchronous route's, ownership by API
key, validation before acceptance, cancel and delete, callbacks, the bounds, shared
back-pressure with the synchronous route, a drain, metrics; with SQLite and with Redis."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis

from app.jobs import RunDeferred
from jobs_app import (
    DEADLINE_S,
    KEY,
    OTHER_KEY,
    jobs_app,
    running,
    study_zip,
    submit,
    until,
    wait_job,
)

SECRET = "callback-secret-for-tests"


def app_dir(tmp_path: Path) -> Path:
    return tmp_path / "jobs"


@pytest.fixture(params=["sqlite", "redis"])
def store_settings(request: pytest.FixtureRequest) -> Iterator[dict[str, object]]:
    """The job store of the app under test: the embedded SQLite, or a real redis-server
    (database 3, emptied before and after: the store's own tests use database 0)."""
    if request.param == "sqlite":
        yield {}
        return
    url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/3"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield {"jobs_store_url": url}
    client.flushdb()
    client.close()


def test_a_job_answers_the_sync_route_s_document(
    tmp_path: Path, store_settings: dict[str, object]
) -> None:
    app, _ = jobs_app(app_dir(tmp_path), **store_settings)
    archive = study_zip(3)
    with running(app) as client:
        r = submit(client, archive, threshold="0.3")
        assert r.status_code == 202, r.text
        job = r.json()
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", job["id"])  # 192 random bits
        assert r.headers["Location"] == f"/jobs/{job['id']}"
        assert (job["state"], job["source"], job["attempts"]) in {("queued", "upload", 0)}
        done = wait_job(client, job["id"])
        sync = client.post(
            "/patients/diagnose",
            files={"file": ("s.zip", archive)},
            data={"patient_id": "patient-7", "threshold": "0.3"},
            headers=KEY,
        ).json()
    assert (done["state"], done["attempts"], done["problem"]) == ("done", 1, None)
    assert done["expires_at"] is not None
    diagnosis = done["diagnosis"]
    assert diagnosis["request_id"] != sync["request_id"]  # the POST /jobs request's id
    strip = ("request_id", "timings_ms")
    assert {k: v for k, v in diagnosis.items() if k not in strip} == {
        k: v for k, v in sync.items() if k not in strip
    }
    assert (diagnosis["diagnosis"], diagnosis["k"], diagnosis["n"]) == ("covid", 3, 3)


def test_a_job_belongs_to_its_key(tmp_path: Path) -> None:
    app, _ = jobs_app(app_dir(tmp_path))
    with running(app) as client:
        job_id = submit(client, study_zip(1)).json()["id"]
        other = {"X-API-Key": OTHER_KEY}
        assert client.get(f"/jobs/{job_id}", headers=other).status_code == 404
        assert client.delete(f"/jobs/{job_id}", headers=other).status_code == 404
        assert client.get(f"/jobs/{job_id}").status_code == 401
        r = client.post("/jobs", files={"file": ("s.zip", b"x")}, data={"patient_id": "p"})
        assert r.status_code == 401  # the upload guard, before the body
        assert wait_job(client, job_id)["state"] == "done"
        assert client.get(f"/jobs/{'A' * 32}", headers=KEY).status_code == 404


@pytest.mark.parametrize(
    ("form", "field"),
    [
        ({"threshold": "1.5"}, "threshold"),
        ({"threshold": "-0.1"}, "threshold"),
        ({"patient_id": "p" * 129}, "patient_id"),
        ({"patient_id": ""}, "patient_id"),
        ({"callback_url": "x" * 2049}, "callback_url"),
    ],
)
def test_an_invalid_form_is_refused_before_it_is_accepted(
    tmp_path: Path, form: dict[str, str], field: str
) -> None:
    app, _ = jobs_app(app_dir(tmp_path))
    with running(app) as client:
        r = submit(client, study_zip(1), **form)
        assert r.status_code == 422
        assert r.json()["type"].endswith("/invalid-request") and field in r.json()["detail"]
        store = app.state.jobs.service.store
        assert store.usage().pending == 0
        assert list((app_dir(tmp_path) / "uploads").iterdir()) == []


def test_delete_cancels_a_queued_job_spares_a_running_one_and_forgets_an_ended_one(
    tmp_path: Path,
) -> None:
    loading = threading.Event()
    app, model = jobs_app(app_dir(tmp_path), loading=loading)
    with running(app, ready=False) as client:
        # While the model loads, jobs are accepted and wait.
        queued = submit(client, study_zip(1)).json()["id"]
        held = submit(client, study_zip(1)).json()["id"]
        assert client.get(f"/jobs/{queued}", headers=KEY).json()["state"] == "queued"
        assert client.delete(f"/jobs/{queued}", headers=KEY).status_code == 204
        assert client.get(f"/jobs/{queued}", headers=KEY).status_code == 404
        assert len(list((app_dir(tmp_path) / "uploads").iterdir())) == 1  # its upload gone
        model.gate.clear()
        loading.set()
        assert model.entered.wait(DEADLINE_S)
        assert client.get(f"/jobs/{held}", headers=KEY).json()["state"] == "running"
        r = client.delete(f"/jobs/{held}", headers=KEY)
        assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (409, "job-running")
        model.gate.set()
        assert wait_job(client, held)["state"] == "done"
        assert client.delete(f"/jobs/{held}", headers=KEY).status_code == 204
        assert client.get(f"/jobs/{held}", headers=KEY).status_code == 404
        assert client.delete(f"/jobs/{held}", headers=KEY).status_code == 404


@pytest.mark.parametrize("archive", [b"not a zip", study_zip(0)])
def test_a_failed_job_carries_the_sync_route_s_problem(tmp_path: Path, archive: bytes) -> None:
    app, _ = jobs_app(app_dir(tmp_path))
    with running(app) as client:
        failed = wait_job(client, submit(client, archive).json()["id"])
        sync = client.post(
            "/patients/diagnose",
            files={"file": ("s.zip", archive)},
            data={"patient_id": "p"},
            headers=KEY,
        ).json()
    assert (failed["state"], failed["diagnosis"], failed["attempts"]) == ("failed", None, 1)
    problem = failed["problem"]
    assert {k: problem[k] for k in ("type", "title", "status", "detail")} == {
        k: sync[k] for k in ("type", "title", "status", "detail")
    }


class Receiver:
    """A loopback HTTP server that records one callback and says when it came."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers.items()), body))
                self.send_response(204)
                self.end_headers()
                outer.arrived.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def test_callbacks_need_an_allowlist(tmp_path: Path, receiver: Receiver) -> None:
    app, _ = jobs_app(app_dir(tmp_path))  # the default: no callback host allowed
    url = f"http://127.0.0.1:{receiver.port}/secret-path-4711"
    with running(app) as client:
        r = submit(client, study_zip(1), callback_url=url)
    assert r.status_code == 422 and r.json()["type"].endswith("/invalid-request")
    assert "secret-path-4711" not in r.text and str(receiver.port) not in r.text
    assert receiver.requests == []


def test_a_job_calls_back_signed_when_it_ends(tmp_path: Path, receiver: Receiver) -> None:
    app, _ = jobs_app(
        app_dir(tmp_path),
        jobs_callback_allowlist=[f"127.0.0.1:{receiver.port}"],
        jobs_callback_secret=SECRET,
    )
    with running(app) as client:
        job_id = submit(
            client, study_zip(2), callback_url=f"http://127.0.0.1:{receiver.port}/hook"
        ).json()["id"]
        done = wait_job(client, job_id)
        assert receiver.arrived.wait(DEADLINE_S)
    headers, body = receiver.requests[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Covidct-Signature"], expected)
    assert headers["X-Covidct-Job"] == job_id
    assert json.loads(body) == {"id": job_id, "state": "done", "diagnosis": done["diagnosis"]}


def test_the_queue_and_the_upload_budget_are_bounded(tmp_path: Path) -> None:
    loading = threading.Event()  # never set: nothing runs, jobs stay queued
    archive = study_zip(1)
    app, _ = jobs_app(
        app_dir(tmp_path),
        loading=loading,
        jobs_max_queued=2,
        jobs_retry_after_s=42,
        jobs_upload_budget_bytes=3 * len(archive),
    )
    with running(app, ready=False) as client:
        assert submit(client, archive).status_code == 202
        r = submit(client, archive + b"\0" * (3 * len(archive)))  # larger than all the budget
        assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (413, "too-large")
        assert submit(client, archive).status_code == 202
        r = submit(client, archive)
        assert (r.status_code, r.headers["Retry-After"]) == (503, "42")
        assert r.json()["type"].endswith("/queue-full")
        assert len(list((app_dir(tmp_path) / "uploads").iterdir())) == 2
        loading.set()


def test_jobs_share_the_inference_queue_with_sync_requests(tmp_path: Path) -> None:
    # The queue holds 3 slices; a synchronous request of 3 fills it while the model is
    # held: the job waits in the queue (not refused, not failed) until there is room.
    app, model = jobs_app(app_dir(tmp_path), max_queue_slices=3, max_batch_size=1)
    archive = study_zip(3)
    with running(app) as client:
        model.gate.clear()
        answers: list[Any] = []
        sync = threading.Thread(
            target=lambda: answers.append(
                client.post(
                    "/patients/diagnose",
                    files={"file": ("s.zip", archive)},
                    data={"patient_id": "p"},
                    headers=KEY,
                )
            )
        )
        sync.start()
        assert model.entered.wait(DEADLINE_S)
        engine = app.state.runtime.serving
        until(lambda: engine.queued_slices == 3, "the sync request's slices queued")
        job_id = submit(client, archive).json()["id"]
        jobs = app.state.jobs
        assert not jobs.has_room()
        assert client.get(f"/jobs/{job_id}", headers=KEY).json()["state"] == "queued"
        model.gate.set()
        sync.join(DEADLINE_S)
        assert answers[0].status_code == 200
        assert wait_job(client, job_id)["state"] == "done"


def test_a_drain_gives_a_running_job_back_to_the_queue(tmp_path: Path) -> None:
    app, model = jobs_app(app_dir(tmp_path), drain_timeout_s=0.2)
    with running(app) as client:
        model.gate.clear()
        job_id = submit(client, study_zip(1)).json()["id"]
        assert model.entered.wait(DEADLINE_S)
        queued = submit(client, study_zip(1)).json()["id"]
        runtime = app.state.runtime
        assert client.portal is not None
        client.portal.call(runtime.drain)  # what SIGTERM does, on the app's loop
        store = app.state.jobs.service.store
        job = store.peek(job_id)
        # Given back after the drain timeout, its attempt not counted; the queued one stays.
        assert (job.state.value, job.attempts, job.lease_owner) == ("queued", 0, None)
        assert store.peek(queued).state.value == "queued"
        r = submit(client, study_zip(1))
        assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (503, "shutting-down")
        model.gate.set()


def test_job_metrics(tmp_path: Path) -> None:
    app, _ = jobs_app(app_dir(tmp_path))
    with running(app) as client:
        before = client.get("/metrics").text
        assert wait_job(client, submit(client, study_zip(1)).json()["id"])["state"] == "done"
        after = client.get("/metrics").text

    def value(text: str, sample: str) -> float:
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    for sample in (
        'covidct_job_run_seconds_count{outcome="done"}',
        "covidct_job_queue_wait_seconds_count",
        'covidct_jobs_submitted_total{source="upload"}',
    ):
        assert value(after, sample) == value(before, sample) + 1, sample
    assert re.search(r'^covidct_jobs\{state="done"\} ', after, re.M)


def test_a_store_that_does_not_answer_is_a_503(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    app, _ = jobs_app(app_dir(tmp_path), jobs_store_url=f"redis://127.0.0.1:{closed}/0")
    with running(app) as client:
        for r in (
            submit(client, study_zip(1)),
            client.get(f"/jobs/{'A' * 32}", headers=KEY),
        ):
            assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (
                503,
                "job-store-unavailable",
            )
            assert r.headers["Retry-After"] == "10"


def test_no_job_is_taken_when_the_model_failed_to_load(tmp_path: Path) -> None:
    def broken(config: Any) -> Any:
        raise RuntimeError("no model here")

    app, _ = jobs_app(app_dir(tmp_path))
    app.state.runtime.loader = broken
    with running(app, ready=False) as client:
        until(lambda: client.get("/health").json()["status"] == "failed", "the load failed")
        r = submit(client, study_zip(1))
        assert (r.status_code, r.json()["type"].rsplit("/", 1)[1]) == (503, "not-ready")


def test_a_run_that_finds_the_inference_queue_full_gives_the_job_back(tmp_path: Path) -> None:
    # The queue filled between has_room() and the run: the job goes back to the queue (its
    # attempt not counted), and no job is claimed again until the queue has emptied.
    app, model = jobs_app(app_dir(tmp_path), max_queue_slices=2, max_batch_size=1)
    with running(app) as client:
        jobs, engine = app.state.jobs, app.state.runtime.serving
        model.gate.clear()
        holder = submit(client, study_zip(2)).json()["id"]  # fills the queue, held
        assert model.entered.wait(DEADLINE_S)
        until(lambda: engine.queued_slices == 2, "the first job's slices queued")
        service = jobs.service
        job = service.submit(
            owner=service.store.peek(holder).owner,
            source=io.BytesIO(study_zip(1)),
            params={"patient_id": "p", "source": "upload"},
        )
        claimed = service.store.claim("test")  # as a worker that saw room a moment ago
        assert claimed is not None and claimed.id == job.id
        with pytest.raises(RunDeferred):
            client.portal.call(jobs.run, claimed)
        assert not jobs.has_room()  # waits for the queue to empty, not merely to have room
        assert service.store.release(job.id, claimed.lease_owner)
        model.gate.set()
        assert wait_job(client, holder)["state"] == "done"
        done = wait_job(client, job.id)
    assert (done["state"], done["attempts"]) == ("done", 1)

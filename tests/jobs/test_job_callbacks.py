"""Callbacks against a real HTTP server on loopback: the HMAC is recomputed here with
hashlib over the raw body received; retries, refusals and the host allowlist."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.jobs import (
    CallbackRefused,
    CallbackSender,
    JobsConfig,
    JobService,
    JobState,
    JobWorker,
    UploadArea,
    check_callback_url,
    new_job_id,
    owner_for,
)
from app.jobs.model import Job, JSONObject

SECRET = "callback-secret-0123456789"


@dataclass
class Receiver:
    """A loopback HTTP server that answers with the scripted statuses, then 200."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with lock:
                state.requests.append((self.path, dict(self.headers.items()), body))
                status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=60)


class RecordedSleep:
    """Stands in for asyncio.sleep: records the backoff instead of waiting it out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def config(tmp_path: Path, **overrides: Any) -> JobsConfig:
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "callback_allowlist": ("127.0.0.1",),
        "callback_secret": SECRET,
        "callback_attempts": 3,
        "callback_backoff_s": 0.5,
    }
    values.update(overrides)
    return JobsConfig(**values)


def ended_job(url: str, state: JobState = JobState.DONE) -> Job:
    return Job(
        id=new_job_id(),
        owner=owner_for("k"),
        state=state,
        created_at=1.0,
        updated_at=2.0,
        expires_at=3.0,
        attempts=1,
        lease_owner="w/x",
        lease_expires_at=None,
        upload_path="u",
        upload_bytes=1,
        params={},
        result={"diagnosis": "covid", "k": 3} if state is JobState.DONE else None,
        problem={"type": "https://covidct.example/problems/not-a-zip"}
        if state is JobState.FAILED
        else None,
        callback_url=url,
    )


def expected_signature(body: bytes) -> str:
    return "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()


def test_delivers_a_signed_body_after_a_retry(tmp_path: Path, receiver: Receiver) -> None:
    receiver.statuses = [503]
    sleep = RecordedSleep()
    job = ended_job(receiver.url())
    sender = CallbackSender(config(tmp_path), sleep=sleep)
    assert asyncio.run(sender.deliver(job)) is True
    assert len(receiver.requests) == 2 and sleep.delays == [0.5]
    path, headers, body = receiver.requests[-1]
    assert path == "/hook" and headers["Content-Type"] == "application/json"
    assert headers["X-Covidct-Signature"] == expected_signature(body)
    assert json.loads(body) == {
        "id": job.id,
        "state": "done",
        "diagnosis": {"diagnosis": "covid", "k": 3},
    }


def test_a_failed_job_s_callback_carries_its_problem(tmp_path: Path, receiver: Receiver) -> None:
    job = ended_job(receiver.url(), JobState.FAILED)
    assert asyncio.run(CallbackSender(config(tmp_path)).deliver(job)) is True
    _, headers, body = receiver.requests[0]
    assert headers["X-Covidct-Signature"] == expected_signature(body)
    assert json.loads(body) == {
        "id": job.id,
        "state": "failed",
        "diagnosis": None,
        "problem": {"type": "https://covidct.example/problems/not-a-zip"},
    }


def test_gives_up_after_the_configured_attempts(tmp_path: Path, receiver: Receiver) -> None:
    receiver.statuses = [500, 502, 503, 200]
    sleep = RecordedSleep()
    sender = CallbackSender(config(tmp_path), sleep=sleep)
    assert asyncio.run(sender.deliver(ended_job(receiver.url()))) is False
    assert len(receiver.requests) == 3 and sleep.delays == [0.5, 1.0]  # doubled


@pytest.mark.parametrize("status", [400, 404, 307])
def test_refusals_and_redirects_are_not_retried(
    tmp_path: Path, receiver: Receiver, status: int
) -> None:
    receiver.statuses = [status]
    sender = CallbackSender(config(tmp_path), sleep=RecordedSleep())
    assert asyncio.run(sender.deliver(ended_job(receiver.url()))) is False
    assert len(receiver.requests) == 1  # the redirect's target was not called


def test_an_unreachable_receiver_is_retried(tmp_path: Path) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleep = RecordedSleep()
    sender = CallbackSender(config(tmp_path), sleep=sleep)
    assert asyncio.run(sender.deliver(ended_job(f"http://127.0.0.1:{port}/"))) is False
    assert sleep.delays == [0.5, 1.0]


def test_a_host_off_the_allowlist_is_never_called(tmp_path: Path, receiver: Receiver) -> None:
    cfg = config(tmp_path, callback_allowlist=("localhost",))
    sender = CallbackSender(cfg, sleep=RecordedSleep())
    assert asyncio.run(sender.deliver(ended_job(receiver.url()))) is False
    assert receiver.requests == []


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://ris.hospital.example/hook", True),
        ("http://RIS.Hospital.Example:8080/hook?x=1", True),  # host only: any port
        ("http://pacs.example:8042/cb", True),
        ("http://pacs.example:8043/cb", False),  # pacs.example:8042 only
        ("http://pacs.example/cb", False),  # port 80
        ("https://ris.hospital.example.attacker.example/", False),
        ("http://169.254.169.254/latest/meta-data/", False),
        ("http://user:pw@ris.hospital.example/", False),  # credentials
        ("ftp://ris.hospital.example/", False),
        ("ris.hospital.example/hook", False),  # no scheme
        ("http://ris.hospital.example:99999/", False),  # not a port
        ("http://[::1]:8080/cb", True),
        ("http://[::1]:8081/cb", False),
    ],
)
def test_allowlist(url: str, allowed: bool) -> None:
    allowlist = ("ris.hospital.example", "pacs.example:8042", "[::1]:8080")
    if allowed:
        assert check_callback_url(url, allowlist) == url
    else:
        with pytest.raises(CallbackRefused) as refused:
            check_callback_url(url, allowlist)
        assert url not in str(refused.value)  # a refusal never echoes the URL


def test_an_empty_allowlist_refuses_every_callback() -> None:
    with pytest.raises(CallbackRefused, match="allowlist is empty"):
        check_callback_url("http://127.0.0.1/hook", ())


def test_an_allowlist_needs_a_secret(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="callback_secret"):
        JobsConfig(data_dir=tmp_path, callback_allowlist=("127.0.0.1",))


def test_the_worker_calls_back_when_a_job_ends(
    kit: Any, tmp_path: Path, receiver: Receiver
) -> None:
    cfg = kit.config(callback_allowlist=("127.0.0.1",), callback_secret=SECRET)
    service = JobService(kit.make(cfg), UploadArea(cfg.uploads_dir), cfg)
    job = service.submit(
        owner=owner_for("k"), source=io.BytesIO(b"zip"), params={}, callback_url=receiver.url()
    )

    async def run(claimed: Job) -> JSONObject:
        return {"diagnosis": "normal"}

    worker = JobWorker(service, run, lambda: True, callbacks=CallbackSender(cfg))

    async def scenario() -> None:
        assert await worker.run_once() is True
        await worker.wait_for_callbacks()

    asyncio.run(scenario())
    [(_, headers, body)] = receiver.requests
    assert headers["X-Covidct-Signature"] == expected_signature(body)
    assert headers["X-Covidct-Job"] == job.id
    assert json.loads(body) == {"id": job.id, "state": "done", "diagnosis": {"diagnosis": "normal"}}

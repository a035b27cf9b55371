"""The runtime's states and the graceful shutdown: in process, and with a real uvicorn
process that gets SIGTERM while a request is in flight."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from loopback import free_port

from app.errors import ShuttingDownError
from app.inference import BatchingConfig, InferenceEngine, ModelConfig
from app.runtime import Runtime, ServiceConfig, drain_on_sigterm
from dicom_factory import tiff_bytes
from hostile import assert_problem as problem
from shared_data import zip_files
from support import ct_like_slices, sharing_app, started

ROOT = Path(__file__).resolve().parents[1]


class Model:
    """A stand-in predictor with a model card."""

    def __init__(self, card: Any) -> None:
        self.card = card

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.full(len(batch), 0.25, np.float32)


@pytest.fixture(scope="module")
def card(test_model_dir: Path) -> Any:
    from app.contract import read_card

    return read_card(test_model_dir)


def runtime_with(card: Any, loader_gate: threading.Event | None = None, **config: Any) -> Runtime:
    def loader(model: ModelConfig) -> InferenceEngine:
        if loader_gate is not None:
            assert loader_gate.wait(60), "the test never released the loader"
        return InferenceEngine(Model(card), model.batching)

    model = ModelConfig(Path("unused"), batching=BatchingConfig(warmup_sizes=(1,)))
    config.setdefault("decode_workers", 0)
    return Runtime(ServiceConfig(model=model, **config), loader)


def test_load_then_drain_with_nothing_in_flight(card: Any) -> None:
    runtime = runtime_with(card)

    async def go() -> None:
        await runtime.load()
        assert (runtime.state, runtime.engine is not None) == ("ready", True)
        assert await runtime.drain() is True
        assert runtime.state == "draining" and runtime.door.closed

    asyncio.run(go())
    runtime.stop()
    assert runtime.state == "stopped"


def test_decode_workers_start_with_the_model_and_stop_with_the_service(card: Any) -> None:
    runtime = runtime_with(card, decode_workers=1)
    assert runtime.decode_pool is not None and not runtime.decode_pool.started
    asyncio.run(runtime.load())
    assert (runtime.state, runtime.decode_pool.started) == ("ready", True)  # before any upload
    runtime.stop()
    assert not runtime.decode_pool.started


def test_drain_waits_for_the_requests_in_flight(card: Any) -> None:
    runtime = runtime_with(card, drain_timeout_s=600)

    async def go() -> None:
        await runtime.load()
        runtime.door.enter()  # a request let in
        drain = asyncio.ensure_future(runtime.drain())
        await asyncio.sleep(0)  # the drain starts, and waits
        assert (runtime.state, drain.done()) == ("draining", False)
        runtime.door.leave()  # its answer is out
        assert await drain is True

    asyncio.run(go())
    runtime.stop()


def test_drain_time_out_stops_the_engine(card: Any) -> None:
    runtime = runtime_with(card, drain_timeout_s=0)

    async def go() -> None:
        await runtime.load()
        runtime.door.enter()  # a request that never finishes
        assert await runtime.drain() is False
        assert runtime.engine is not None
        with pytest.raises(ShuttingDownError):  # no more model calls
            await runtime.engine.predict(np.zeros((1, 512, 512), np.uint16))

    asyncio.run(go())
    runtime.stop()


def test_a_shutdown_during_loading_is_not_undone_by_the_load(card: Any) -> None:
    gate = threading.Event()
    runtime = runtime_with(card, loader_gate=gate)

    async def go() -> None:
        loading = asyncio.ensure_future(runtime.load())
        runtime.begin_drain()  # SIGTERM while the model loads (the gate holds the loader)
        gate.set()
        await loading
        assert runtime.state == "draining"
        assert runtime.engine is not None and not runtime.engine._batcher._thread.is_alive()

    asyncio.run(go())
    runtime.stop()


class FakeServer:
    """Stands in for uvicorn's Server: its SIGTERM handler is a bound method, `should_exit`
    the flag that handler sets."""

    def __init__(self) -> None:
        self.exit = threading.Event()

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.exit.set()  # a server without `should_exit` stops when handed the signal

    @property
    def should_exit(self) -> bool:
        return self.exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self.exit.set()


async def until(condition: Any, timeout_s: float = 30) -> None:
    """Poll condition() on the event loop until true, at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("server_kind", ["uvicorn-like", "other"])
def test_sigterm_drains_then_asks_the_server_to_exit(card: Any, server_kind: str) -> None:
    runtime = runtime_with(card, drain_timeout_s=600)
    server = FakeServer()
    if server_kind == "uvicorn-like":
        handler: Any = server.handle_exit
    else:  # a plain function: the drain hands the signal on

        def handler(sig: int, frame: Any) -> None:
            server.exit.set()

    original = signal.signal(signal.SIGTERM, handler)

    async def go() -> None:
        await runtime.load()
        with drain_on_sigterm(runtime):
            runtime.door.enter()  # a request in flight
            signal.raise_signal(signal.SIGTERM)
            await until(lambda: runtime.state == "draining")
            signal.raise_signal(signal.SIGTERM)  # a second one changes nothing
            assert not server.exit.is_set()  # the request is still in flight
            runtime.door.leave()
            assert await asyncio.to_thread(server.exit.wait, 30)
        assert signal.getsignal(signal.SIGTERM) == handler

    try:
        asyncio.run(go())
    finally:
        signal.signal(signal.SIGTERM, original)
        runtime.stop()


@pytest.fixture
def draining(client: TestClient, test_model_dir: Path) -> Iterator[TestClient]:
    """An app sharing the session's model, draining (as after SIGTERM), nothing in flight."""
    predictor = client.app.state.runtime.engine.predictor  # type: ignore[attr-defined]
    with started(sharing_app(predictor, test_model_dir, drain_timeout_s=5)) as running:
        runtime: Runtime = running.app.state.runtime  # type: ignore[attr-defined]
        assert running.portal.call(runtime.drain) is True  # type: ignore[union-attr]
        yield running


def test_draining_answers_503_and_takes_no_new_work(draining: TestClient) -> None:
    health = draining.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "draining"
    assert draining.get("/health/live").status_code == 200
    refused = draining.post(
        "/patients/diagnose",
        files={"file": ("a.zip", b"PK", "application/zip")},
        data={"patient_id": "x"},
    )
    problem(refused, 503, "shutting-down")


# --- a real uvicorn process ------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def poll(condition: Any, what: str, timeout_s: float, server: Server) -> Any:
    """condition() until it returns something true, at most timeout_s (polling interval
    0.1 s); fails with the server's output when the process ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"server exited ({server.process.returncode}) before {what}:\n"
                        f"{server.output()}")  # fmt: skip
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout_s} s:\n{server.output()}")


@pytest.fixture
def server(test_model_dir: Path, tmp_path: Path) -> Iterator[Server]:
    """`uvicorn --factory app.main:app_factory` as deployed, on a free loopback port, with
    the seeded test model; started in an empty folder (no .env), ready when yielded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVIDCT_")}
    env.update(
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
        COVIDCT_MODEL_DIR=str(test_model_dir),
        COVIDCT_MAX_BATCH_SIZE="1",
        COVIDCT_WARMUP_BATCH_SIZES="[1]",
        COVIDCT_DECODE_WORKERS="0",
        COVIDCT_DRAIN_TIMEOUT_S="300",
    )
    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory",
               "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=out)
    running = Server(process, port, log)
    try:

        def ready() -> bool:
            try:
                return running.get("/health")[0] == 200
            except OSError:  # not listening yet
                return False

        poll(ready, "readiness", 600, running)
        yield running
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(60)


def multipart(fields: dict[str, str], file: bytes) -> tuple[str, bytes]:
    boundary = "covidct-shutdown-test"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.zip"\r\n'
        "Content-Type: application/zip\r\n\r\n".encode()
        + file
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


def read_head(sock: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"connection closed after {head!r}"
        head += chunk
    return head


def test_sigterm_drains_the_request_in_flight_then_exits_0(server: Server) -> None:
    series = ct_like_slices(2)[..., 0].astype(np.uint16)
    archive = zip_files([(f"S/IM{i:05d}.tif", tiff_bytes(s)) for i, s in enumerate(series, 1)])
    content_type, body = multipart({"patient_id": "IN-FLIGHT"}, archive)

    # A request in flight: its headers sent with Expect: 100-continue, its body held back.
    # uvicorn answers "100 Continue" when the app first asks for the body, that is once
    # the request is past the upload guard's door.
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=300)
    sock.sendall(
        f"POST /patients/diagnose HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}"
        f"\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
        .encode()
    )  # fmt: skip
    assert read_head(sock).startswith(b"HTTP/1.1 100 ")

    server.process.send_signal(signal.SIGTERM)

    def draining() -> bool:
        status, _, text = server.get("/health")
        return status == 503 and json.loads(text)["status"] == "draining"

    poll(draining, "readiness 503 (draining)", 30, server)
    assert server.get("/health/live")[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/patients/diagnose", body=body, headers={"Content-Type": content_type})
    late = conn.getresponse()
    late_body = json.loads(late.read())
    conn.close()
    assert late.status == 503 and late_body["type"].endswith("/shutting-down"), late_body
    assert int(late.getheader("retry-after", "0")) >= 1
    assert server.process.poll() is None  # still serving what is in flight

    sock.sendall(body)
    answer = b""
    while chunk := sock.recv(1 << 16):
        answer += chunk
    sock.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:500]
    assert json.loads(payload)["patient_id"] == "IN-FLIGHT"

    assert server.process.wait(120) == 0, server.output()
    assert '"message": "drained"' in server.output()

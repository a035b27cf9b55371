"""The service as a real process: uvicorn on a free loopback port, for the tests whose peer
(dicomweb-client, Orthanc) talks to it over the network. Not a test module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from loopback import free_port, wait_ready
from processes import stop

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 600.0  # start-up (TensorFlow, the model, its warm-up) on a busy 2-core CPU


@dataclass
class Service:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    api_key: str

    def client(self, timeout_s: float = 120.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=timeout_s, headers={"X-API-Key": self.api_key}
        )

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def _wait_ready(service: Service) -> None:
    with httpx.Client(base_url=service.url, timeout=5) as c:
        wait_ready(
            service.process,
            lambda: c.get("/health").status_code == 200,
            transient=httpx.TransportError,
            timeout_s=DEADLINE_S,
            poll_s=0.25,
            what="the service",
            tail=service.tail,
        )


@contextmanager
def run_service(
    model_dir: Path, workdir: Path, api_key: str, **settings: object
) -> Iterator[Service]:
    """uvicorn running the app (CPU, no decode processes) with `settings` as COVIDCT_*
    variables; SIGTERM (a graceful drain) at the end, SIGKILL if that hangs."""
    port = free_port()
    env = {
        **os.environ,
        "COVIDCT_MODEL_DIR": str(model_dir),
        "COVIDCT_DEVICE": "cpu",
        "COVIDCT_MAX_BATCH_SIZE": "4",
        "COVIDCT_DECODE_WORKERS": "0",
        "COVIDCT_API_KEYS": json.dumps([api_key]),
        "COVIDCT_JOBS_DATA_DIR": str(workdir / "jobs"),
        "COVIDCT_LOG_LEVEL": "INFO",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    for name, value in settings.items():
        env[f"COVIDCT_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    log = workdir / "service.log"
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory",
           "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    service = Service(f"http://127.0.0.1:{port}", process, log, api_key)
    try:
        _wait_ready(service)
        yield service
    finally:
        stop(process, timeout_s=120)

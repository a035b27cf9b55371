"""What the driver scripts share: the loopback host and free ports on it, the real P002
slices they send (zipped in memory, in a multipart form), one HTTP exchange, the seeded
untrained model they serve, and starting, waiting for and ending the processes they drive
(uvicorn with the service, redis-server).

Used by scripts/failover.py, scripts/jobs_load.py and tests/tools/load_test.py; each keeps
its own policy (the model's head init, which slices, the service's settings) and passes it
in. Not a test module, and it imports nothing from tests/: the scripts run in
scripts/serve.sh's environment. Every process started here runs in a session of its own,
so that `end` ends it whole, by its id.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only
DATA = Path(os.environ.get("COVIDCT_SHARED_DATA", ROOT.parent / "shared" / "data"))
P002 = DATA / "covid-ct-md" / "P002"
LOG_TAIL = 3000  # characters of a process's log quoted when it failed to start


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the process started next binds it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def ensure_model(
    model_dir: Path, *, seed: int | None = None, head_init_std: float | None = None
) -> Path:
    """Build the default network, untrained, into `model_dir` (`python -m models
    build-default`, with the seed and head init given, else its own defaults) unless a
    SavedModel is there already."""
    if not (model_dir / "saved_model.pb").exists():
        print(f"building the seeded model at {model_dir} (about a minute) ...", flush=True)
        cmd = [sys.executable, "-m", "models", "build-default", "--out", str(model_dir)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        if head_init_std is not None:
            cmd += ["--head-init-std", str(head_init_std)]
        subprocess.run(cmd, cwd=ROOT, check=True)
    return model_dir


# --- what is sent ------------------------------------------------------------------------------


def p002_zip(slices: Iterable[str]) -> bytes:
    """These P002 slices (file names) as one study, zipped in memory under P002/."""
    names = list(slices)
    if not all((P002 / name).is_file() for name in names):
        raise SystemExit(f"the P002 slices are not at {P002} (set COVIDCT_SHARED_DATA)")
    buf = BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name in names:
            zf.writestr(f"P002/{name}", (P002 / name).read_bytes())
    return buf.getvalue()


Form = tuple[bytes, str]  # a request body and its Content-Type, as `multipart` makes them


def multipart(fields: dict[str, str], archive: bytes) -> Form:
    """A multipart/form-data body of these text fields and the zip as `file`; the body and
    its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="study.zip"\r\nContent-Type: application/zip\r\n\r\n'.encode()
        + archive
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage  # looked up without regard to case
    body: bytes


def exchange(
    port: int,
    method: str,
    path: str,
    *,
    timeout_s: float,
    form: Form | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request to HOST:port on a connection of its own, with `form` as its body. A
    connection or protocol error (OSError, http.client.HTTPException) reaches the caller."""
    body: bytes | None = None
    sent = dict(headers or {})
    if form is not None:
        body, sent["Content-Type"] = form
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        return Reply(response.status, response.msg, response.read())
    finally:
        conn.close()


# --- processes ---------------------------------------------------------------------------------


def start_service(
    port: int, model_dir: Path, settings: dict[str, str], log: Path, *uvicorn_args: str
) -> subprocess.Popen[bytes]:
    """uvicorn with the service (`app.main:app_factory`) on HOST:port, on the CPU, serving
    `model_dir`, with `settings` (COVIDCT_* variables) over this process's environment and
    its output appended to `log`. Returns at once: `wait_healthy` waits for it."""
    env = {
        **os.environ,
        "COVIDCT_MODEL_DIR": str(model_dir),
        "COVIDCT_DEVICE": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **settings,
    }
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.main:app_factory",
           "--host", HOST, "--port", str(port), *uvicorn_args]  # fmt: skip
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(
    process: subprocess.Popen[bytes],
    port: int,
    log: Path,
    *,
    timeout_s: float,
    poll_s: float = 0.5,
    what: str = "the service",
) -> None:
    """Wait until GET /health on HOST:port answers 200 (the model loaded and warmed)."""

    def healthy() -> bool:
        return exchange(port, "GET", "/health", timeout_s=5).status == 200

    wait_ready(
        process, healthy, transient=(OSError, http.client.HTTPException),
        timeout_s=timeout_s, poll_s=poll_s, what=what, tail=lambda: log_tail(log),
    )  # fmt: skip


def start_redis(workdir: Path, *, appendonly: bool) -> tuple[subprocess.Popen[bytes], str]:
    """redis-server on a free loopback port, its config, data and log in `workdir`, no
    snapshots, the append-only file as asked. Returns the process and its URL once it
    answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found (Debian: apt-get install -y redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config, log = workdir / "redis.conf", workdir / "redis.log"
    config.write_text(
        f'bind {HOST}\nport {port}\ndir {workdir}\nsave ""\n'
        f"appendonly {'yes' if appendonly else 'no'}\nappendfsync everysec\n"
        f"daemonize no\nlogfile {log}\n"
    )
    process = subprocess.Popen(
        [binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip

    def pong() -> bool:
        with socket.create_connection((HOST, port), timeout=1) as c:
            c.sendall(b"PING\r\n")
            return c.recv(16).startswith(b"+PONG")

    try:
        wait_ready(
            process, pong, transient=OSError, timeout_s=60, poll_s=0.1, what="redis-server",
            tail=lambda: log_tail(log),
        )  # fmt: skip
    except BaseException:
        end(process)
        raise
    return process, f"redis://{HOST}:{port}/0"


def wait_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    transient: type[Exception] | tuple[type[Exception], ...],
    timeout_s: float,
    poll_s: float,
    what: str,
    tail: Callable[[], str],
) -> None:
    """Poll `ready()` until it is true; a `transient` error (not listening yet) is one more
    poll. Between polls wait `poll_s` on the process, which notices an early exit. Raises
    RuntimeError when it exits first, TimeoutError when not ready after `timeout_s`, each
    with the end of its log (`tail()`); any other error of `ready()` goes to the caller.
    The tests' server fixtures use it too."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except transient:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s\n{tail()}")
        try:
            process.wait(timeout=poll_s)  # the pause between polls; notices an exit
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"{what} exited with {process.returncode}\n{tail()}")


def log_tail(log: Path) -> str:
    """The end of a process's log, as quoted when it failed to start."""
    text = log.read_text(errors="replace") if log.is_file() else "(no log)"
    return text[-LOG_TAIL:]


def end(process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """End a process started here, and its session, by id: SIGTERM (a graceful stop), then
    SIGKILL if it has not ended after `timeout_s`."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

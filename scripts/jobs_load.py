"""Jobs under load and a crash, measured: 200 jobs from 16 clients, the service SIGKILLed
mid-run and started again, with the embedded (SQLite) and with the Redis job store.

Starts the service (uvicorn, CPU, a small seeded SavedModel, no decode processes: one
process, which SIGKILL takes down whole) on loopback with a fresh jobs directory, and, for
the Redis run, a redis-server on a free loopback port (appendonly). Each of the clients
submits its share of the jobs one after the other (POST /jobs, a small real study: four
P002 slices, zipped), waits for each to end (GET /jobs/{id}?wait=), and retries through
the outage (connection refused, 503). Once a given number of jobs are done, the service
is SIGKILLed (mid-job, mid-request) and started again on the same store and directory.
Every job carries a callback URL to a receiver in this process, which counts the
completions each job reports.

Prints, per store:
  accepted     202 answers the clients received (each a job they follow)
  done         accepted jobs that ended done
  failed       accepted jobs that ended failed, by problem type
  lost         accepted jobs that never ended, or vanished (target 0)
  done twice   jobs reported ended more than once (two callbacks, target 0)
and the detail: jobs retried after the SIGKILL (attempt 2), submissions whose answer the
SIGKILL cut (then sent again: the first may have been queued too, an extra job no client
follows), callbacks lost with the process, uploads left on disk, time to recover.

Needs .venv (scripts/setup-venv.sh test,train), the real CT fixtures in ../shared/data and,
for the Redis run, redis-server (Debian: apt-get install -y redis-server). Builds the model
into --model-dir when it holds none. Every process it starts is ended by its id.

Usage: .venv/bin/python scripts/jobs_load.py [--store sqlite|redis|both] [--jobs 200]
       [--clients 16] [--kill-after-done 60]
Exits 1 when a job was lost or reported done twice.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import loopback
from loopback import HOST, ROOT

SLICES = ("IM0060.dcm", "IM0062.dcm", "IM0064.dcm", "IM0066.dcm")  # through open lung
API_KEY = "jobs-load-key"
SECRET = "jobs-load-callback-secret"
LEASE_S = 10  # a crashed worker's job runs again this long after the crash (default 60)
POLL_WAIT_S = 20  # each GET /jobs/{id}?wait=
DEADLINE_S = 1800.0  # the whole run per store


# --- processes -----------------------------------------------------------------------------


@dataclass
class Server:
    """The service process; started again on the same settings after a SIGKILL."""

    model_dir: Path
    settings: dict[str, str]
    log: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> float:
        """Start it and wait until /health is 200; the seconds that took."""
        t0 = time.monotonic()
        self.process = loopback.start_service(
            self.port, self.model_dir, self.settings, self.log, "--no-access-log"
        )
        self.starts += 1
        loopback.wait_healthy(self.process, self.port, self.log, timeout_s=600, poll_s=0.25)
        return time.monotonic() - t0

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)  # the whole process group, at once
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            loopback.end(self.process, timeout_s=120)  # SIGTERM: a graceful drain


# --- the callback receiver -------------------------------------------------------------------


@dataclass
class Callbacks:
    ended: dict[str, list[str]] = field(default_factory=lambda: collections.defaultdict(list))
    bad_signatures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def callback_receiver(callbacks: Callbacks) -> ThreadingHTTPServer:
    import hashlib
    import hmac

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            doc = json.loads(body)
            with callbacks.lock:
                if not hmac.compare_digest(expected, self.headers.get("X-Covidct-Signature", "")):
                    callbacks.bad_signatures += 1
                callbacks.ended[doc["id"]].append(doc["state"])
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((HOST, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# --- the clients -----------------------------------------------------------------------------


@dataclass
class Tally:
    accepted: dict[str, str] = field(default_factory=dict)  # job id → patient id
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    never_ended: list[str] = field(default_factory=list)
    vanished: list[str] = field(default_factory=list)
    cut_submissions: int = 0  # POSTs whose answer the outage cut (sent again)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        with self.lock:
            return sum(j["state"] == "done" for j in self.final.values())


Answer = tuple[int, http.client.HTTPMessage, bytes]


def _request(port: int, method: str, path: str, form: loopback.Form | None = None) -> Answer:
    timeout_s = POLL_WAIT_S + 60
    headers = {"X-API-Key": API_KEY}
    reply = loopback.exchange(port, method, path, timeout_s=timeout_s, form=form, headers=headers)
    return reply.status, reply.headers, reply.body


def client(
    n: int, jobs: int, port: int, archive: bytes, callback_url: str, tally: Tally, deadline: float
) -> None:
    for i in range(jobs):
        patient_id = f"load-{n:02d}-{i:03d}"
        fields = {"patient_id": patient_id, "callback_url": callback_url}
        form = loopback.multipart(fields, archive)
        job_id = None
        while job_id is None and time.monotonic() < deadline:
            try:
                status, headers, answer = _request(port, "POST", "/jobs", form)
            except ConnectionRefusedError:
                time.sleep(0.5)  # the service is down: try again shortly
                continue
            except (OSError, http.client.HTTPException):
                with tally.lock:
                    tally.cut_submissions += 1  # sent, answer lost: it may be queued
                time.sleep(0.5)
                continue
            if status == 202:
                job_id = json.loads(answer)["id"]
            else:
                with tally.lock:
                    tally.refused[str(status)] += 1
                time.sleep(float(headers.get("Retry-After", "1")))  # 503: as told
        if job_id is None:
            return
        with tally.lock:
            tally.accepted[job_id] = patient_id
        while True:
            if time.monotonic() > deadline:
                with tally.lock:
                    tally.never_ended.append(job_id)
                break
            try:
                status, _, answer = _request(port, "GET", f"/jobs/{job_id}?wait={POLL_WAIT_S}")
            except (OSError, http.client.HTTPException):
                time.sleep(0.5)  # the service is down: ask again shortly
                continue
            if status == 404:
                with tally.lock:
                    tally.vanished.append(job_id)
                break
            if status != 200:
                time.sleep(0.5)
                continue
            job = json.loads(answer)
            if job["state"] in ("done", "failed"):
                with tally.lock:
                    tally.final[job_id] = job
                break


# --- the store, read directly after the run --------------------------------------------------


def stored_jobs(data_dir: Path, store_url: str) -> list[dict[str, Any]]:
    """Every job record (id, state, attempts, params), straight from the store."""
    if not store_url:
        with contextlib.closing(sqlite3.connect(data_dir / "jobs.sqlite3")) as db:
            rows = db.execute("SELECT id, state, attempts, params FROM jobs").fetchall()
        return [
            {"id": r[0], "state": r[1], "attempts": r[2], "params": json.loads(r[3])} for r in rows
        ]
    import redis

    client = redis.Redis.from_url(store_url, decode_responses=True)
    found = []
    for key in client.scan_iter(match="covidct:{jobs}:job:*", count=500):
        h = client.hgetall(key)
        found.append({"id": h["id"], "state": h["state"], "attempts": int(h["attempts"]),
                      "params": json.loads(h["params"])})  # fmt: skip
    client.close()
    return found


# --- one run ---------------------------------------------------------------------------------


def run(store: str, args: argparse.Namespace, model_dir: Path, archive: bytes) -> bool:
    print(f"\n=== {store} store: {args.jobs} jobs from {args.clients} clients ===", flush=True)
    with (
        tempfile.TemporaryDirectory(prefix=f"jobs-load-{store}-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        store_url = ""
        if store == "redis":
            redis_process, store_url = loopback.start_redis(workdir, appendonly=True)
            stack.callback(loopback.end, redis_process)
        callbacks = Callbacks()
        receiver = callback_receiver(callbacks)
        stack.callback(receiver.shutdown)
        data_dir = workdir / "jobs"
        settings = {
            "COVIDCT_MAX_BATCH_SIZE": "4",
            "COVIDCT_DECODE_WORKERS": "0",
            "COVIDCT_ALLOW_UNTRAINED": "true",
            "COVIDCT_API_KEYS": json.dumps([API_KEY]),
            "COVIDCT_MAX_CONCURRENT_UPLOADS": str(args.clients + 4),
            "COVIDCT_JOBS_DATA_DIR": str(data_dir),
            "COVIDCT_JOBS_STORE_URL": store_url,
            "COVIDCT_JOBS_LEASE_S": str(LEASE_S),
            "COVIDCT_JOBS_CALLBACK_ALLOWLIST": json.dumps([f"{HOST}:{receiver.server_port}"]),
            "COVIDCT_JOBS_CALLBACK_SECRET": SECRET,
            "COVIDCT_JOBS_CALLBACK_BACKOFF_S": "0.2",
            "COVIDCT_LOG_LEVEL": "INFO",
        }
        server = Server(model_dir, settings, workdir / "service.log", loopback.free_port())
        stack.callback(server.stop)
        ready_s = server.start()
        print(f"service ready in {ready_s:.0f} s", flush=True)

        tally = Tally()
        deadline = time.monotonic() + DEADLINE_S
        callback_url = f"http://{HOST}:{receiver.server_port}/done"
        shares = [
            args.jobs // args.clients + (n < args.jobs % args.clients) for n in range(args.clients)
        ]
        t0 = time.monotonic()
        threads = [
            threading.Thread(
                target=client,
                args=(n, share, server.port, archive, callback_url, tally, deadline),
                daemon=True,
            )
            for n, share in enumerate(shares)
        ]
        for t in threads:
            t.start()
        while tally.done < args.kill_after_done and any(t.is_alive() for t in threads):
            time.sleep(0.2)  # watching the clients' progress
        done_at_kill = tally.done
        server.kill()
        killed_at = time.monotonic()
        print(f"SIGKILL after {killed_at - t0:.0f} s, {done_at_kill} jobs done", flush=True)
        restart_s = server.start()
        print(f"started again, ready in {restart_s:.0f} s", flush=True)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - t0
        # Callbacks of the last jobs may still be on their way: wait for them, bounded.
        settle = time.monotonic() + 30
        while time.monotonic() < settle:
            with callbacks.lock:
                missing = [j for j in tally.final if j not in callbacks.ended]
            if not missing:
                break
            time.sleep(0.2)  # deliveries in flight
        records = stored_jobs(data_dir, store_url)
        server.stop()
        uploads_left = len(list((data_dir / "uploads").iterdir()))

    finals = tally.final
    done = [j for j, job in finals.items() if job["state"] == "done"]
    failed = collections.Counter(
        job["problem"]["type"].rsplit("/", 1)[-1]
        for job in finals.values()
        if job["state"] == "failed"
    )
    lost = sorted(
        set(tally.never_ended) | set(tally.vanished) | (set(tally.accepted) - set(finals))
    )
    reported = {j: states for j, states in callbacks.ended.items()}
    twice = [j for j, states in reported.items() if len(states) > 1]
    retried = [r for r in records if r["attempts"] >= 2]
    followed = set(tally.accepted.values())
    extra = [r for r in records if r["params"].get("patient_id") not in followed]
    no_callback = [j for j in finals if j not in reported]
    print(f"accepted            {len(tally.accepted)}")
    print(f"done                {len(done)}")
    print(f"failed              {sum(failed.values())} {dict(failed) or ''}")
    print(f"lost                {len(lost)}   (target 0)")
    print(f"done twice          {len(twice)}   (target 0)")
    print(f"-- retried after the SIGKILL (attempt 2): {len(retried)}")
    print(f"-- submissions cut by the SIGKILL, sent again: {tally.cut_submissions}; "
          f"queued jobs no client follows: {len(extra)} {[r['state'] for r in extra]}")  # fmt: skip
    print(f"-- refusals before acceptance: {dict(tally.refused) or 0}")
    print(f"-- ended jobs whose callback died with the process: {len(no_callback)}; "
          f"bad signatures: {callbacks.bad_signatures}")  # fmt: skip
    print(f"-- store records {len(records)}, uploads left on disk {uploads_left}")
    print(f"-- {elapsed:.0f} s in all; service ready again {restart_s:.0f} s after the SIGKILL")
    return not lost and not twice


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "redis", "both"], default="both")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kill-after-done", type=int, default=60)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "var" / "models" / "jobs-load")
    args = parser.parse_args()
    archive = loopback.p002_zip(SLICES)
    loopback.ensure_model(args.model_dir, seed=0, head_init_std=0.02)
    stores = ["sqlite", "redis"] if args.store == "both" else [args.store]
    ok = [run(store, args, args.model_dir, archive) for store in stores]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

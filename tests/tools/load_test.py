"""Load test on loopback: uvicorn with the real app, 16 client threads for a bounded time,
mixing valid and broken uploads, with a small inference queue so overload happens.

Each valid upload is 3-5 real P002 slices under its own patient id and request id; its
answer must echo both and hold exactly its own slices (no mixed-up results). Broken
uploads (not a zip, a 1 GiB zip bomb, a corrupt member, a nested zip, an encrypted member,
an oversized upload announced with Expect: 100-continue) must get their problem type.
Overload must be 503 with Retry-After. Afterwards: every request answered, the server's
memory back near where it started (within --memory-slack-mib; the load runs in --rounds
phases and the memory must not keep growing from one to the next: allocator pools plateau,
a leak grows), /health 200, and its JSON log free of the patient data planted in member
names, with one audit line per diagnosis.

Usage: .venv/bin/python tests/tools/load_test.py [--model-dir DIR] [--seconds 120]
       [--clients 16] [--max-queue-slices 8]
Builds the default (untrained) SavedModel into --model-dir when it holds none.
Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from loopback import HOST, end, ensure_model, free_port, start_service, wait_healthy  # noqa: E402

from hostile import corrupt_deflate, encrypted, zip_bomb  # noqa: E402
from shared_data import P002, zip_files  # noqa: E402

PLANTED = "DOE_JOHN_1970"  # in every member name: must not reach the server's log
MAX_UPLOAD = 16 << 20
BROKEN = {  # kind: (status, problem type)
    "not-a-zip": (400, "not-a-zip"),
    "bomb": (413, "zip-bomb"),
    "corrupt": (400, "corrupt-member"),
    "nested": (422, "no-image"),
    "encrypted": (400, "encrypted-member"),
    "oversized": (413, "too-large"),
}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0
    answered: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    failures: list[str] = field(default_factory=list)
    valid_latency: list[float] = field(default_factory=list)
    slices_done: int = 0
    diagnoses: int = 0
    retry_after_missing: int = 0

    def fail(self, message: str) -> None:
        with self.lock:
            self.failures.append(message)


def start_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    settings = {
        "COVIDCT_MAX_QUEUE_SLICES": str(args.max_queue_slices),
        "COVIDCT_MAX_BATCH_SIZE": "4",
        "COVIDCT_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
        "COVIDCT_LOG_LEVEL": "INFO",
        "COVIDCT_API_KEYS": "[]",
    }
    return start_service(port, args.model_dir, settings, log, "--workers", "1")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.stop, self.peak = psutil.Process(pid), threading.Event(), 0

    def rss(self) -> int:
        return self.process.memory_info().rss

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, self.rss())


def broken_uploads() -> dict[str, bytes]:
    one = (P002 / "IM0060.dcm").read_bytes()
    return {
        "not-a-zip": b"this is not a zip " * 100,
        "bomb": zip_bomb(1 << 30),
        "corrupt": corrupt_deflate(one),
        "nested": zip_files([(f"{PLANTED}/inner.zip", zip_files([("IM0060.dcm", one)]))]),
        "encrypted": encrypted(zip_files([(f"{PLANTED}/IM0060.dcm", one)])),
    }


def oversized(port: int, request_id: str) -> tuple[int, dict[str, str], bytes]:
    """Announce an upload over the limit and wait for the answer before sending it, as a
    client using Expect: 100-continue does: the server refuses from the headers."""
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        conn.putrequest("POST", "/patients/diagnose")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", str(MAX_UPLOAD + (1 << 20)))
        conn.putheader("Expect", "100-continue")
        conn.putheader("X-Request-ID", request_id)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def client_loop(
    n: int, base: str, port: int, deadline: float, tally: Tally, broken: dict[str, bytes]
) -> None:
    rng = random.Random(n)
    session = requests.Session()
    files = sorted(P002.glob("*.dcm"))
    i = 0
    while time.monotonic() < deadline:
        i += 1
        request_id = f"load-{n}-{i}-{uuid.uuid4().hex[:8]}"
        patient = f"LOAD-{n:02d}-{i:05d}"
        kind = "valid" if rng.random() < 0.6 else rng.choice(sorted(BROKEN))
        with tally.lock:
            tally.sent += 1
        t0 = time.perf_counter()
        try:
            if kind == "oversized":
                status, headers, content = oversized(port, request_id)
                members: list[str] = []
            else:
                if kind == "valid":
                    start = rng.randrange(40, 95)
                    chosen = files[start : start + rng.randint(3, 5)]
                    members = [f"{patient}/{PLANTED}_{p.name}" for p in chosen]
                    archive = zip_files(list(zip(members, chosen, strict=True)))
                else:
                    archive, members = broken[kind], []
                r = session.post(
                    f"{base}/patients/diagnose",
                    files={"file": (f"{PLANTED}.zip", archive, "application/zip")},
                    data={"patient_id": patient},
                    headers={"X-Request-ID": request_id},
                    timeout=300,
                )
                status, headers, content = r.status_code, dict(r.headers), r.content
                headers = {k.lower(): v for k, v in headers.items()}
        except Exception as e:  # a lost request: no answer
            tally.fail(f"{kind} {request_id}: no answer ({type(e).__name__}: {e})"[:300])
            continue
        elapsed = time.perf_counter() - t0
        with tally.lock:
            tally.answered += 1
        check(kind, status, headers, content, request_id, patient, members, elapsed, tally)
        if status == 503:
            time.sleep(0.5)  # a pause, though shorter than Retry-After: keep the pressure on


def check(
    kind: str, status: int, headers: dict[str, str], content: bytes, request_id: str,
    patient: str, members: list[str], elapsed: float, tally: Tally,
) -> None:  # fmt: skip
    label = f"{kind} {request_id}"
    if headers.get("x-request-id") != request_id:
        tally.fail(f"{label}: answer carries request id {headers.get('x-request-id')}")
    try:
        body = json.loads(content)
    except ValueError:
        tally.fail(f"{label}: {status} without a JSON body")
        return
    if status == 503:
        problem = body.get("type", "").rsplit("/", 1)[-1]
        where = "uploads in progress" if "in progress" in body.get("detail", "") else "queue"
        with tally.lock:
            tally.outcomes[f"{kind}: 503 {problem} ({where})"] += 1
            if "retry-after" not in headers:
                tally.retry_after_missing += 1
                tally.failures.append(f"{label}: 503 without Retry-After")
        return
    if kind == "valid":
        if status != 200:
            tally.fail(f"{label}: {status} {content[:200]!r}")
            return
        sources = [s["source"] for series in body["series"] for s in series["slices"]]
        problems = []
        if body.get("patient_id") != patient:
            problems.append(f"patient_id {body.get('patient_id')} (sent {patient})")
        if body.get("request_id") != request_id:
            problems.append(f"request_id {body.get('request_id')}")
        if sorted(sources) != sorted(members):
            problems.append(f"slices {sources} (sent {members})")
        if problems:
            tally.fail(f"{label}: mixed up: " + "; ".join(problems))
            return
        with tally.lock:
            tally.outcomes["valid: 200"] += 1
            tally.valid_latency.append(elapsed)
            tally.slices_done += len(members)
            tally.diagnoses += 1
        return
    expected_status, expected_type = BROKEN[kind]
    problem = body.get("type", "").rsplit("/", 1)[-1]
    if (status, problem) != (expected_status, expected_type) or body.get(
        "request_id"
    ) != request_id:
        tally.fail(f"{label}: {status} {problem} (expected {expected_status} {expected_type})")
        return
    with tally.lock:
        tally.outcomes[f"{kind}: {status} {problem}"] += 1


def settle(sampler: RssSampler, seconds: float = 10.0) -> int:
    time.sleep(seconds)
    return sampler.rss()


def scan_log(log: Path, diagnoses: int) -> list[str]:
    problems, audits = [], 0
    for line in log.read_text(errors="replace").splitlines():
        if PLANTED in line or "LOAD-" in line:
            problems.append(f"patient data in the server log: {line[:200]}")
        if line.startswith("{"):
            entry = json.loads(line)
            audits += bool(entry.get("audit"))
    if audits != diagnoses:
        problems.append(f"{audits} audit lines for {diagnoses} diagnoses")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "var" / "models" / "default")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-queue-slices", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="load phases, memory after each")
    parser.add_argument(
        "--memory-slack-mib", type=float, default=256.0, help="allowed RSS above the start"
    )
    parser.add_argument(
        "--round-growth-mib", type=float, default=48.0, help="allowed RSS growth after round 1"
    )
    args = parser.parse_args()
    if not P002.is_dir():
        print(f"real CT fixtures not found at {P002}", file=sys.stderr)
        return 2
    args.model_dir = ensure_model(args.model_dir.resolve())
    port = free_port()
    base = f"http://{HOST}:{port}"
    log = Path(tempfile.mkdtemp(prefix="covidct-load-")) / "server.log"
    server = start_server(args, port, log)
    tally = Tally()
    try:
        t_start = time.monotonic()
        wait_healthy(server, port, log, timeout_s=300)
        print(f"server ready on {base} in {time.monotonic() - t_start:.0f} s; log {log}")
        broken = broken_uploads()
        sampler = RssSampler(server.pid)
        # Warm every path once (the allocator's pools, decoders) before the baseline.
        warm = Tally()
        for kind in ("valid", *BROKEN):
            client_loop_once(kind, base, port, warm, broken)
        rss_start = settle(sampler, 3.0)
        sampler.peak = rss_start
        sampler.start()
        wall, rss_rounds = 0.0, []
        for _ in range(args.rounds):  # memory after each: a leak grows, a plateau does not
            wall += run_clients(args, base, port, tally, broken, args.seconds / args.rounds)
            rss_rounds.append(settle(sampler, 5.0))
        rss_after = rss_rounds[-1]
        sampler.stop.set()
        healthy = requests.get(f"{base}/health", timeout=10).status_code == 200
    finally:
        end(server, timeout_s=60)
    tally.failures += scan_log(log, tally.diagnoses + warm.diagnoses)
    report(args, tally, wall, rss_start, sampler.peak, rss_after, healthy)
    growth = rss_rounds[-1] - rss_rounds[0]
    print("server RSS after each round: "
          + ", ".join(f"{r / 2**20:.0f}" for r in rss_rounds)
          + f" MiB ({growth / 2**20:+.0f} MiB from the first round to the last)")  # fmt: skip
    lost = tally.sent - tally.answered
    memory_ok = (
        rss_after - rss_start <= args.memory_slack_mib * 2**20
        and growth <= args.round_growth_mib * 2**20
    )
    ok = not tally.failures and lost == 0 and healthy and memory_ok
    print("RESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


def run_clients(
    args: argparse.Namespace,
    base: str,
    port: int,
    tally: Tally,
    broken: dict[str, bytes],
    seconds: float,
) -> float:
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=client_loop, args=(n, base, port, deadline, tally, broken))
        for n in range(args.clients)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0


def client_loop_once(
    kind: str, base: str, port: int, tally: Tally, broken: dict[str, bytes]
) -> None:
    """One request of one kind, checked like the load's (for warming up)."""
    files = sorted(P002.glob("*.dcm"))[60:63]
    request_id, patient = f"warm-{kind}", f"LOAD-WARM-{kind}"
    if kind == "oversized":
        status, headers, content = oversized(port, request_id)
        members: list[str] = []
    else:
        members = [f"{patient}/{PLANTED}_{p.name}" for p in files] if kind == "valid" else []
        archive = zip_files(list(zip(members, files, strict=True))) if members else broken[kind]
        r = requests.post(
            f"{base}/patients/diagnose",
            files={"file": ("a.zip", archive, "application/zip")},
            data={"patient_id": patient},
            headers={"X-Request-ID": request_id},
            timeout=300,
        )
        status, content = r.status_code, r.content
        headers = {k.lower(): v for k, v in r.headers.items()}
    check(kind, status, headers, content, request_id, patient, members, 0.0, tally)
    if tally.failures:
        raise RuntimeError(f"warm-up request failed: {tally.failures}")


def report(
    args: argparse.Namespace, tally: Tally, wall: float, start: int, peak: int, after: int,
    healthy: bool,
) -> None:  # fmt: skip
    mib = 2**20
    print(f"\n{args.clients} clients for {wall:.0f} s, queue {args.max_queue_slices} slices")
    print(f"requests: {tally.sent} sent, {tally.answered} answered, "
          f"{tally.sent - tally.answered} lost")  # fmt: skip
    for outcome, n in sorted(tally.outcomes.items()):
        print(f"  {n:6d}  {outcome}")
    if tally.valid_latency:
        lat = sorted(tally.valid_latency)
        p95 = lat[int(0.95 * (len(lat) - 1))]
        print(f"valid diagnoses: {tally.diagnoses}, {tally.slices_done} slices "
              f"({tally.slices_done / wall:.2f} slices/s); latency median "
              f"{statistics.median(lat):.2f} s, p95 {p95:.2f} s, max {lat[-1]:.2f} s")  # fmt: skip
    overloads = sum(n for k, n in tally.outcomes.items() if " 503 " in k)
    print(f"503 answers: {overloads}, without Retry-After: {tally.retry_after_missing}")
    print(f"server RSS: start {start / mib:.0f} MiB, peak {peak / mib:.0f} MiB, after "
          f"{after / mib:.0f} MiB ({(after - start) / mib:+.0f} MiB)")  # fmt: skip
    print(f"health after: {'200' if healthy else 'NOT 200'}")
    print(f"failures: {len(tally.failures)}")
    for failure in tally.failures[:20]:
        print("  ", failure)


if __name__ == "__main__":
    sys.exit(main())

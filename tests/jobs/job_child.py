"""A separate process for the job tests (started by conftest.Child; not a test module).

--mode worker: a JobWorker whose run prints `running <id> <attempt>` and then hangs, to
    be SIGKILLed mid-job.
--mode drain: prints `ready`, waits for a line on stdin, then claims and completes jobs
    until none is left, racing its siblings; prints `done <json list of the ids it
    completed>`.
--clock-offset: seconds added to this process's clock (a worker that starts after the
    previous one's lease has run out, without waiting for it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from app.jobs import JobsConfig, JobService, JobStore, JobWorker, UploadArea
from app.jobs.model import Job, JSONObject
from app.jobs.redis_store import RedisJobStore
from app.jobs.sqlite import SqliteJobStore


def open_store(args: argparse.Namespace) -> tuple[JobStore, JobsConfig]:
    def clock() -> float:
        return time.time() + args.clock_offset

    config = JobsConfig(
        data_dir=Path(args.data_dir),
        store_url=args.redis if args.kind == "redis" else "",
        lease_s=args.lease_s,
        poll_interval_s=0.05,
    )
    if args.kind == "redis":
        return RedisJobStore.from_url(args.redis, config, clock, prefix=args.prefix), config
    return SqliteJobStore(Path(args.sqlite), config, clock), config


def work(store: JobStore, config: JobsConfig) -> None:
    async def run(job: Job) -> JSONObject:
        print(f"running {job.id} {job.attempts}", flush=True)
        await asyncio.Event().wait()  # hangs until the process is killed
        return {}

    service = JobService(store, UploadArea(config.uploads_dir), config)
    worker = JobWorker(service, run, lambda: True, name=f"child-{os.getpid()}")
    asyncio.run(worker.serve(asyncio.Event()))


def drain(store: JobStore) -> None:
    print("ready", flush=True)
    sys.stdin.readline()
    completed = []
    while (job := store.claim(f"drain-{os.getpid()}")) is not None:
        assert job.lease_owner is not None
        if store.complete(job.id, job.lease_owner, {"by": os.getpid()}) is not None:
            completed.append(job.id)
    print("done " + json.dumps(completed), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["worker", "drain"], required=True)
    parser.add_argument("--kind", choices=["sqlite", "redis"], required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--sqlite", required=True)
    parser.add_argument("--redis", default="")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--lease-s", type=float, required=True)
    parser.add_argument("--clock-offset", type=float, default=0.0)
    args = parser.parse_args()
    store, config = open_store(args)
    if args.mode == "worker":
        work(store, config)
    else:
        drain(store)


if __name__ == "__main__":
    main()

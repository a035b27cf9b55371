"""The worker loop against both stores: back-pressure, outcomes, lease renewal and loss,
draining, and crash recovery with a worker process killed by SIGKILL mid-job."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from app.jobs import (
    MAX_ATTEMPTS,
    JobService,
    JobState,
    JobWorker,
    RunDeferred,
    StoreUnavailable,
    UploadArea,
    owner_for,
)
from app.jobs.model import Job, JSONObject

OWNER = owner_for("key-a")
WAIT_S = 60.0  # bound of every wait; never reached when all is well


def service_for(kit: Any, clock: Callable[[], float] = time.time, **config: Any) -> JobService:
    cfg = kit.config(**config)
    return JobService(kit.make(cfg, clock), UploadArea(cfg.uploads_dir), cfg)


def submit(service: JobService, n: int = 0, payload: bytes = b"zip") -> Job:
    return service.submit(owner=OWNER, source=io.BytesIO(payload), params={"n": n})


def returns(result: JSONObject) -> Callable[[Job], Awaitable[JSONObject]]:
    async def run(job: Job) -> JSONObject:
        return result

    return run


async def hang(job: Job) -> JSONObject:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_claims_only_when_the_inference_queue_has_room(kit: Any) -> None:
    service = service_for(kit)
    job = submit(service, payload=b"PK zip")
    room = False
    seen: list[bytes] = []

    async def run(claimed: Job) -> JSONObject:
        seen.append(service.uploads.path_of(claimed.upload_path).read_bytes())
        return {"diagnosis": "covid"}

    worker = JobWorker(service, run, lambda: room)

    async def scenario() -> tuple[bool, bool, bool]:
        nonlocal room
        without_room = await worker.run_once()
        room = True
        return without_room, await worker.run_once(), await worker.run_once()

    assert asyncio.run(scenario()) == (False, True, False)
    done = service.get(job.id, OWNER)
    assert done is not None and done.state is JobState.DONE and done.attempts == 1
    assert done.result == {"diagnosis": "covid"} and seen == [b"PK zip"]
    assert not service.uploads.path_of(job.upload_path).exists()  # deleted at the end


def test_a_failing_run_fails_the_job_once(kit: Any) -> None:
    service = service_for(kit)
    job = submit(service)

    async def run(claimed: Job) -> JSONObject:
        raise ValueError("not a zip")

    def describe(exc: BaseException) -> JSONObject:
        return {"type": "https://covidct.example/problems/not-a-zip", "status": 400}

    worker = JobWorker(service, run, lambda: True, describe_failure=describe)
    assert asyncio.run(worker.run_once()) is True
    failed = service.get(job.id, OWNER)
    assert failed is not None and failed.state is JobState.FAILED and failed.attempts == 1
    assert failed.problem == {"type": "https://covidct.example/problems/not-a-zip", "status": 400}
    assert asyncio.run(worker.run_once()) is False  # not retried
    assert not service.uploads.path_of(job.upload_path).exists()


def test_the_default_problem_does_not_repeat_the_exception_text(kit: Any) -> None:
    service = service_for(kit)
    job = submit(service)

    async def run(claimed: Job) -> JSONObject:
        raise RuntimeError("slice of patient DOE^JOHN unreadable")

    asyncio.run(JobWorker(service, run, lambda: True).run_once())
    failed = service.get(job.id, OWNER)
    assert failed is not None and failed.problem is not None
    assert failed.problem["status"] == 500 and failed.problem["type"].endswith("/internal")
    assert "DOE" not in str(failed.problem) and "RuntimeError" in failed.problem["detail"]


def test_a_result_that_is_not_json_fails_the_job(kit: Any) -> None:
    service = service_for(kit)
    job = submit(service)
    asyncio.run(JobWorker(service, returns({"p": float("nan")}), lambda: True).run_once())
    failed = service.get(job.id, OWNER)
    assert failed is not None and failed.state is JobState.FAILED


def test_a_deferred_run_goes_back_to_the_queue(kit: Any) -> None:
    service = service_for(kit)
    job = submit(service)

    async def run(claimed: Job) -> JSONObject:
        raise RunDeferred

    asyncio.run(JobWorker(service, run, lambda: True).run_once())
    back = service.get(job.id, OWNER)
    assert back is not None and back.state is JobState.QUEUED and back.attempts == 0
    assert service.uploads.path_of(job.upload_path).exists()


def test_the_lease_is_renewed_while_the_job_runs(kit: Any) -> None:
    service = service_for(kit, lease_s=30)
    job = submit(service)
    renewed = threading.Event()
    renew = service.store.renew

    def renew_and_tell(job_id: str, lease_owner: str) -> bool:
        ok = renew(job_id, lease_owner)
        if ok:
            renewed.set()
        return ok

    service.store.renew = renew_and_tell  # type: ignore[method-assign]
    lease_seen: list[float | None] = []

    async def run(claimed: Job) -> JSONObject:
        lease_seen.append(claimed.lease_expires_at)
        assert await asyncio.to_thread(renewed.wait, WAIT_S)
        lease_seen.append(service.store.peek(claimed.id).lease_expires_at)  # type: ignore[union-attr]
        return {"diagnosis": "normal"}

    asyncio.run(JobWorker(service, run, lambda: True, renew_every_s=0.01).run_once())
    assert lease_seen[0] is not None and lease_seen[1] is not None
    assert lease_seen[1] > lease_seen[0]
    done = service.get(job.id, OWNER)
    assert done is not None and done.state is JobState.DONE


def test_a_lost_lease_abandons_the_run(kit: Any, clock: Any) -> None:
    """The worker stalls past its lease: it stops the run and reports nothing; the job
    runs again elsewhere and ends once."""
    service = service_for(kit, clock, lease_s=30)
    job = submit(service)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def run(claimed: Job) -> JSONObject:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    worker = JobWorker(service, run, lambda: True, renew_every_s=0.01)

    async def scenario() -> None:
        turn = asyncio.create_task(worker.run_once())
        await asyncio.wait_for(started.wait(), WAIT_S)
        clock.advance(30)  # the lease runs out: the next renewal fails
        await asyncio.wait_for(turn, WAIT_S)

    asyncio.run(scenario())
    assert cancelled.is_set()
    stalled = service.store.peek(job.id)
    assert stalled is not None and stalled.state is JobState.RUNNING  # nothing reported
    replica = JobWorker(service, returns({"diagnosis": "covid"}), lambda: True)
    assert asyncio.run(replica.run_once()) is True  # requeued, then run again
    done = service.get(job.id, OWNER)
    assert done is not None and done.state is JobState.DONE and done.attempts == 2


def test_serve_runs_each_job_once_two_at_a_time(kit: Any) -> None:
    service = service_for(kit)
    jobs = [submit(service, n) for n in range(6)]
    runs: Counter[str] = Counter()
    active, peak = 0, 0
    two_running, all_ran = asyncio.Event(), asyncio.Event()

    async def run(job: Job) -> JSONObject:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        runs[job.id] += 1
        if active == 2:
            two_running.set()
        await asyncio.wait_for(two_running.wait(), WAIT_S)  # hangs unless two run at once
        active -= 1
        if sum(runs.values()) == len(jobs):
            all_ran.set()
        return {"n": job.params["n"]}

    worker = JobWorker(service, run, lambda: True, concurrency=2)

    async def scenario() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop, drain_timeout_s=WAIT_S))
        await asyncio.wait_for(all_ran.wait(), WAIT_S)
        stop.set()
        await asyncio.wait_for(serving, WAIT_S)

    asyncio.run(scenario())
    assert peak == 2 and runs == Counter({job.id: 1 for job in jobs})
    for job in jobs:
        done = service.get(job.id, OWNER)
        assert done is not None and done.state is JobState.DONE
        assert done.result == job.params


@pytest.mark.parametrize("drain_s", [0.0, WAIT_S])
def test_stopping_drains_or_gives_jobs_back(kit: Any, drain_s: float) -> None:
    """Stopping lets a running job finish within the drain timeout; past it, the job goes
    back to the queue with its attempt not counted."""
    service = service_for(kit)
    job = submit(service)
    started, finish = asyncio.Event(), asyncio.Event()

    async def run(claimed: Job) -> JSONObject:
        started.set()
        await finish.wait()
        return {"diagnosis": "normal"}

    worker = JobWorker(service, run, lambda: True)

    async def scenario() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop, drain_timeout_s=drain_s))
        await asyncio.wait_for(started.wait(), WAIT_S)
        stop.set()
        if drain_s:
            finish.set()
        await asyncio.wait_for(serving, WAIT_S)

    asyncio.run(scenario())
    after = service.get(job.id, OWNER)
    assert after is not None
    if drain_s:
        assert after.state is JobState.DONE
    else:
        assert after.state is JobState.QUEUED and after.attempts == 0


def test_a_sigkilled_worker_s_job_runs_again_and_ends_once(kit: Any, spawn: Any) -> None:
    config = kit.config(lease_s=30)
    service = JobService(kit.make(config), UploadArea(config.uploads_dir), config)
    job = submit(service, payload=b"PK study")
    child = spawn([*kit.child_args(config), "--mode", "worker"])
    assert child.expect("running ") == f"{job.id} 1"
    child.kill()  # SIGKILL mid-job
    orphaned = service.store.peek(job.id)
    assert orphaned is not None and orphaned.state is JobState.RUNNING
    assert orphaned.attempts == 1 and orphaned.lease_owner is not None

    # The service starts again; by its clock the dead worker's lease has run out.
    def later() -> float:
        return time.time() + config.lease_s + 1

    restarted = JobService(kit.make(config, later), UploadArea(config.uploads_dir), config)
    runs: list[tuple[str, int, bytes]] = []

    async def run(claimed: Job) -> JSONObject:
        upload = restarted.uploads.path_of(claimed.upload_path).read_bytes()
        runs.append((claimed.id, claimed.attempts, upload))
        return {"diagnosis": "covid"}

    worker = JobWorker(restarted, run, lambda: True, name="restarted")

    async def scenario() -> tuple[bool, bool]:
        await worker.start_up()
        return await worker.run_once(), await worker.run_once()

    assert asyncio.run(scenario()) == (True, False)
    assert runs == [(job.id, 2, b"PK study")]  # the upload survived the crash
    done = restarted.get(job.id, OWNER)
    assert done is not None and done.state is JobState.DONE and done.attempts == 2
    assert done.result == {"diagnosis": "covid"}
    assert done.lease_owner is not None and done.lease_owner.startswith("restarted/")
    # The dead worker's claim can never report it a second time.
    assert restarted.store.complete(job.id, orphaned.lease_owner, {"x": 1}) is None
    assert restarted.get(job.id, OWNER) == done


def test_a_job_whose_worker_is_killed_twice_fails_with_the_reason(kit: Any, spawn: Any) -> None:
    config = kit.config(lease_s=30)
    service = JobService(kit.make(config), UploadArea(config.uploads_dir), config)
    job = submit(service)
    first = spawn([*kit.child_args(config), "--mode", "worker"])
    assert first.expect("running ") == f"{job.id} 1"
    first.kill()
    offset = config.lease_s + 1  # the second worker starts after the first one's lease
    second = spawn([*kit.child_args(config), "--mode", "worker", "--clock-offset", str(offset)])
    assert second.expect("running ") == f"{job.id} 2"
    second.kill()

    def later() -> float:
        return time.time() + 2 * offset + 1  # after the second one's lease too

    restarted = JobService(kit.make(config, later), UploadArea(config.uploads_dir), config)
    runs: list[str] = []

    async def run(claimed: Job) -> JSONObject:
        runs.append(claimed.id)
        return {}

    worker = JobWorker(restarted, run, lambda: True)

    async def scenario() -> bool:
        await worker.start_up()
        return await worker.run_once()

    assert asyncio.run(scenario()) is False and runs == []
    failed = restarted.get(job.id, OWNER)
    assert failed is not None and failed.state is JobState.FAILED
    assert failed.attempts == MAX_ATTEMPTS
    assert failed.problem is not None and failed.problem["type"].endswith("/job-worker-lost")
    assert not restarted.uploads.path_of(job.upload_path).exists()


def test_serve_outlasts_an_unavailable_store(kit: Any) -> None:
    service = service_for(kit)
    job = submit(service)
    requeue = service.store.requeue_expired
    outages = [StoreUnavailable("down"), RuntimeError("bug")]

    def flaky(limit: int = 100) -> Any:
        if outages:
            raise outages.pop(0)
        return requeue(limit)

    service.store.requeue_expired = flaky  # type: ignore[method-assign]
    ran = asyncio.Event()

    async def run(claimed: Job) -> JSONObject:
        ran.set()
        return {"diagnosis": "normal"}

    worker = JobWorker(service, run, lambda: True)

    async def scenario() -> None:
        stop = asyncio.Event()
        serving = asyncio.create_task(worker.serve(stop, drain_timeout_s=WAIT_S))
        await asyncio.wait_for(ran.wait(), WAIT_S)
        stop.set()
        await asyncio.wait_for(serving, WAIT_S)

    asyncio.run(scenario())
    done = service.get(job.id, OWNER)
    assert outages == [] and done is not None and done.state is JobState.DONE


def test_an_end_whose_answer_was_lost_still_counts_as_ours(kit: Any) -> None:
    """The store ended the job but the answer never came back (a dropped connection):
    the worker finds the job ended under its own lease and cleans up after it."""
    service = service_for(kit)
    job = submit(service)
    complete = service.store.complete

    def complete_but_lose_the_answer(job_id: str, lease_owner: str, result: JSONObject) -> None:
        complete(job_id, lease_owner, result)

    service.store.complete = complete_but_lose_the_answer  # type: ignore[assignment]
    asyncio.run(JobWorker(service, returns({"diagnosis": "covid"}), lambda: True).run_once())
    done = service.get(job.id, OWNER)
    assert done is not None and done.state is JobState.DONE
    assert not service.uploads.path_of(job.upload_path).exists()

"""The worker loop: claim a job when the inference queue has room, run it, end it once.

One `JobWorker` per service process. It claims a job only when `has_room()` says the
inference queue can take one more (so jobs and synchronous requests share the batcher
and its back-pressure), runs the supplied `run(job)`, renews the job's lease while it
runs, and completes or fails it under that lease. When the lease is lost (the worker
stalled and another took the job over) the run is abandoned, never reported.

Housekeeping, on every turn of the loop: running jobs whose lease expired (their worker
crashed, was SIGKILLed, or hung) go back to the queue for their second attempt, or fail
with that reason after it; ended jobs past their expiry are deleted with their uploads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

from app.errors import PROBLEM_BASE
from app.jobs.callbacks import CallbackSender
from app.jobs.model import Job, JSONObject, job_ref
from app.jobs.service import JobService
from app.jobs.store import StoreUnavailable, encode_json

logger = logging.getLogger(__name__)

Run = Callable[[Job], Awaitable[JSONObject]]
DescribeFailure = Callable[[BaseException], JSONObject]
T = TypeVar("T")


class RunDeferred(Exception):
    """Raised by `run` to give the job back to the queue, its attempt not counted (the
    inference queue filled up between `has_room()` and the run, say)."""


def internal_problem(exc: BaseException) -> JSONObject:
    """The default problem for a failed run: no exception text (it might quote input)."""
    return {
        "type": PROBLEM_BASE + "internal",
        "title": "Internal error",
        "status": 500,
        "detail": f"the job failed ({type(exc).__name__})",
    }


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class JobWorker:
    def __init__(
        self,
        service: JobService,
        run: Run,
        has_room: Callable[[], bool],
        *,
        name: str | None = None,
        concurrency: int = 1,
        describe_failure: DescribeFailure = internal_problem,
        callbacks: CallbackSender | None = None,
        renew_every_s: float | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1. Received: {concurrency}")
        self.service = service
        self.store = service.store
        self.name = name or default_worker_name()
        self.concurrency = concurrency
        self._run = run
        self._has_room = has_room
        self._describe_failure = describe_failure
        self._callbacks = callbacks
        config = service.config
        self._renew_every_s = renew_every_s or config.lease_s / 3
        self._poll_s = config.poll_interval_s
        self._running: set[asyncio.Task[None]] = set()
        self._deliveries: set[asyncio.Task[bool]] = set()
        self._wake = asyncio.Event()

    # --- the loop -------------------------------------------------------------------

    def notify(self) -> None:
        """A job was queued here, or the inference queue has room again: look now."""
        self._wake.set()

    async def serve(self, stop: asyncio.Event, *, drain_timeout_s: float = 30.0) -> None:
        """Run until `stop` is set; then let running jobs finish for up to
        `drain_timeout_s`, and give the rest back to the queue."""
        started = False
        while not stop.is_set():
            self._wake.clear()
            try:
                if not started:  # retried on every turn until the store answers
                    await self.start_up()
                    started = True
                await self.housekeeping()
                await self._fill()
            except StoreUnavailable as e:
                logger.warning("job store unavailable", extra={"error": str(e)})
            except Exception:
                logger.exception("job worker turn failed")
            await _first(self._wake.wait(), stop.wait(), timeout=self._poll_s)
        await self.shut_down(drain_timeout_s)

    async def start_up(self) -> None:
        """Before the first claim: requeue or fail the jobs of workers that died, delete
        what expired and uploads left behind."""
        while await self.housekeeping():
            pass
        await asyncio.to_thread(self.service.sweep_uploads)

    async def housekeeping(self) -> bool:
        """One round of lease recovery and expiry; whether it found anything to do."""
        recovered = await asyncio.to_thread(self.store.requeue_expired)
        for job_id in recovered.requeued:
            logger.warning("job requeued after its worker was lost", extra={"job": job_ref(job_id)})
        for job in recovered.failed:
            logger.warning("job failed: its worker was lost twice", extra={"job": job_ref(job.id)})
            await self._ended(job)
        expired = await asyncio.to_thread(self.service.expire)
        return bool(recovered.requeued or recovered.failed or expired)

    async def _fill(self) -> None:
        while len(self._running) < self.concurrency and self._has_room():
            job = await asyncio.to_thread(self.store.claim, self.name)
            if job is None:
                return
            task = asyncio.create_task(self.process(job), name=f"job-{job_ref(job.id)}")
            self._running.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("job task failed", exc_info=task.exception())

    async def run_once(self) -> bool:
        """One turn without the loop (tests, scripts): housekeeping, then claim and run at
        most one job to its end. Whether a job ran."""
        await self.housekeeping()
        if not self._has_room():
            return False
        job = await asyncio.to_thread(self.store.claim, self.name)
        if job is None:
            return False
        await self.process(job)
        return True

    async def shut_down(self, drain_timeout_s: float) -> None:
        if self._running:
            await asyncio.wait(set(self._running), timeout=drain_timeout_s)
        for task in set(self._running):
            task.cancel()  # process() gives the job back to the queue
        await asyncio.gather(*self._running, return_exceptions=True)
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=drain_timeout_s)
        for delivery in set(self._deliveries):
            delivery.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)

    # --- one job --------------------------------------------------------------------

    async def process(self, job: Job) -> None:
        """Run a claimed job under its lease, then end it (once) or give it back."""
        lease = job.lease_owner
        if lease is None:
            raise ValueError("process() takes a claimed job. Received: a job with no lease")
        logger.info("job started", extra={"job": job_ref(job.id), "attempt": job.attempts})
        work = asyncio.ensure_future(self._run(job))
        try:
            if not await self._keep_lease(job.id, lease, work):
                logger.warning("job lease lost; run abandoned", extra={"job": job_ref(job.id)})
                return
        except asyncio.CancelledError:
            await _cancel(work)
            try:
                await asyncio.to_thread(self.store.release, job.id, lease)
            except StoreUnavailable:  # then its lease runs out and it is requeued
                logger.warning(
                    "job not given back: store unavailable", extra={"job": job_ref(job.id)}
                )
            else:
                logger.info("job given back to the queue", extra={"job": job_ref(job.id)})
            raise
        ended = await self._settle(job, lease, work)
        if ended is not None:
            await self._ended(ended)

    async def _keep_lease(self, job_id: str, lease: str, work: asyncio.Future[JSONObject]) -> bool:
        """Renew the lease until `work` is done; False (work cancelled) if it was lost."""
        while True:
            done, _ = await asyncio.wait({work}, timeout=self._renew_every_s)
            if done:
                return True
            try:
                renewed = await asyncio.to_thread(self.store.renew, job_id, lease)
            except StoreUnavailable:
                continue  # keep running: ending the job checks the lease anyway
            if not renewed:
                await _cancel(work)
                return False

    async def _settle(self, job: Job, lease: str, work: asyncio.Future[JSONObject]) -> Job | None:
        """Complete or fail the job from its run's outcome; the ended job, if this call
        ended it."""
        exc = work.exception() if not work.cancelled() else asyncio.CancelledError()
        if isinstance(exc, RunDeferred | asyncio.CancelledError):
            await asyncio.to_thread(self.store.release, job.id, lease)
            logger.info("job deferred", extra={"job": job_ref(job.id)})
            return None
        result: JSONObject = {}
        if exc is None:
            result = work.result()
            try:
                encode_json(result)
            except (TypeError, ValueError) as e:
                exc = e  # a result that isn't JSON fails the job
        ended: Job | None
        if exc is None:
            ended = await asyncio.to_thread(self.store.complete, job.id, lease, result)
        else:
            logger.warning(
                "job run failed", extra={"job": job_ref(job.id), "error": type(exc).__name__}
            )
            problem = self._describe_failure(exc)
            ended = await asyncio.to_thread(self.store.fail, job.id, lease, problem)
        if ended is None:
            # Not ended by this call: the lease was lost meanwhile, or this very call
            # succeeded and its answer was lost (then the job ended under our lease).
            current = await asyncio.to_thread(self.store.peek, job.id)
            if current is not None and current.state.ended and current.lease_owner == lease:
                return current
            logger.warning("job lease lost; result dropped", extra={"job": job_ref(job.id)})
        else:
            logger.info("job ended", extra={"job": job_ref(job.id), "state": ended.state.value})
        return ended

    async def _ended(self, job: Job) -> None:
        await asyncio.to_thread(self.service.ended, job)
        if job.callback_url is not None and self._callbacks is not None:
            delivery = asyncio.create_task(self._callbacks.deliver(job))
            self._deliveries.add(delivery)
            delivery.add_done_callback(self._deliveries.discard)

    async def wait_for_callbacks(self) -> None:
        """Until every callback started so far has been delivered or given up (tests)."""
        while self._deliveries:
            await asyncio.gather(*self._deliveries, return_exceptions=True)


async def _cancel(future: asyncio.Future[T]) -> None:
    """Cancel `future` and wait until it has stopped (its own outcome ignored)."""
    future.cancel()
    await asyncio.gather(future, return_exceptions=True)


async def _first(*waits: Awaitable[object], timeout: float) -> None:
    """Wait until the first of `waits` finishes, or `timeout` seconds."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()

"""One bounded queue of slices, cut into batches by one worker thread.

The inference engine (app/inference.py) and the explain queue (app/explain_queue.py) are
two policies over this batcher. A request hands in its n slices at once (`submit`, on the
running event loop) and gets the future of its per-slice outputs. The queue is bounded in
slices: a request that does not fit is refused with QueueFullError (Retry-After) before any
of its slices is queued, unless the queue is empty (a request larger than the bound then
runs alone). One worker thread cuts the queued slices, in arrival order, into batches of at
most `max_batch_size`, so that slices of concurrent requests share a model call; each
batch's outputs are written back slice by slice into their requests, and a request's future
is settled on its own event loop once all its slices have a result. A failing batch fails
the requests with slices in it and no other; a cancelled future drops its slices still
queued; `stop` lets the batch in progress finish and fails every request still queued with
ShuttingDownError.

What differs between queues is their `BatchPolicy`: how a batch is assembled from the parts
of requests and computed, where each request's results go and what it gets back, how long
a batch waits before it is cut (for more slices to fill it, or for another queue to empty),
its metrics and its wording.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np
from prometheus_client import Gauge, Histogram

from app.errors import QueueFullError, ShuttingDownError

logger = logging.getLogger(__name__)

P = TypeVar("P")  # what a request hands in: its slices, or where to read them
R = TypeVar("R")  # what it gets back

# Per-slice arrays, slice axis first: a batch's outputs, or where a request's results go.
Outputs = tuple[np.ndarray, ...]

# How often a batch waiting for another queue to empty looks at it again.
YIELD_POLL_S = 0.005


class Bounds(Protocol):
    """A queue's limits (BatchingConfig and ExplainConfig both carry them)."""

    @property
    def max_batch_size(self) -> int: ...  # slices per model call

    @property
    def max_queue_slices(self) -> int: ...  # slices waiting before requests are refused

    @property
    def retry_after_s(self) -> int: ...  # Retry-After of that refusal


@dataclass(frozen=True)
class Wording:
    """What a queue says: errors the requests get, and the log line of a failed batch."""

    stopped: str  # a request submitted after stop
    shut_down: str  # a request still queued at stop
    full: str  # a refused request; formatted with queued, adding and limit
    failed: str  # logged with the traceback of a failing batch


@dataclass(frozen=True)
class Meters:
    """The metrics a queue keeps; only the depth is required."""

    depth: Gauge  # slices queued or being computed
    queue_time: Histogram | None = None  # seconds a request waited for its first batch
    compute_time: Histogram | None = None  # seconds of one compute call
    batch_size: Histogram | None = None  # slices per compute call


@dataclass(eq=False)
class Job(Generic[P, R]):
    """One request's slices, consumed batch by batch in arrival order."""

    payload: P
    size: int  # its slices
    outputs: Outputs  # where their results are written, slice by slice
    future: asyncio.Future[R]
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.perf_counter)
    next_index: int = 0  # its next slice to put into a batch
    done: int = 0  # its slices with a result
    started: bool = False  # whether a batch has taken any of its slices

    @property
    def withdrawn(self) -> bool:
        """Cancelled by its caller (or settled): its slices still queued are dropped."""
        return self.future.done()


# Slices [start, stop) of a job, as one part of a batch.
Part = tuple[Job[P, R], int, int]


class BatchPolicy(ABC, Generic[P, R]):
    """What one queue does differently; a subclass sets the attributes and the four
    abstract methods, the batcher does the rest."""

    name: str  # the worker thread's
    wording: Wording
    meters: Meters
    fill_wait_s: float = 0.0  # how long a partial batch waits for more slices
    max_yield_s: float = 0.0  # how long a batch waits while `busy()` > 0

    @abstractmethod
    def outputs(self, payload: P, size: int) -> Outputs:
        """The arrays, slice axis first, that a request's results are written into."""

    @abstractmethod
    def assemble(self, parts: Sequence[Part[P, R]]) -> np.ndarray:
        """The batch of the parts' slices, in their order."""

    @abstractmethod
    def compute(self, batch: np.ndarray) -> Outputs:
        """The batch's per-slice outputs, one row per slice of the batch."""

    @abstractmethod
    def answer(self, outputs: Outputs) -> R:
        """What a request gets back, from the arrays its results were written into."""

    def busy(self) -> int:
        """Slices waiting in another queue that a batch lets go first (up to max_yield_s)."""
        return 0

    def prepare(self) -> None:
        """Run once in the worker thread before its first batch (a failure is logged)."""


class SliceBatcher(Generic[P, R]):
    """A bounded queue of requests' slices and the worker thread that computes them in
    batches, as its policy says."""

    def __init__(self, policy: BatchPolicy[P, R], bounds: Bounds) -> None:
        self.policy = policy
        self.bounds = bounds
        self._jobs: deque[Job[P, R]] = deque()
        self._queued = 0  # slices not yet finished, over all jobs
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=policy.name, daemon=True)

    @property
    def queued_slices(self) -> int:
        return self._queued

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress (waiting up to `timeout` s for it); every request
        still queued fails with ShuttingDownError, so that none waits for a stopped queue."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left, self._queued = list(self._jobs), 0
            self._jobs.clear()
            self.policy.meters.depth.set(0)
        for job in left:
            error = ShuttingDownError(self.policy.wording.shut_down)
            job.loop.call_soon_threadsafe(_reject, job.future, error)

    def submit(self, payload: P, size: int) -> asyncio.Future[R]:
        """Queue a request's `size` slices at once, on the running event loop; the future
        of its answer. Cancelling the future drops its slices still queued.

        Raises ShuttingDownError or QueueFullError (nothing queued) right away."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        outputs = self.policy.outputs(payload, size)
        if size == 0:
            future.set_result(self.policy.answer(outputs))
            return future
        job = Job(payload, size, outputs, future, loop)
        limit = self.bounds.max_queue_slices
        with self._cond:
            if self._stopping:
                raise ShuttingDownError(self.policy.wording.stopped)
            self._drop_withdrawn()  # requests withdrawn meanwhile make room at once
            if self._queued + size > limit and self._queued > 0:
                raise QueueFullError(
                    self.policy.wording.full.format(queued=self._queued, adding=size, limit=limit),
                    retry_after_s=self.bounds.retry_after_s,
                )
            self._jobs.append(job)
            self._queued += size
            self.policy.meters.depth.set(self._queued)
            self._cond.notify()
        return future

    # --- worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.policy.prepare()
        except Exception:  # the requests meet the same failure, each with its own answer
            logger.exception("preparing the worker failed", extra={"worker": self.policy.name})
        meters = self.policy.meters
        while (parts := self._next_batch()) is not None:
            try:
                batch = self.policy.assemble(parts)
                t0 = time.perf_counter()
                outputs = self.policy.compute(batch)
                seconds = time.perf_counter() - t0
                _check_rows(outputs, len(batch))
            except Exception as exc:  # a failing batch fails the requests in it only
                logger.exception(self.policy.wording.failed)
                self._finish(parts, None, exc)
                continue
            if meters.compute_time is not None:
                meters.compute_time.observe(seconds)
            if meters.batch_size is not None:
                meters.batch_size.observe(len(batch))
            self._finish(parts, outputs, None)

    def _next_batch(self) -> list[Part[P, R]] | None:
        """The next batch's parts, once the policy's waits are over; None once stopping."""
        with self._cond:
            while True:
                self._drop_withdrawn()
                if self._stopping:
                    return None
                if not self._available():
                    self._cond.wait()
                    continue
                self._wait_to_fill()
                self._yield()
                self._drop_withdrawn()
                if self._stopping:
                    return None
                parts = self._cut()
                if parts:  # else every request was withdrawn while the batch waited
                    return parts

    def _available(self) -> int:
        """Queued slices no batch has taken yet."""
        return sum(job.size - job.next_index for job in self._jobs)

    def _wait_to_fill(self) -> None:
        """Give a partial batch up to fill_wait_s to fill."""
        deadline = time.perf_counter() + self.policy.fill_wait_s
        while self._available() < self.bounds.max_batch_size and not self._stopping:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._cond.wait(remaining)
            self._drop_withdrawn()

    def _yield(self) -> None:
        """Wait while the policy's other queue is busy, up to max_yield_s (so that a
        steady load there cannot starve this one)."""
        deadline = time.perf_counter() + self.policy.max_yield_s
        while self.policy.busy() > 0 and not self._stopping and time.perf_counter() < deadline:
            self._cond.wait(YIELD_POLL_S)

    def _cut(self) -> list[Part[P, R]]:
        """Up to max_batch_size slices, from the requests in arrival order."""
        parts: list[Part[P, R]] = []
        room = self.bounds.max_batch_size
        for job in self._jobs:
            take = min(room, job.size - job.next_index)
            if take <= 0:
                continue
            if not job.started:
                job.started = True
                if self.policy.meters.queue_time is not None:
                    self.policy.meters.queue_time.observe(time.perf_counter() - job.enqueued_at)
            parts.append((job, job.next_index, job.next_index + take))
            job.next_index += take
            room -= take
            if room == 0:
                break
        return parts

    def _drop_withdrawn(self) -> None:
        for job in [j for j in self._jobs if j.withdrawn]:
            self._remove(job)
        self.policy.meters.depth.set(self._queued)

    def _remove(self, job: Job[P, R]) -> None:
        self._jobs.remove(job)
        self._queued -= job.size - job.done

    def _finish(
        self, parts: Sequence[Part[P, R]], outputs: Outputs | None, exc: Exception | None
    ) -> None:
        """Write a batch's outputs into its requests (or fail them with `exc`); settle
        each request whose last slice this was."""
        offset = 0
        with self._cond:
            for job, a, b in parts:
                rows = slice(offset, offset + b - a)
                offset += b - a
                if job.withdrawn or job not in self._jobs:  # cancelled, or stopped meanwhile
                    continue
                error = exc
                if outputs is not None:
                    try:
                        for into, out in zip(job.outputs, outputs, strict=True):
                            into[a:b] = out[rows]
                    except ValueError as e:  # outputs of another shape than the request's
                        error = e
                if error is not None:
                    self._remove(job)
                    job.loop.call_soon_threadsafe(_reject, job.future, error)
                    continue
                job.done += b - a
                self._queued -= b - a
                if job.done == job.size:
                    self._jobs.remove(job)
                    answer = self.policy.answer(job.outputs)
                    job.loop.call_soon_threadsafe(_resolve, job.future, answer)
            self.policy.meters.depth.set(self._queued)


def _check_rows(outputs: Outputs, rows: int) -> None:
    lengths = [len(out) for out in outputs]
    if any(n != rows for n in lengths):
        raise ValueError(
            f"every output must have one row per slice of the batch ({rows}). "
            f"Received: {lengths}"
        )


def _resolve(future: asyncio.Future[R], result: R) -> None:
    if not future.done():  # else cancelled meanwhile
        future.set_result(result)


def _reject(future: asyncio.Future[R], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)

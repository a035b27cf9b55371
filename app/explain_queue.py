"""The explain signature behind a queue of its own (app/explain.py uses it; docs/explain.md).

The queue is bounded in slices (a request that does not fit gets 503 queue-full) and one
worker thread cuts it into batches of at most `max_batch_size`. It yields to the
diagnosis queue: a batch starts only while the inference engine has no slice waiting, or
once it has waited `max_yield_ms` (so that a steady load of diagnoses cannot starve it).
Requests that did not ask for explanations are therefore slowed by at most one explain
batch, as they would be by another request's batch. The worker first explains a blank
slice, so that tracing the signature does not fall on the first request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from app import contract, metrics
from app.errors import QueueFullError, ShuttingDownError

logger = logging.getLogger(__name__)

# float32 [B, 512, 512, 1] stored values → (heatmap float32 [B, 512, 512] in [0, 1],
# empty bool [B]): the explain signature's map and its all-zero flag.
ExplainFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Heatmaps = tuple[np.ndarray, np.ndarray]

# How often a waiting explain batch looks at the diagnosis queue again.
_YIELD_POLL_S = 0.005


@dataclass(frozen=True)
class ExplainConfig:
    """The explain queue's bounds (built from the settings at start-up)."""

    max_slices: int = 16  # slices explained per request, the highest scores first
    max_batch_size: int = 8  # slices per call of the explain signature
    max_queue_slices: int = 64  # slices waiting before explain requests get 503
    retry_after_s: int = 5  # Retry-After of that 503
    max_yield_ms: float = 1000.0  # how long a batch waits for the diagnosis queue to empty

    def __post_init__(self) -> None:
        if min(self.max_slices, self.max_batch_size, self.max_queue_slices) < 1:
            raise ValueError(
                "max_slices, max_batch_size and max_queue_slices must be >= 1. Received: "
                f"{self.max_slices}, {self.max_batch_size}, {self.max_queue_slices}"
            )
        if self.retry_after_s < 1 or self.max_yield_ms < 0:
            raise ValueError(
                "retry_after_s must be >= 1 and max_yield_ms >= 0. Received: "
                f"{self.retry_after_s}, {self.max_yield_ms}"
            )


def saved_model_explain(predictor: object) -> ExplainFn | None:
    """The predictor's `explain` signature as an ExplainFn; None where the SavedModel has
    none, or one that breaks the contract (the model still serves, it cannot explain)."""
    fn = getattr(predictor, "explain_fn", None)
    if fn is None:
        return None
    try:
        contract.check_explain_signature(fn)
    except contract.ContractError as e:
        logger.warning("the model's explain signature is unusable", extra={"reason": str(e)})
        return None
    import tensorflow as tf

    device = str(getattr(predictor, "device", "/CPU:0"))

    def explain(batch: np.ndarray) -> Heatmaps:
        with tf.device(device):
            out = fn(**{contract.INPUT_NAME: tf.constant(batch, tf.float32)})
        heatmap = out[contract.OUTPUT_HEATMAP].numpy().astype(np.float32)
        empty = out[contract.OUTPUT_HEATMAP_EMPTY].numpy().astype(bool)
        return heatmap, empty

    return explain


@dataclass(eq=False)
class _Job:
    stack: np.ndarray  # [n, 512, 512] stored values
    future: asyncio.Future[Heatmaps]
    loop: asyncio.AbstractEventLoop
    next_index: int = 0
    done: int = 0
    heatmap: np.ndarray = field(init=False)
    empty: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.heatmap = np.zeros(self.stack.shape, dtype=np.float32)
        self.empty = np.zeros(len(self.stack), dtype=bool)


class ExplainQueue:
    """The explain signature behind its own bounded queue and worker thread."""

    def __init__(
        self,
        explain: ExplainFn,
        config: ExplainConfig | None = None,
        busy: Callable[[], int] = lambda: 0,
        *,
        warm_up: bool = False,
    ) -> None:
        self.explain_fn = explain
        self.warm_up = warm_up  # explain one blank slice first, in the worker thread
        self.config = config or ExplainConfig()
        self._busy = busy  # slices waiting for the diagnosis model
        self._jobs: deque[_Job] = deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="covidct-explain", daemon=True)

    @property
    def queued_slices(self) -> int:
        return self._queued

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress; the slices still queued fail with 503."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left, self._queued = list(self._jobs), 0
            self._jobs.clear()
            metrics.EXPLAIN_QUEUE_DEPTH.set(0)
        for job in left:
            error = ShuttingDownError("the service stopped before this request was explained")
            job.loop.call_soon_threadsafe(_settle, job.future, None, error)

    async def explain(self, stack: np.ndarray) -> Heatmaps:
        """(heatmap float32 [n, 512, 512], empty bool [n]) of a stack [n, 512, 512] of
        stored values. Raises QueueFullError or ShuttingDownError, queueing nothing."""
        future = self.submit(stack)
        try:
            return await future
        finally:
            if not future.done():  # the client went away: drop its slices
                future.cancel()

    def submit(self, stack: np.ndarray) -> asyncio.Future[Heatmaps]:
        """Queue a stack at once, on the running event loop; the future of its maps.
        Cancelling the future drops its slices still queued."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Heatmaps] = loop.create_future()
        if len(stack) == 0:
            future.set_result((np.zeros(stack.shape, np.float32), np.zeros(0, bool)))
            return future
        job = _Job(stack, future, loop)
        limit = self.config.max_queue_slices
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("the explain queue is stopped")
            if self._queued + len(stack) > limit and self._queued > 0:
                raise QueueFullError(
                    f"{self._queued} slices are waiting to be explained; this request adds "
                    f"{len(stack)} to a queue of at most {limit}",
                    retry_after_s=self.config.retry_after_s,
                )
            self._jobs.append(job)
            self._queued += len(stack)
            metrics.EXPLAIN_QUEUE_DEPTH.set(self._queued)
            self._cond.notify()
        return future

    # --- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        if self.warm_up:
            self._warm_up()
        while True:
            parts = self._next_batch()
            if parts is None:
                return
            batch = np.concatenate([job.stack[a:b] for job, a, b in parts]).astype(np.float32)
            try:
                heatmap, empty = self.explain_fn(batch[..., None])
            except Exception as exc:  # a failing batch fails its requests only
                logger.exception("explain call failed")
                self._finish(parts, None, exc)
                continue
            self._finish(parts, (heatmap, empty), None)

    def _warm_up(self) -> None:
        """Trace the signature and pick its kernels before the first request needs them
        (about 1 s and 190 MB once, measured: docs/explain.md), off the event loop."""
        size = contract.IMAGE_SIZE
        t0 = time.perf_counter()
        try:
            self.explain_fn(np.zeros((1, size, size, 1), np.float32))
        except Exception:  # the requests will fail the same way, each with its own answer
            logger.exception("explain warm-up failed")
            return
        logger.info("explain warm-up done", extra={"seconds": round(time.perf_counter() - t0, 2)})

    def _next_batch(self) -> list[tuple[_Job, int, int]] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._stopping:
                    return None
                if self._jobs:
                    break
                self._cond.wait()
            # Yield to the diagnosis queue, for at most max_yield_ms.
            deadline = time.perf_counter() + self.config.max_yield_ms / 1000.0
            while self._busy() > 0 and not self._stopping and time.perf_counter() < deadline:
                self._cond.wait(_YIELD_POLL_S)
            self._drop_cancelled()
            if self._stopping:
                return None
            parts, room = [], self.config.max_batch_size
            for job in self._jobs:
                take = min(room, len(job.stack) - job.next_index)
                if take > 0:
                    parts.append((job, job.next_index, job.next_index + take))
                    job.next_index += take
                    room -= take
                if room == 0:
                    break
            return parts

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._jobs if j.future.done()]:
            self._jobs.remove(job)
            self._queued -= len(job.stack) - job.done
        metrics.EXPLAIN_QUEUE_DEPTH.set(self._queued)

    def _finish(
        self,
        parts: list[tuple[_Job, int, int]],
        result: Heatmaps | None,
        exc: Exception | None,
    ) -> None:
        offset = 0
        with self._cond:
            for job, a, b in parts:
                n = b - a
                if job.future.done() or job not in self._jobs:
                    offset += n
                    continue
                if result is None:
                    self._jobs.remove(job)
                    self._queued -= len(job.stack) - job.done
                    job.loop.call_soon_threadsafe(_settle, job.future, None, exc)
                    continue
                job.heatmap[a:b] = result[0][offset : offset + n]
                job.empty[a:b] = result[1][offset : offset + n]
                offset += n
                job.done += n
                self._queued -= n
                if job.done == len(job.stack):
                    self._jobs.remove(job)
                    answer = (job.heatmap, job.empty)
                    job.loop.call_soon_threadsafe(_settle, job.future, answer, None)
            metrics.EXPLAIN_QUEUE_DEPTH.set(self._queued)


def _settle(
    future: asyncio.Future[Heatmaps], result: Heatmaps | None, exc: Exception | None
) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    elif result is not None:
        future.set_result(result)


def start_explain_queue(engine: object, config: ExplainConfig) -> ExplainQueue | None:
    """The running explain queue of an engine's model; None where it cannot explain."""
    explain = saved_model_explain(getattr(engine, "predictor", None))
    if explain is None:
        logger.info("the served model has no explain signature: explain=true answers 422")
        return None

    def busy() -> int:
        return int(getattr(engine, "queued_slices", 0))

    queue = ExplainQueue(explain, config, busy, warm_up=True)
    queue.start()
    return queue

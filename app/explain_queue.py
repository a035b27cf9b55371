"""The explain signature behind a queue of its own (app/explain.py uses it; docs/explain.md).

The queue is bounded in slices (a request that does not fit gets 503 queue-full) and one
worker thread cuts it into batches of at most `max_batch_size`. It yields to the
diagnosis queue: a batch starts only while the inference engine has no slice waiting, or
once it has waited `max_yield_ms` (so that a steady load of diagnoses cannot starve it).
Requests that did not ask for explanations are therefore slowed by at most one explain
batch, as they would be by another request's batch. The batching itself is the shared
batcher's (app/batching.py); this module is its policy for the explain signature.

The signature is traced lazily: the first explain request pays it (about 1 s and 190 MB
once, docs/explain.md), so a service that is never asked for explanations never does.
`ExplainQueue(..., warm_up=True)` explains a blank slice in the worker thread first instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from app import contract, metrics
from app.batching import BatchPolicy, Meters, Part, SliceBatcher, Wording

logger = logging.getLogger(__name__)

# float32 [B, 512, 512, 1] stored values → (heatmap float32 [B, 512, 512] in [0, 1],
# empty bool [B]): the explain signature's map and its all-zero flag.
ExplainFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
Heatmaps = tuple[np.ndarray, np.ndarray]


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


class _Explaining(BatchPolicy[np.ndarray, Heatmaps]):
    """The batcher's policy for the explain signature: a batch first yields to the
    diagnosis queue; a slice's result is its map and its all-zero flag."""

    name = "covidct-explain"
    wording = Wording(
        stopped="the explain queue is stopped",
        shut_down="the service stopped before this request was explained",
        full="{queued} slices are waiting to be explained; this request adds {adding} "
        "to a queue of at most {limit}",
        failed="explain call failed",
    )
    meters = Meters(depth=metrics.EXPLAIN_QUEUE_DEPTH)

    def __init__(
        self, explain: ExplainFn, config: ExplainConfig, busy: Callable[[], int], warm_up: bool
    ) -> None:
        self.explain_fn = explain
        self.max_yield_s = config.max_yield_ms / 1000.0
        self._busy = busy
        self._warm_up = warm_up

    def outputs(self, payload: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
        return np.zeros(payload.shape, np.float32), np.zeros(size, bool)

    def assemble(self, parts: Sequence[Part[np.ndarray, Heatmaps]]) -> np.ndarray:
        stacks = [job.payload[a:b] for job, a, b in parts]
        return np.concatenate(stacks).astype(np.float32)[..., None]

    def compute(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return self.explain_fn(batch)

    def answer(self, outputs: tuple[np.ndarray, ...]) -> Heatmaps:
        heatmap, empty = outputs
        return heatmap, empty

    def busy(self) -> int:
        return self._busy()

    def prepare(self) -> None:
        """With warm_up: trace the signature and pick its kernels before the first request
        (about 1 s and 190 MB once, measured: docs/explain.md)."""
        if not self._warm_up:
            return
        size = contract.IMAGE_SIZE
        t0 = time.perf_counter()
        self.explain_fn(np.zeros((1, size, size, 1), np.float32))
        logger.info("explain warm-up done", extra={"seconds": round(time.perf_counter() - t0, 2)})


class ExplainQueue:
    """The explain signature behind its own bounded queue and worker thread
    (app/batching.py)."""

    def __init__(
        self,
        explain: ExplainFn,
        config: ExplainConfig | None = None,
        busy: Callable[[], int] = lambda: 0,
        *,
        warm_up: bool = False,
    ) -> None:
        self.explain_fn = explain
        self.config = config or ExplainConfig()
        # busy: slices waiting for the diagnosis model. warm_up: explain one blank slice
        # first, in the worker thread, before the first request.
        policy = _Explaining(explain, self.config, busy, warm_up)
        self._batcher = SliceBatcher(policy, self.config)

    @property
    def queued_slices(self) -> int:
        return self._batcher.queued_slices

    def start(self) -> None:
        self._batcher.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress; the slices still queued fail with 503."""
        self._batcher.stop(timeout)

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
        return self._batcher.submit(stack, len(stack))


def start_explain_queue(engine: object, config: ExplainConfig) -> ExplainQueue | None:
    """The running explain queue of an engine's model; None where it cannot explain."""
    explain = saved_model_explain(getattr(engine, "predictor", None))
    if explain is None:
        logger.info("the served model has no explain signature: explain=true answers 422")
        return None

    def busy() -> int:
        return int(getattr(engine, "queued_slices", 0))

    # No warm-up: the first explain request traces the signature (docs/explain.md), so a
    # service nobody asks for explanations does not pay for it.
    queue = ExplainQueue(explain, config, busy)
    queue.start()
    return queue

"""Stage 3: the resident SavedModel and the dynamic batcher in front of it.

One model is loaded once (GPU with memory growth where present, else CPU) and warmed up.
Requests hand a series and the indices of the slices to score to `InferenceEngine.predict`
(or `submit`): the series is never copied. The engine is a policy over the shared batcher
(app/batching.py): one worker thread cuts the queued slices into batches of at most
`max_batch_size`, so slices of concurrent requests share model calls, waiting at most
`max_queue_delay_ms` for a partial batch to fill; each batch is written slice by slice,
straight from the series, into one float32 buffer that every model call reuses. The queue
is bounded in slices: a request that does not fit is refused (503, Retry-After) before any
of its slices is queued. A failing model call fails the requests in its batch only. The
event loop only awaits a future; decode and inference never run on it.

The service relies on the SavedModel contract alone (app/contract.py), never on models/.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from app import contract, metrics
from app.batching import BatchPolicy, Meters, Part, SliceBatcher, Wording

logger = logging.getLogger(__name__)

FROZEN_WEIGHTS_ENV = "TF_ONEDNN_ASSUME_FROZEN_WEIGHTS"
Device = Literal["auto", "cpu", "gpu"]


@dataclass(frozen=True)
class BatchingConfig:
    """The dynamic batcher's bounds. `warmup_sizes`: batch sizes run once at start (graph
    and kernel selection per shape); None: every size from 1 to max_batch_size."""

    max_batch_size: int = 8  # slices per model call
    max_queue_delay_ms: float = 5.0  # how long a partial batch waits for more slices
    max_queue_slices: int = 2048  # slices waiting before new requests are refused (503)
    retry_after_s: int = 5  # Retry-After of that 503
    warmup_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1. Received: {self.max_batch_size}")
        if self.max_queue_delay_ms < 0 or self.max_queue_slices < 1 or self.retry_after_s < 1:
            raise ValueError(
                "max_queue_delay_ms must be >= 0, max_queue_slices and retry_after_s >= 1. "
                f"Received: {self.max_queue_delay_ms}, {self.max_queue_slices}, "
                f"{self.retry_after_s}"
            )
        sizes = self.warmup_sizes or range(1, self.max_batch_size + 1)
        kept = tuple(sorted({s for s in sizes if 1 <= s <= self.max_batch_size}))
        object.__setattr__(self, "warmup_sizes", kept)


@dataclass(frozen=True)
class ModelConfig:
    """Which SavedModel to serve, where, and how requests reach it."""

    model_dir: Path
    device: Device = "auto"  # 'auto' (first GPU, else CPU), 'cpu' or 'gpu'
    gpu_memory_growth: bool = True  # allocate GPU memory as needed, not all at start
    mixed_precision: bool = False  # bfloat16 (CPU) / float16 (GPU) compute where supported
    batching: BatchingConfig = field(default_factory=BatchingConfig)


class Predictor(Protocol):
    """float32 [B, 512, 512, 1] stored values → covid probability float32 [B]."""

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


def configure_devices(device: str = "auto", *, memory_growth: bool = True) -> str:
    """Pick the TensorFlow device string; must run before TensorFlow touches a GPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if device == "cpu" or not gpus:
        if device == "gpu":
            raise RuntimeError("device=gpu was asked for, but TensorFlow sees no GPU")
        return "/CPU:0"
    if memory_growth:
        # Allocate GPU memory as needed instead of all of it at start, so a sidecar
        # (or a second replica on a large card) can share the GPU.
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:  # already initialised: keep what was set
                logger.warning("GPU memory growth could not be set (GPU already initialised)")
    return "/GPU:0"


def enable_mixed_precision(device: str) -> str:
    """Let grappler rewrite the fp32 graph to reduced precision: float16 on GPU, bf16 on CPU."""
    import tensorflow as tf

    option = "auto_mixed_precision" if "GPU" in device else "auto_mixed_precision_onednn_bfloat16"
    tf.config.optimizer.set_experimental_options({option: True})
    return option


class SavedModelPredictor:
    """The served SavedModel: float32 [B, 512, 512, 1] stored values → covid probability [B]."""

    def __init__(self, model_dir: str | Path, device: str = "/CPU:0") -> None:
        import tensorflow as tf

        self._tf = tf
        self.device = device
        self.model_dir = Path(model_dir)
        self.card = contract.read_card(self.model_dir)
        with tf.device(device):
            self._loaded = tf.saved_model.load(str(self.model_dir))
        self._fn = self._loaded.signatures[contract.SIGNATURE_KEY]
        contract.check_signature(self._fn)
        # An export whose card and graph disagree about the input's preprocessing (e.g. an
        # old export that divided each slice by its maximum) computes another function.
        contract.check_preprocessing(self._fn, self.card)
        # The optional `explain` signature (Grad-CAM; app/explain.py checks and calls it).
        self.explain_fn: Any = self._loaded.signatures.get(contract.EXPLAIN_SIGNATURE_KEY)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1:] != (contract.IMAGE_SIZE, contract.IMAGE_SIZE, 1):
            raise ValueError(f"batch must be [B, 512, 512, 1]. Received: shape={batch.shape}")
        with self._tf.device(self.device):
            out = self._fn(**{contract.INPUT_NAME: self._tf.constant(batch, self._tf.float32)})
        probabilities: np.ndarray = out[contract.OUTPUT_COVID].numpy().astype(np.float32)
        return probabilities


@dataclass(frozen=True)
class _Slices:
    """A request's slices: read by index from its series, never copied."""

    stack: np.ndarray  # uint16 or float [N, H, W]: the request's series
    indices: np.ndarray  # integers [n]: which of its slices to score, in this order


class _Scoring(BatchPolicy[_Slices, np.ndarray]):
    """The batcher's policy for the model: partial batches wait for more slices, each
    batch is written into one reused float32 buffer, a slice's result is its probability."""

    name = "covidct-inference"
    wording = Wording(
        stopped="the inference engine is stopped",
        shut_down="the service stopped before this request was scored",
        full="{queued} slices are waiting; this request adds {adding} "
        "to a queue of at most {limit}",
        failed="model call failed",
    )
    meters = Meters(
        depth=metrics.INFERENCE_QUEUE_DEPTH,
        queue_time=metrics.INFERENCE_QUEUE_TIME,
        compute_time=metrics.INFERENCE_COMPUTE_TIME,
        batch_size=metrics.INFERENCE_BATCH_SIZE,
    )

    def __init__(self, predictor: Predictor, config: BatchingConfig) -> None:
        self.predictor = predictor
        self.max_batch_size = config.max_batch_size
        self.fill_wait_s = config.max_queue_delay_ms / 1000.0
        self._buffer: np.ndarray | None = None  # float32 [max_batch_size, H, W, 1], reused

    def outputs(self, payload: _Slices, size: int) -> tuple[np.ndarray, ...]:
        return (np.full(size, np.nan, dtype=np.float32),)

    def assemble(self, parts: Sequence[Part[_Slices, np.ndarray]]) -> np.ndarray:
        """The batch [n, H, W, 1] float32: each slice written from its series into the
        reused buffer (uint16 → float32 is exact), without an intermediate copy."""
        n = sum(b - a for _, a, b in parts)
        shape = parts[0][0].payload.stack.shape[1:]
        buffer = self._buffer
        if buffer is None or buffer.shape[1:3] != shape or len(buffer) < n:
            size = max(n, self.max_batch_size)
            buffer = self._buffer = np.empty((size, *shape, 1), dtype=np.float32)
        batch = buffer[:n]
        row = 0
        for job, a, b in parts:
            for i in job.payload.indices[a:b]:
                np.copyto(batch[row, ..., 0], job.payload.stack[i])
                row += 1
        return batch

    def compute(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return (np.asarray(self.predictor(batch)),)

    def answer(self, outputs: tuple[np.ndarray, ...]) -> np.ndarray:
        return outputs[0]


class InferenceEngine:
    """Dynamic batching over one predictor, in one worker thread (app/batching.py)."""

    def __init__(self, predictor: Predictor, config: BatchingConfig | None = None) -> None:
        self.predictor = predictor
        self.config = config or BatchingConfig()
        self._batcher = SliceBatcher(_Scoring(predictor, self.config), self.config)

    @property
    def card(self) -> contract.ModelCard:
        card = getattr(self.predictor, "card", None)
        if not isinstance(card, contract.ModelCard):
            raise AttributeError("this engine's predictor carries no model card")
        return card

    @property
    def queued_slices(self) -> int:
        return self._batcher.queued_slices

    @property
    def uses_host_cpu(self) -> bool:
        """Whether the model computes on this host's CPU cores (its predictor's device is a
        CPU, or unknown), where decoding competes with it for the same cores."""
        device = getattr(self.predictor, "device", None)
        return device is None or "CPU" in str(device).upper()

    def start(self) -> None:
        self._batcher.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the model call in progress; every slice still queued fails its request
        with ShuttingDownError (503), so that no request waits for a stopped engine."""
        self._batcher.stop(timeout)

    def warm_up(self) -> dict[int, float]:
        """Run each warm-up batch size once (graph tracing, kernel selection); returns
        seconds per size."""
        seconds = {}
        for size in self.config.warmup_sizes or ():
            t0 = time.perf_counter()
            self.predictor(
                np.zeros((size, contract.IMAGE_SIZE, contract.IMAGE_SIZE, 1), np.float32)
            )
            seconds[size] = time.perf_counter() - t0
        logger.info("warm-up done", extra={"seconds_by_batch_size": seconds})
        return seconds

    async def predict(self, stack: np.ndarray, indices: np.ndarray | None = None) -> np.ndarray:
        """Covid probability [n] of the slices `indices` (default: all) of a stack
        [N, 512, 512] of stored values, in the order of `indices`."""
        future = self.submit(stack, indices)
        try:
            return await future
        finally:
            if not future.done():  # cancelled by the client going away: drop its slices
                future.cancel()

    def submit(
        self, stack: np.ndarray, indices: np.ndarray | None = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue the slices `indices` (default: all) of `stack` [N, H, W] at once, on the
        running event loop, and return the future of their probabilities float32 [n];
        cancelling the future drops its slices still queued. The stack is read, never
        copied, until the future is done: the caller must not change it meanwhile.

        Raises ShuttingDownError or QueueFullError (nothing queued) right away."""
        if stack.ndim != 3:
            raise ValueError(f"stack must be [N, H, W]. Received: shape={stack.shape}")
        if indices is None:
            indices = np.arange(len(stack))
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise ValueError(f"indices must be 1-D integers. Received: {indices.dtype}")
        if indices.size and (indices.min() < 0 or indices.max() >= len(stack)):
            raise ValueError(f"indices must lie in [0, {len(stack)}). Received: out of range")
        return self._batcher.submit(_Slices(stack, indices), len(indices))


def load_engine(config: ModelConfig) -> InferenceEngine:
    """Load, check and warm the model the config names; blocking (run it off the loop).

    Also lets oneDNN keep its reordered copy of each convolution kernel instead of
    reordering the weights on every call (~25 % faster at batch 1 on a CPU). That is only
    right in a process whose weights never change once used: a kernel caches the first
    weights it sees, and eager Keras reuses one kernel for every convolution of the same
    shape, so a process that trains or compares models must set the variable to 0 first.
    """
    os.environ.setdefault(FROZEN_WEIGHTS_ENV, "1")
    device = configure_devices(config.device, memory_growth=config.gpu_memory_growth)
    if config.mixed_precision:
        logger.info("reduced precision enabled", extra={"option": enable_mixed_precision(device)})
    t0 = time.perf_counter()
    predictor = SavedModelPredictor(config.model_dir, device)
    logger.info(
        "model loaded", extra={"seconds": round(time.perf_counter() - t0, 2), "device": device}
    )
    engine = InferenceEngine(predictor, config.batching)
    engine.warm_up()
    return engine

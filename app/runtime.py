"""The service's life around its engine: the model runtime's states and the graceful shutdown.

    loading → ready | refused | failed      the model loads (and warms) in the background
    any of them → draining → stopped        SIGTERM: readiness 503 at once, no new work,
                                            the requests in flight finished, then exit

`/health` answers 200 in `ready` only. Draining takes at most `drain_timeout_s`: what is
still in flight then fails with 503 (shutting-down) instead of holding the exit back.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from app import metrics
from app.contract import ModelCard
from app.dicomweb import StowConfig
from app.explain_queue import ExplainConfig, ExplainQueue, start_explain_queue
from app.guard import Door, GuardConfig
from app.inference import InferenceEngine, ModelConfig, load_engine
from app.ingest import DecodePool
from app.jobs import JobsConfig
from app.pipeline import PipelineConfig
from app.reports.push import PushConfig

logger = logging.getLogger(__name__)

State = Literal["loading", "ready", "refused", "failed", "draining", "stopped"]
EngineLoader = Callable[[ModelConfig], InferenceEngine]


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the running service needs, built once at start-up (app/settings.py)."""

    model: ModelConfig
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    allow_untrained: bool = True  # False: an untrained model keeps readiness at 503
    decode_workers: int = 2  # processes decoding DICOM pixel data (0: in the request's thread)
    drain_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may take
    jobs: JobsConfig = field(default_factory=lambda: JobsConfig(data_dir=Path("var/jobs")))
    job_workers: int = 1  # jobs one replica runs at once
    stow: StowConfig = field(default_factory=StowConfig)  # POST /studies
    explain: ExplainConfig = field(default_factory=ExplainConfig)  # explain=true overlays
    audit_key: bytes | None = field(default=None, repr=False)  # HMAC key of patient pseudonyms
    results_push: PushConfig = field(default_factory=PushConfig)  # DICOM results over STOW-RS


class Runtime:
    """The model, the decode pool and the door of one running service, and their state."""

    def __init__(self, config: ServiceConfig, loader: EngineLoader = load_engine) -> None:
        self.config = config
        self.loader = loader
        self.engine: InferenceEngine | None = None
        # The engine while requests may use it: from ready, through draining (the requests
        # let in before the door closed finish on it), until stop.
        self.serving: InferenceEngine | None = None
        # The model's explain queue (app/explain.py), started with the engine; None: the
        # served model has no explain signature.
        self.explainer: ExplainQueue | None = None
        # Its workers start with the model (before ready), so that the first upload does
        # not pay their start; shared by all requests.
        workers = config.decode_workers
        self.decode_pool = DecodePool(workers) if workers else None
        self.door = Door()  # diagnose requests in progress (app/guard.py counts them)
        # Run with the door's wait when a drain begins (the job worker: running jobs get
        # the drain timeout, then go back to the queue); each returns within the timeout.
        self.drain_hooks: list[Callable[[], Awaitable[object]]] = []
        self.state: State = "loading"
        self.detail = "loading and warming the model"

    @property
    def card(self) -> ModelCard | None:
        return self.engine.card if self.engine else None

    async def load(self) -> None:
        try:
            engine = await asyncio.to_thread(self.loader, self.config.model)
        except Exception as exc:
            logger.exception("model failed to load")
            self._set("failed", f"model failed to load: {type(exc).__name__}")
            return
        self.engine = engine
        card = engine.card
        device = str(getattr(engine.predictor, "device", "?"))
        metrics.MODEL_INFO.labels(card.name, card.version, card.weights_source, device).set(1)
        if self.state != "loading":  # a shutdown began while the model was loading
            return
        if card.untrained and not self.config.allow_untrained:
            self._set(
                "refused",
                "the model's weights are untrained and COVIDCT_ALLOW_UNTRAINED is false",
            )
            logger.error("refusing readiness: untrained weights")
            return
        engine.start()
        self.explainer = start_explain_queue(engine, self.config.explain)
        await self._start_decode_pool()
        self.serving = engine
        self._set("ready", "model loaded and warm")
        metrics.MODEL_READY.set(1)
        logger.info("ready", extra={"weights_source": card.weights_source})

    async def _start_decode_pool(self) -> None:
        """Start the decode workers before ready. Should they fail to start, the service is
        ready all the same: the first upload starts the pool again, and decodes in its own
        thread should it break (slower, still right)."""
        if self.decode_pool is None:
            return
        try:
            await asyncio.to_thread(self.decode_pool.start)
        except Exception as exc:
            logger.warning(
                "decode workers did not start: the first upload starts them again",
                extra={"error": type(exc).__name__},
            )

    def begin_drain(self) -> None:
        """Readiness 503 and the door closed, at once."""
        if self.state in ("draining", "stopped"):
            return
        self.state, self.detail = "draining", "shutting down: finishing the requests in flight"
        self.door.closed = True
        metrics.MODEL_READY.set(0)

    async def drain(self) -> bool:
        """Drain: wait (at most drain_timeout_s) until every diagnose request let in has its
        answer. On time-out the engine stops, so the rest fail with 503 instead of waiting.
        True when everything in flight finished."""
        self.begin_drain()
        timeout = self.config.drain_timeout_s
        logger.info("draining", extra={"in_flight": self.door.in_progress, "timeout_s": timeout})
        hooks = asyncio.gather(*(hook() for hook in self.drain_hooks), return_exceptions=True)
        drained = await self.door.close_and_wait(timeout)
        if drained:
            logger.info("drained")
        else:
            logger.warning("drain timed out", extra={"in_flight": self.door.in_progress})
            if self.engine is not None:
                await asyncio.to_thread(self.engine.stop)
        await hooks
        return drained

    def stop(self) -> None:
        metrics.MODEL_READY.set(0)
        self.serving = None
        if self.engine is not None:
            self.engine.stop()
        if self.explainer is not None:
            self.explainer.stop()
        if self.decode_pool is not None:
            self.decode_pool.shutdown()
        self._set("stopped", "the service has stopped")

    def _set(self, state: State, detail: str) -> None:
        # A shutdown that began while the model was loading keeps its state.
        if self.state in ("draining", "stopped") and state != "stopped":
            return
        self.state, self.detail = state, detail


@contextmanager
def drain_on_sigterm(runtime: Runtime) -> Iterator[None]:
    """While the block runs, SIGTERM drains the runtime and then asks the server to exit.

    Needs the process's main thread, where uvicorn runs the application; elsewhere (a
    TestClient's thread) it does nothing. A second SIGTERM while draining is ignored;
    SIGINT (Ctrl-C) stays the server's: it stops at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)  # uvicorn's: Server.handle_exit
    draining: set[asyncio.Task[None]] = set()

    def on_sigterm() -> None:
        if runtime.state in ("draining", "stopped"):
            return
        runtime.begin_drain()
        task = loop.create_task(_drain_then_exit(runtime, previous))
        draining.add(task)
        task.add_done_callback(draining.discard)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


async def _drain_then_exit(runtime: Runtime, previous: Any) -> None:
    await runtime.drain()
    server = getattr(previous, "__self__", None)
    if hasattr(server, "should_exit"):
        # uvicorn: set the flag its SIGTERM handler sets. It then shuts down as after the
        # signal (lifespan end included) but exits 0: a SIGTERM it had caught itself would
        # be raised again once it stopped, ending the process by the signal.
        server.should_exit = True  # type: ignore[union-attr]
        return
    # Another server: hand it the signal, to stop its own way.
    signal.signal(signal.SIGTERM, previous)
    signal.raise_signal(signal.SIGTERM)

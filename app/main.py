"""Wires the service together: settings, model runtime, routes, problem handlers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__, metrics
from app.api import router
from app.contract import ModelCard
from app.decode_pool import DecodePool
from app.guard import UploadGuardMiddleware
from app.inference import InferenceEngine, load_engine
from app.logs import configure_logging
from app.problems import RequestContextMiddleware, install_problem_handlers
from app.settings import Settings, get_settings

logger = logging.getLogger(__name__)
EngineLoader = Callable[[Settings], InferenceEngine]


class Runtime:
    """The model's life: loading → ready | refused | failed, then stopped."""

    def __init__(self, settings: Settings, loader: EngineLoader) -> None:
        self.settings = settings
        self.loader = loader
        self.engine: InferenceEngine | None = None
        # Started on the first upload; shared by all requests.
        self.decode_pool = DecodePool(settings.decode_workers) if settings.decode_workers else None
        self.state = "loading"
        self.detail = "loading and warming the model"

    @property
    def card(self) -> ModelCard | None:
        return self.engine.card if self.engine else None

    async def load(self) -> None:
        try:
            engine = await asyncio.to_thread(self.loader, self.settings)
        except Exception as exc:
            logger.exception("model failed to load")
            self.state, self.detail = "failed", f"model failed to load: {type(exc).__name__}"
            return
        self.engine = engine
        card = engine.card
        metrics.MODEL_INFO.labels(
            card.name, card.version, card.weights_source, getattr(engine.predictor, "device", "?")
        ).set(1)
        if card.untrained and not self.settings.allow_untrained:
            self.state = "refused"
            self.detail = "the model's weights are untrained and COVIDCT_ALLOW_UNTRAINED is false"
            logger.error("refusing readiness: untrained weights")
            return
        engine.start()
        self.state, self.detail = "ready", "model loaded and warm"
        metrics.MODEL_READY.set(1)
        logger.info("ready", extra={"weights_source": card.weights_source})

    def stop(self) -> None:
        metrics.MODEL_READY.set(0)
        if self.engine is not None:
            self.engine.stop()
        if self.decode_pool is not None:
            self.decode_pool.shutdown()
        self.state = "stopped"


def create_app(settings: Settings | None = None, loader: EngineLoader = load_engine) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background so /health/live answers (and /health says 503) meanwhile.
        task = asyncio.create_task(app.state.runtime.load())
        yield
        await asyncio.shield(task) if not task.done() else None
        app.state.runtime.stop()

    app = FastAPI(
        title="covidct",
        version=__version__,
        summary="COVID-19 diagnosis from a patient's chest CT series (Rahimzadeh et al. 2021)",
        lifespan=lifespan,
    )
    app.state.runtime = Runtime(settings, loader)
    app.dependency_overrides[get_settings] = lambda: settings
    app.include_router(router)
    install_problem_handlers(app)
    # API key, upload size and concurrency, checked before the diagnose body is read;
    # inside the request-context middleware, so its answers carry the request id.
    app.add_middleware(UploadGuardMiddleware, settings=lambda: settings)
    app.add_middleware(RequestContextMiddleware)
    return app


def app_factory() -> FastAPI:
    """uvicorn entry point: `uvicorn --factory app.main:app_factory`."""
    settings = get_settings()
    configure_logging(settings.log_level)
    return create_app(settings)

"""Wires the service together: settings → stage configs, runtime, routes, problem handlers.

uvicorn entry point: `uvicorn --factory app.main:app_factory`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from app import __version__
from app.api import router
from app.guard import UploadGuardMiddleware
from app.inference import load_engine
from app.ingest import configure_libraries
from app.job_runner import JobsRuntime
from app.jobs_api import router as jobs_router
from app.logs import configure_logging
from app.problems import RequestContextMiddleware, install_problem_handlers
from app.runtime import EngineLoader, Runtime, drain_on_sigterm
from app.settings import Settings, get_settings


def create_app(settings: Settings | None = None, loader: EngineLoader = load_engine) -> FastAPI:
    """The service; `loader` loads the engine from its ModelConfig (tests pass their own)."""
    config = (settings or get_settings()).service_config()
    runtime = Runtime(config, loader)
    jobs = JobsRuntime(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_libraries()
        # Load in the background so /health/live answers (and /health says 503) meanwhile.
        loading = asyncio.create_task(runtime.load())
        # The job store, its worker and the STOW-RS flusher; the worker stops with a drain.
        await jobs.start()
        with drain_on_sigterm(runtime):
            yield
        await jobs.stop()  # running jobs finish or go back to the queue
        if not loading.done():
            await asyncio.shield(loading)
        runtime.stop()

    # Swagger UI and ReDoc from the installed package's assets, not a CDN: hospital networks
    # are often closed to the internet. No online validator badge either (it would send the
    # OpenAPI document to an outside host).
    app = FastAPIOffline(
        title="covidct",
        version=__version__,
        summary="COVID-19 diagnosis from a patient's chest CT series (Rahimzadeh et al. 2021)",
        lifespan=lifespan,
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.runtime = runtime  # reached by the routes through app.api.get_runtime only
    app.state.jobs = jobs  # reached by the routes through app.jobs_api.get_jobs only
    app.include_router(router)
    app.include_router(jobs_router)
    install_problem_handlers(app)
    # API key, upload size, shutdown and concurrency, checked before an upload's body is
    # read (diagnose, jobs, STOW-RS); inside the request-context middleware, so its answers
    # carry the request id.
    app.add_middleware(UploadGuardMiddleware, config=config.guard, door=runtime.door)
    app.add_middleware(RequestContextMiddleware)
    return app


def app_factory() -> FastAPI:
    """uvicorn entry point: `uvicorn --factory app.main:app_factory`."""
    settings = get_settings()
    configure_logging(settings.log_level)
    return create_app(settings)

"""The asynchronous side of one service process: the job store, the worker that runs jobs
through the same pipeline as POST /patients/diagnose, and the studies STOW-RS receives.

Started and stopped by the app's lifespan (app/main.py); the routes (app/jobs_api.py)
reach it through `app.state.jobs`. A job runs only while the model is ready and the
inference queue has room (`has_room`), so jobs and synchronous requests share the dynamic
batcher and its back-pressure. On a graceful shutdown (SIGTERM) the worker stops with the
drain: running jobs get the drain timeout, then go back to the queue, and queued jobs and
pending studies stay on disk or in the store for the next start (docs/jobs.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from app import errors, metrics
from app.diagnose_document import diagnose_to_document, log_diagnosis_audit
from app.dicomweb import (
    InstanceOutcome,
    PendingStudies,
    PendingStudy,
    ReceivedPart,
    StowReceiver,
    StowRequest,
    StudyLimits,
)
from app.domain import PatientResult, Study
from app.explain import Explanations
from app.jobs import (
    CallbackRefused,
    CallbackSender,
    DeleteOutcome,
    Job,
    JobService,
    JobState,
    JobWorker,
    QueueFull,
    RunDeferred,
    StoreUnavailable,
    UploadTooLarge,
    open_service,
)
from app.jobs.model import JSONObject, job_ref, valid_job_id
from app.jobs.worker import internal_problem
from app.reports.from_result import SliceOverlay
from app.reports.job_results import make_job_results
from app.reports.push import PushOutcome, push_results
from app.reports.store import ResultFiles
from app.runtime import Runtime
from app.schemas import JobOut

logger = logging.getLogger(__name__)

_GAUGE_EVERY_S = 1.0  # job counts by state, read from the store at most this often
_SWEEP_EVERY_S = 600.0  # parts and index entries left behind
MAX_WAIT_S = 60.0  # GET /jobs/{id}?wait=: the longest a request may wait for the job's end


def describe_failure(exc: BaseException) -> JSONObject:
    """The problem a failed job ends with: the service's own problem for its failures (the
    same `type` and detail as the synchronous route), else an internal error."""
    if isinstance(exc, errors.CovidCTError):
        return {
            "type": exc.type_uri,
            "title": exc.title,
            "status": exc.status,
            "detail": exc.detail,
        }
    return internal_problem(exc)


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """The job layer's refusals as the service's errors (problem+json)."""
    try:
        yield
    except QueueFull as e:
        raise errors.QueueFullError(
            f"the job queue is full ({e.reason})", retry_after_s=e.retry_after_s
        ) from e
    except UploadTooLarge as e:
        raise errors.UploadTooLargeError(
            f"the upload exceeds the job upload budget of {e.limit_bytes} bytes"
        ) from e
    except CallbackRefused as e:
        raise errors.InvalidRequestError(f"callback_url: {e}") from e
    except StoreUnavailable as e:
        raise errors.JobStoreUnavailableError("the job store did not answer; retry later") from e


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobView:
    """A job as a route sees it: in the store, or a study STOW-RS is still receiving."""

    job: Job | None = None
    receiving: PendingStudy | None = None
    dicom: JSONObject | None = None  # a done job's DICOM results manifest, when kept

    @property
    def ended(self) -> bool:
        return self.job is not None and self.job.state.ended

    def out(self) -> JobOut:
        if self.job is None:
            study = self.receiving
            assert study is not None
            created = _iso(study.created_at)
            return JobOut(
                id=study.job_id,
                state="queued",
                source="stow",
                receiving=True,
                instances=study.instances,
                created_at=created or "",
                updated_at=_iso(study.last_at) or "",
                expires_at=None,
                attempts=0,
                diagnosis=None,
                problem=None,
                dicom=None,
            )
        job = self.job
        source = job.params.get("source", "upload")
        problem = None
        if job.problem is not None:
            keys = ("type", "title", "status", "detail")
            problem = {k: job.problem.get(k) for k in keys}
        return JobOut.model_validate(
            {
                "id": job.id,
                "state": job.state.value,
                "source": source if source in ("upload", "stow") else "upload",
                "created_at": _iso(job.created_at),
                "updated_at": _iso(job.updated_at),
                "expires_at": _iso(job.expires_at),
                "attempts": job.attempts,
                "diagnosis": job.result if job.state is JobState.DONE else None,
                "problem": problem,
                "dicom": self.dicom if job.state is JobState.DONE else None,
            }
        )


class JobsRuntime:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        config = runtime.config
        self.config = config.jobs
        self.service: JobService | None = None
        self.worker: JobWorker | None = None
        self.studies: PendingStudies | None = None
        self.receiver: StowReceiver | None = None
        self.results: ResultFiles | None = None  # the DICOM results of finished jobs
        ingest = config.pipeline.ingest
        self.study_limits = StudyLimits(
            max_instances=ingest.max_members,
            max_bytes=min(ingest.max_uncompressed_bytes, self.config.upload_budget_bytes),
            max_frames=ingest.max_slices_total,
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting_for_room = False  # a run found the inference queue full
        self._gauges_at = 0.0
        self._swept_at = 0.0

    # --- life --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, start the worker and the pending-study flusher. A store that
        can't be opened leaves the routes answering 503 (logged), the service up."""
        self._stop = asyncio.Event()
        try:
            self.service = await asyncio.to_thread(open_service, self.config)
            self.studies = PendingStudies(
                self.config.data_dir / "stow",
                self.study_limits,
                quiet_s=self.runtime.config.stow.quiet_s,
            )
            self.results = ResultFiles(self.config.data_dir / "dicom-results")
            self.service.forget_hooks.append(self.results.delete)
        except Exception as e:
            logger.error("job store could not be opened", extra={"error": type(e).__name__})
            return
        self.receiver = StowReceiver(
            self.studies, self.runtime.config.pipeline.ingest, self._submitted
        )
        self.worker = JobWorker(
            self.service,
            self.run,
            self.has_room,
            concurrency=self.runtime.config.job_workers,
            describe_failure=describe_failure,
            callbacks=CallbackSender(self.config),
        )
        drain_s = self.runtime.config.drain_timeout_s
        self._tasks = [
            asyncio.create_task(self.worker.serve(self._stop, drain_timeout_s=drain_s)),
            asyncio.create_task(self._flush_loop()),
        ]
        if self.drain not in self.runtime.drain_hooks:
            self.runtime.drain_hooks.append(self.drain)
        logger.info("jobs started", extra={"store": self.config.store_description()})

    async def drain(self) -> None:
        """Stop taking jobs: running ones get the drain timeout, then go back to the queue."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        await self.drain()
        if self.service is not None:
            await asyncio.to_thread(self.service.store.close)

    # --- the worker's side -------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether a job may start: the model is ready and the inference queue has room.
        After a run found the queue full, not until the queue has emptied."""
        engine = self.runtime.serving
        if self.runtime.state != "ready" or engine is None:
            return False
        queued = engine.queued_slices
        if self._waiting_for_room:
            if queued > 0:
                return False
            self._waiting_for_room = False
        return queued < engine.config.max_queue_slices

    async def run(self, job: Job) -> JSONObject:
        """One job through the pipeline of POST /patients/diagnose: its diagnosis document."""
        engine = self.runtime.serving
        if engine is None or self.service is None:
            raise RunDeferred("the model is not serving")
        metrics.JOB_QUEUE_WAIT.observe(max(0.0, job.updated_at - job.created_at))
        params = job.params
        path = self.service.uploads.path_of(job.upload_path)
        t0, outcome = time.perf_counter(), "failed"
        explain = bool(params.get("explain"))
        explanations: Explanations | None = None
        try:
            with path.open("rb") as upload:
                diagnosed = await diagnose_to_document(
                    upload,
                    self.runtime,
                    engine,
                    threshold=params.get("threshold"),
                    explainer=self.runtime.explainer if explain else None,
                    request_id=str(params.get("request_id") or job.id),
                    patient_id=str(params.get("patient_id", "")),
                )
            study, result, out = diagnosed.study, diagnosed.result, diagnosed.out
            explanations = diagnosed.explanations
            outcome = "done"
        except (errors.QueueFullError, errors.ShuttingDownError) as e:
            # The inference queue filled up meanwhile, or the engine stopped for a shutdown:
            # the job goes back to the queue, its attempt not counted.
            self._waiting_for_room = isinstance(e, errors.QueueFullError)
            outcome = "deferred"
            raise RunDeferred(type(e).__name__) from e
        except asyncio.CancelledError:
            outcome = "deferred"  # a shutdown: the worker gives the job back
            raise
        finally:
            metrics.JOB_RUN_TIME.labels(outcome).observe(time.perf_counter() - t0)
        log_diagnosis_audit(logger, out, self.runtime, engine, job=job_ref(job.id))
        await self._keep_dicom_results(job, study, result, explain, explanations)
        return out.model_dump(mode="json")

    async def _keep_dicom_results(
        self,
        job: Job,
        study: Study,
        result: PatientResult,
        explain: bool,
        explanations: Explanations | None,
    ) -> None:
        """Build the job's DICOM results (in a worker thread) and keep them with the job
        (docs/dicom-results.md). A failure here is logged and leaves the diagnosis alone."""
        engine, files = self.runtime.serving, self.results
        if engine is None or files is None:
            return
        overlays = None
        if explanations is not None:
            overlays = [SliceOverlay(s.series, s.index, s.overlay_png) for s in explanations.slices]
        card = engine.card
        try:
            made = await asyncio.to_thread(
                make_job_results,
                study,
                result,
                card,
                job_id=job.id,
                explain=explain,
                overlays=overlays,
            )
            await asyncio.to_thread(files.write, job.id, made.parts, made.manifest)
        except Exception as e:  # never quotes values: the type only
            logger.error(
                "dicom results not kept", extra={"job": job_ref(job.id), "error": type(e).__name__}
            )
            return
        push = self.runtime.config.results_push
        if push.enabled and made.parts:
            if made.manifest.get("derived_uids"):
                # stand-in UIDs name no study the PACS holds: pushed, they would make one
                pushed = PushOutcome("skipped", 0, "the source had no valid DICOM UIDs")
            else:
                try:
                    pushed = await asyncio.to_thread(push_results, made.parts, push)
                except Exception as e:  # a bug or an unreadable part: the job still ends done
                    pushed = PushOutcome("failed", 0, type(e).__name__)
            await asyncio.to_thread(files.update_manifest, job.id, push=pushed.as_json())
        logger.info(
            "dicom results kept", extra={"job": job_ref(job.id), "objects": len(made.parts)}
        )

    # --- the routes' side --------------------------------------------------------------

    def _service(self) -> JobService:
        if self.service is None:
            raise errors.JobStoreUnavailableError("the job store could not be opened")
        return self.service

    def _studies(self) -> tuple[PendingStudies, StowReceiver]:
        if self.studies is None or self.receiver is None:
            raise errors.JobStoreUnavailableError("the job store could not be opened")
        return self.studies, self.receiver

    def check_accepting(self) -> None:
        """Jobs are taken while the model loads or serves; not once it failed or was
        refused (no replica like this one would run them), nor while draining."""
        state = self.runtime.state
        if state in ("draining", "stopped"):
            raise errors.ShuttingDownError("this replica takes no new work")
        if state not in ("loading", "ready"):
            raise errors.NotReadyError(f"model state: {state}")

    async def submit(
        self,
        *,
        owner: str,
        source: BinaryIO,
        params: JSONObject,
        callback_url: str | None,
        size_hint: int | None,
    ) -> Job:
        service = self._service()
        with store_errors():
            job = await asyncio.to_thread(
                service.submit,
                owner=owner,
                source=source,
                params=params,
                callback_url=callback_url,
                size_hint=size_hint,
            )
        metrics.JOBS_SUBMITTED.labels("upload").inc()
        if self.worker is not None:
            self.worker.notify()
        return job

    def _view(self, job_id: str, owner: str) -> JobView | None:
        """Blocking. The pending study first: a flush queues its job before it clears the
        study, so a job is always found in one place or the other."""
        studies, _ = self._studies()
        if not valid_job_id(job_id):
            return None
        study = studies.get(job_id)
        if study is not None and secrets.compare_digest(study.owner, owner):
            return JobView(receiving=study)
        job = self._service().get(job_id, owner)
        if job is None:
            return None
        dicom = None
        if job.state is JobState.DONE and self.results is not None:
            dicom = self.results.manifest(job_id)
        return JobView(job=job, dicom=dicom)

    async def dicom_objects(self, job_id: str, owner: str) -> list[bytes]:
        """A done job's DICOM results as Part 10 files (SR, key images, overlays).
        Raises NotFoundError, JobNotDoneError or NoDicomSourceError."""
        view = await self.view(job_id, owner)
        if view is None:
            raise errors.NotFoundError("no such job (or it has expired)")
        if view.job is None or view.job.state is not JobState.DONE:
            state = "receiving" if view.job is None else view.job.state.value
            raise errors.JobNotDoneError(f"the job is {state}; DICOM results follow a diagnosis")
        manifest, files = view.dicom, self.results
        if manifest is None or files is None:
            raise errors.NoDicomSourceError("no DICOM results were kept for this job")
        if manifest.get("source") == "none":
            raise errors.NoDicomSourceError(
                "the upload held no DICOM series to report on (TIFF only, or a TIFF series "
                "decided the diagnosis): DICOM results need a DICOM source"
            )
        if manifest.get("source") != "dicom":
            raise errors.NoDicomSourceError(str(manifest.get("problem") or "no DICOM results"))
        return await asyncio.to_thread(lambda: list(files.objects(job_id)))

    async def view(self, job_id: str, owner: str, *, wait_s: float = 0.0) -> JobView | None:
        """The job, or None (not found for this owner). `wait_s`: wait up to that long for
        a job that has not ended to end (polling the store)."""
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while True:
            with store_errors():
                view = await asyncio.to_thread(self._view, job_id, owner)
            left = deadline - time.monotonic()
            if view is None or view.ended or left <= 0 or self._stop.is_set():
                return view
            await asyncio.sleep(min(self.config.poll_interval_s, left))

    async def views_of_study(self, owner: str, study_uid: str) -> list[JobView]:
        studies, _ = self._studies()
        ids = await asyncio.to_thread(studies.jobs_of, owner, study_uid)
        found = []
        for job_id in ids:
            view = await self.view(job_id, owner)
            if view is not None:
                found.append(view)
        return found

    async def delete(self, job_id: str, owner: str) -> DeleteOutcome:
        studies, _ = self._studies()
        if await asyncio.to_thread(studies.cancel, job_id, owner):
            return DeleteOutcome.DELETED
        with store_errors():
            deleted = await asyncio.to_thread(self._service().delete, job_id, owner)
        return deleted.outcome

    async def check_stow_room(self, size_hint: int) -> None:
        """Refuse a STOW-RS request early when the job bounds leave no room: the studies
        being received count as pending jobs, their bytes against the upload budget."""
        service = self._service()
        studies, _ = self._studies()

        def check() -> None:
            if size_hint > self.config.upload_budget_bytes:
                raise UploadTooLarge(self.config.upload_budget_bytes)
            count, held = studies.usage()
            usage = service.store.usage()
            if usage.pending + count >= self.config.max_queued_jobs:
                raise service.store.queue_full("jobs")
            if usage.pending_bytes + held + size_hint > self.config.upload_budget_bytes:
                raise service.store.queue_full("bytes")

        with store_errors():
            await asyncio.to_thread(check)

    async def store_instances(
        self, parts: list[ReceivedPart], request: StowRequest
    ) -> list[InstanceOutcome]:
        _, receiver = self._studies()
        with store_errors():
            outcomes = await asyncio.to_thread(receiver.accept_all, parts, request)
        stored = sum(o.accepted for o in outcomes)
        metrics.STOW_INSTANCES.labels("stored").inc(stored)
        metrics.STOW_INSTANCES.labels("failed").inc(len(outcomes) - stored)
        return outcomes

    def new_part(self) -> tuple[Path, BinaryIO]:
        studies, _ = self._studies()
        return studies.new_part()

    # --- pending studies ---------------------------------------------------------------

    def _submitted(self, job_id: str) -> bool:
        return self._service().store.peek(job_id) is not None

    def _submit_study(self, study: PendingStudy, source: BinaryIO, size: int) -> None:
        params: JSONObject = {
            "patient_id": study.patient_id or study.study_uid,
            "threshold": None,
            "request_id": study.request_id,
            "source": "stow",
            "study_instance_uid": study.study_uid,
        }
        self._service().submit(
            owner=study.owner, source=source, params=params, size_hint=size, job_id=study.job_id
        )
        metrics.JOBS_SUBMITTED.labels("stow").inc()

    def flush_due(self) -> int:
        """Queue every pending study that has been quiet long enough; how many. Blocking."""
        studies, _ = self._studies()
        flushed = 0
        for study in studies.due():
            try:
                if studies.flush(study.job_id, self._submit_study, self._submitted):
                    flushed += 1
            except (QueueFull, StoreUnavailable) as e:
                logger.info("stow: study kept for later", extra={"reason": type(e).__name__})
                break
            except UploadTooLarge:  # the limits changed since it was received
                ref = {"job": job_ref(study.job_id)}
                logger.error("stow: study over the upload budget dropped", extra=ref)
                studies.cancel(study.job_id, study.owner)
            except Exception:
                ref = {"job": job_ref(study.job_id)}
                logger.exception("stow: study could not be queued", extra=ref)
        return flushed

    def _housekeeping(self) -> None:
        """Blocking: the job gauges, and now and then the sweep of leftovers."""
        now = time.monotonic()
        studies, _ = self._studies()
        if now - self._gauges_at >= _GAUGE_EVERY_S:
            self._gauges_at = now
            usage = self._service().store.usage()
            for state in JobState:
                metrics.JOBS.labels(state.value).set(getattr(usage, state.value))
            metrics.JOBS.labels("receiving").set(studies.usage()[0])
        if now - self._swept_at >= _SWEEP_EVERY_S:
            self._swept_at = now
            studies.sweep(keep_jobs_s=self.config.result_ttl_s)
            if self.results is not None:
                store = self._service().store
                self.results.sweep(lambda job_id: store.peek(job_id) is not None)

    async def _flush_loop(self) -> None:
        """Pending studies become jobs once quiet: at start-up (those left by the last run)
        and then every fraction of the quiet period."""
        every = self.runtime.config.stow.flush_every_s
        while not self._stop.is_set():
            try:
                if await asyncio.to_thread(self.flush_due) and self.worker is not None:
                    self.worker.notify()
                await asyncio.to_thread(self._housekeeping)
            except StoreUnavailable as e:
                logger.warning("job store unavailable", extra={"error": str(e)})
            except Exception:
                logger.exception("stow flush round failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every)

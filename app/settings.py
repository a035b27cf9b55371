"""Validated settings, read from COVIDCT_* environment variables (or a .env file).

Read once at start-up and turned into each stage's own small frozen config
(`service_config()`); no stage module imports this one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, cast

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.diagnosis import PatientRule
from app.dicomweb import StowConfig
from app.explain_queue import ExplainConfig
from app.guard import GuardConfig
from app.inference import BatchingConfig, Device, ModelConfig
from app.ingest import IngestLimits, decode_workers_or_auto
from app.jobs import JobsConfig
from app.pipeline import PipelineConfig
from app.reports.push import PushConfig
from app.runtime import ServiceConfig
from app.selection import SelectionRule


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COVIDCT_", env_file=".env", extra="ignore")

    # --- model ---------------------------------------------------------------
    model_dir: Path = Field(default=Path("var/models/default"), description="SavedModel directory")
    allow_untrained: bool = Field(
        default=True,
        description="Report ready while the served weights are untrained. Set false in "
        "production: /health then stays 503 with an untrained model.",
    )
    device: str = Field(default="auto", description="'auto' (first GPU, else CPU), 'cpu' or 'gpu'")
    gpu_memory_growth: bool = Field(
        default=True, description="allocate GPU memory as needed instead of all of it at start"
    )
    max_batch_size: int = Field(
        default=8,
        ge=1,
        le=256,
        description="slices per model call (dynamic batching across requests)",
    )
    max_queue_delay_ms: float = Field(
        default=5.0, ge=0, le=1000, description="how long a partial batch waits for more slices"
    )
    max_queue_slices: int = Field(
        default=2048, ge=1, description="slices waiting for the model before new requests get 503"
    )
    retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After of a 503 queue-full answer"
    )
    warmup_batch_sizes: list[int] | None = Field(
        default=None,
        description="batch sizes run once at start (graph and kernel selection per shape); "
        "default: every size from 1 to max_batch_size, since dynamic batching uses them all",
    )
    mixed_precision: bool = Field(default=False, description="bfloat16 compute where supported")

    # --- the paper's method ----------------------------------------------------
    dark_value: int = Field(default=300, description="stored value under which a pixel is air/lung")
    roi_rows: tuple[int, int] = Field(default=(240, 340), description="the paper's ROI rows (y)")
    roi_cols: tuple[int, int] = Field(default=(120, 370), description="the paper's ROI columns (x)")
    threshold_divisor: float = Field(
        default=1.5,
        gt=0,
        description="selected when count > (max - min) / divisor (the paper: 1.5)",
    )
    min_lung_pixels: int = Field(
        default=500,
        ge=0,
        description="a series whose largest dark-pixel count is below this has no open "
        "lung to judge and is 'indeterminate' (the ROI holds 25,000 pixels)",
    )
    patient_threshold: float = Field(default=0.1, ge=0, le=1, description="the paper's t")

    # --- input limits ------------------------------------------------------------
    max_upload_bytes: int = Field(
        default=1024 * 1024 * 1024,
        ge=1,
        description="request body of POST /patients/diagnose (the zip and the form fields); "
        "counted while it streams in, and refused with 413 as soon as it is exceeded",
    )
    decode_workers: Annotated[int, BeforeValidator(decode_workers_or_auto)] = Field(
        default=None,
        validate_default=True,
        ge=0,
        le=256,
        description="processes that decode DICOM pixel data, shared by all requests; unset "
        "(or 'auto'): one per core this process may use (its CPU affinity and its cgroup's "
        "CPU quota, not the host's core count), at most 64; 0: each request decodes in its "
        "own thread, one slice at a time across requests (the decoders hold the GIL)",
    )
    max_concurrent_uploads: int = Field(
        default=8,
        ge=1,
        description="diagnose requests in progress at once (upload, decode, inference); more "
        "are answered 503 queue-full with Retry-After before their body is read",
    )
    max_members: int = Field(
        default=5000, ge=1, description="files in the zip (folders not counted)"
    )
    max_uncompressed_bytes: int = Field(
        default=4 * 1024 * 1024 * 1024,
        ge=1,
        description="what the zip's members declare, all together; also bounds the decoded "
        "slices (2 bytes a pixel). Checked before anything is decompressed",
    )
    max_compression_ratio: float = Field(
        default=200.0,
        gt=1,
        description="uncompressed / compressed size, per member over 1 MiB and for the whole "
        "archive: zip bombs expand ~1000-fold, CT data 1- to 10-fold",
    )
    max_slices_per_series: int = Field(
        default=2000, ge=1, description="also frames / pages per file"
    )
    max_slices_total: int = Field(default=4000, ge=1, description="over all series of one upload")

    # --- access and logs -----------------------------------------------------------
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted in the X-API-Key header of POST /patients/diagnose (a JSON "
        "list in COVIDCT_API_KEYS); empty: no key needed (the local development default)",
    )
    audit_hash_key: SecretStr | None = Field(
        default=None,
        description="secret of the HMAC-SHA256 that pseudonymises patient ids in the audit log; "
        "unset: a random key per process (hashes then correlate within one run only). Set "
        "it, and keep it secret, to correlate audit lines across restarts and replicas",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR")

    # --- shutdown ------------------------------------------------------------------
    drain_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="on SIGTERM: readiness turns 503 and new diagnose requests get 503 at "
        "once; the requests in flight get this long to finish (the rest then fail with 503), "
        "then the process exits 0. Keep a pod's terminationGracePeriodSeconds above it",
    )

    # --- explanations (explain=true; docs/explain.md) ------------------------------
    explain_max_slices: int = Field(
        default=16,
        ge=1,
        le=256,
        description="explain=true: how many of the slices judged COVID get a Grad-CAM "
        "overlay, the highest scores first; each adds about 60-105 KB (a base64 PNG) to "
        "the answer",
    )
    explain_max_queue_slices: int = Field(
        default=64,
        ge=1,
        description="slices waiting to be explained, all requests together, before an "
        "explain=true request gets 503 queue-full (explaining has its own queue, after the "
        "diagnosis, in batches of COVIDCT_MAX_BATCH_SIZE)",
    )

    # --- asynchronous jobs and DICOMweb (docs/jobs.md) ------------------------------
    jobs_data_dir: Path = Field(
        default=Path("var/jobs"),
        description="the job store's SQLite file (when no store URL is set), the uploads "
        "waiting for their job and the studies STOW-RS is still receiving. With Redis, "
        "every replica must mount the same directory (a ReadWriteMany volume)",
    )
    jobs_store_url: SecretStr = Field(
        default=SecretStr(""),
        description="empty: SQLite in the data directory (one host); redis://, rediss:// or "
        "unix:// URL: Redis, for several replicas (any replica answers, one runs each job). "
        "May hold a password: kept out of logs",
    )
    jobs_result_ttl_s: float = Field(
        default=86400.0,
        gt=0,
        description="how long an ended job and its result are kept (then deleted with "
        "whatever upload is left)",
    )
    jobs_upload_budget_bytes: int = Field(
        default=8 * 1024**3,
        ge=1,
        description="uploads of pending jobs (and studies being received), all together; "
        "past it new jobs get 503 queue-full, and one larger than all of it 413",
    )
    jobs_max_queued: int = Field(
        default=200,
        ge=1,
        description="pending (queued + running) jobs, all replicas together; past it new "
        "jobs get 503 queue-full with Retry-After",
    )
    jobs_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="a worker's claim on a running job, renewed every third of it; a job "
        "whose worker died runs again (or fails, after its second try) this long after",
    )
    jobs_retry_after_s: int = Field(
        default=30, ge=1, description="Retry-After of the 503 when the job queue is full"
    )
    jobs_callback_allowlist: list[str] = Field(
        default_factory=list,
        description="hosts a job's callback_url may name (JSON list of host or host:port); "
        "empty: every callback_url is refused with 422",
    )
    jobs_callback_secret: SecretStr = Field(
        default=SecretStr(""),
        description="HMAC-SHA256 key that signs callback bodies (X-Covidct-Signature); "
        "required when the allowlist is not empty",
    )
    jobs_callback_attempts: int = Field(
        default=5, ge=1, le=20, description="deliveries tried per callback"
    )
    jobs_callback_backoff_s: float = Field(
        default=1.0, ge=0, description="wait before the second delivery, doubled after each"
    )
    jobs_callback_timeout_s: float = Field(default=10.0, gt=0, description="per callback delivery")
    jobs_poll_interval_s: float = Field(
        default=0.5,
        gt=0,
        le=60,
        description="how often an idle worker looks for jobs and recovers those of workers "
        "that died",
    )
    jobs_worker_concurrency: int = Field(
        default=1,
        ge=1,
        le=64,
        description="jobs one replica runs at once (each shares the inference queue with "
        "the synchronous requests)",
    )
    stow_quiet_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="POST /studies: a study becomes one job once no instance of it has "
        "arrived for this long (instances sent in several STOW-RS requests join it)",
    )

    results_stow_url: str = Field(
        default="",
        max_length=2048,
        description="DICOMweb STOW-RS base URL (e.g. http://pacs:8042/dicom-web) where a "
        "finished DICOM job's results (SR, key images, overlays) are stored; empty: not "
        "pushed (GET /jobs/{id}/dicom still answers them)",
    )
    results_stow_authorization: SecretStr = Field(
        default=SecretStr(""),
        description="value of the Authorization header of the results push (e.g. "
        "'Bearer ...' or 'Basic ...'); empty: none",
    )
    results_stow_attempts: int = Field(
        default=3, ge=1, le=10, description="results push: STOW-RS requests tried per job"
    )
    results_stow_backoff_s: float = Field(
        default=2.0,
        ge=0,
        le=300,
        description="results push: wait before the second try, doubled after each",
    )
    results_stow_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="results push: per STOW-RS request"
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for name in ("roi_rows", "roi_cols"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi <= 512:
                raise ValueError(f"{name} must satisfy 0 <= lo < hi <= 512. Received: {lo, hi}")
        if any(not key.get_secret_value().strip() for key in self.api_keys):
            raise ValueError("api_keys must not hold an empty key. Received: an empty string")
        if self.results_stow_url and not self.results_stow_url.startswith(("http://", "https://")):
            raise ValueError("results_stow_url must be an http(s) URL. Received: another scheme")
        if self.device not in {"auto", "cpu", "gpu"}:
            raise ValueError(f"device must be auto, cpu or gpu. Received: device={self.device}")
        self.jobs_config()  # its own checks: store URL scheme, allowlist needs a secret
        return self

    # --- the stage configs, built once at start-up ------------------------------------

    def selection_rule(self) -> SelectionRule:
        return SelectionRule(
            dark_value=self.dark_value,
            roi_rows=self.roi_rows,
            roi_cols=self.roi_cols,
            divisor=self.threshold_divisor,
            min_lung_pixels=self.min_lung_pixels,
        )

    def ingest_limits(self) -> IngestLimits:
        return IngestLimits(
            max_members=self.max_members,
            max_uncompressed_bytes=self.max_uncompressed_bytes,
            max_compression_ratio=self.max_compression_ratio,
            max_slices_per_series=self.max_slices_per_series,
            max_slices_total=self.max_slices_total,
        )

    def pipeline_config(self) -> PipelineConfig:
        return PipelineConfig(
            ingest=self.ingest_limits(),
            selection=self.selection_rule(),
            patient=PatientRule(threshold=self.patient_threshold),
        )

    def served_model(self) -> ModelConfig:
        batching = BatchingConfig(
            max_batch_size=self.max_batch_size,
            max_queue_delay_ms=self.max_queue_delay_ms,
            max_queue_slices=self.max_queue_slices,
            retry_after_s=self.retry_after_s,
            warmup_sizes=tuple(self.warmup_batch_sizes or ()),
        )
        return ModelConfig(
            model_dir=self.model_dir,
            device=cast(Device, self.device),  # checked by _check
            gpu_memory_growth=self.gpu_memory_growth,
            mixed_precision=self.mixed_precision,
            batching=batching,
        )

    def guard_config(self) -> GuardConfig:
        return GuardConfig(
            api_keys=tuple(key.get_secret_value() for key in self.api_keys),
            max_upload_bytes=self.max_upload_bytes,
            max_concurrent_uploads=self.max_concurrent_uploads,
            retry_after_s=self.retry_after_s,
        )

    def jobs_config(self) -> JobsConfig:
        return JobsConfig(
            data_dir=self.jobs_data_dir,
            store_url=self.jobs_store_url.get_secret_value(),
            result_ttl_s=self.jobs_result_ttl_s,
            upload_budget_bytes=self.jobs_upload_budget_bytes,
            max_queued_jobs=self.jobs_max_queued,
            lease_s=self.jobs_lease_s,
            retry_after_s=self.jobs_retry_after_s,
            callback_allowlist=tuple(self.jobs_callback_allowlist),
            callback_secret=self.jobs_callback_secret.get_secret_value(),
            callback_attempts=self.jobs_callback_attempts,
            callback_backoff_s=self.jobs_callback_backoff_s,
            callback_timeout_s=self.jobs_callback_timeout_s,
            poll_interval_s=self.jobs_poll_interval_s,
        )

    def stow_config(self) -> StowConfig:
        return StowConfig(quiet_s=self.stow_quiet_s)

    def results_push_config(self) -> PushConfig:
        return PushConfig(
            url=self.results_stow_url.rstrip("/"),
            authorization=self.results_stow_authorization.get_secret_value(),
            attempts=self.results_stow_attempts,
            backoff_s=self.results_stow_backoff_s,
            timeout_s=self.results_stow_timeout_s,
        )

    def explain_config(self) -> ExplainConfig:
        return ExplainConfig(
            max_slices=self.explain_max_slices,
            max_batch_size=self.max_batch_size,
            max_queue_slices=self.explain_max_queue_slices,
            retry_after_s=self.retry_after_s,
        )

    def service_config(self) -> ServiceConfig:
        key = self.audit_hash_key
        return ServiceConfig(
            model=self.served_model(),
            pipeline=self.pipeline_config(),
            guard=self.guard_config(),
            allow_untrained=self.allow_untrained,
            decode_workers=self.decode_workers,
            drain_timeout_s=self.drain_timeout_s,
            jobs=self.jobs_config(),
            job_workers=self.jobs_worker_concurrency,
            stow=self.stow_config(),
            explain=self.explain_config(),
            audit_key=key.get_secret_value().encode() if key is not None else None,
            results_push=self.results_push_config(),
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()

"""Validated settings, read from COVIDCT_* environment variables (or a .env file).

Read once at start-up and turned into each stage's own small frozen config
(`service_config()`); no stage module imports this one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import cast

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.diagnosis import PatientRule
from app.guard import GuardConfig
from app.inference import BatchingConfig, Device, ModelConfig
from app.ingest import IngestLimits
from app.pipeline import PipelineConfig
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
    decode_workers: int = Field(
        default=2,
        ge=0,
        le=64,
        description="processes that decode DICOM pixel data, shared by all requests (0: each "
        "request decodes in its own thread, one slice at a time across requests: the "
        "decoders hold the GIL)",
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

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for name in ("roi_rows", "roi_cols"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi <= 512:
                raise ValueError(f"{name} must satisfy 0 <= lo < hi <= 512. Received: {lo, hi}")
        if any(not key.get_secret_value().strip() for key in self.api_keys):
            raise ValueError("api_keys must not hold an empty key. Received: an empty string")
        if self.device not in {"auto", "cpu", "gpu"}:
            raise ValueError(f"device must be auto, cpu or gpu. Received: device={self.device}")
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

    def service_config(self) -> ServiceConfig:
        key = self.audit_hash_key
        return ServiceConfig(
            model=self.served_model(),
            pipeline=self.pipeline_config(),
            guard=self.guard_config(),
            allow_untrained=self.allow_untrained,
            decode_workers=self.decode_workers,
            drain_timeout_s=self.drain_timeout_s,
            audit_key=key.get_secret_value().encode() if key is not None else None,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()

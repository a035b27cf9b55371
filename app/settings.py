"""Validated settings, read from COVIDCT_* environment variables (or a .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="COVIDCT_", env_file=".env", extra="ignore")

    # --- model ---------------------------------------------------------------
    model_dir: Path = Field(Path("var/models/default"), description="SavedModel directory")
    allow_untrained: bool = Field(
        True,
        description="Report ready while the served weights are untrained. Set false in "
        "production: /health then stays 503 with an untrained model.",
    )
    device: str = Field("auto", description="'auto' (first GPU, else CPU), 'cpu' or 'gpu'")
    gpu_memory_growth: bool = Field(
        True, description="allocate GPU memory as needed instead of all of it at start"
    )
    max_batch_size: int = Field(
        8, ge=1, le=256, description="slices per model call (dynamic batching across requests)"
    )
    max_queue_delay_ms: float = Field(
        5.0, ge=0, le=1000, description="how long a partial batch waits for more slices"
    )
    max_queue_slices: int = Field(
        2048, ge=1, description="slices waiting for the model before new requests get 503"
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 queue-full answer")
    warmup_batch_sizes: list[int] | None = Field(
        None,
        description="batch sizes run once at start (graph and kernel selection per shape); "
        "default: every size from 1 to max_batch_size, since dynamic batching uses them all",
    )
    mixed_precision: bool = Field(False, description="bfloat16 compute where supported")

    # --- the paper's method ----------------------------------------------------
    dark_value: int = Field(300, description="stored value under which a pixel is air/lung")
    roi_rows: tuple[int, int] = Field((240, 340), description="the paper's ROI rows (y)")
    roi_cols: tuple[int, int] = Field((120, 370), description="the paper's ROI columns (x)")
    threshold_divisor: float = Field(
        1.5, gt=0, description="selected when count > (max - min) / divisor (the paper: 1.5)"
    )
    min_lung_pixels: int = Field(
        500,
        ge=0,
        description="a series whose largest dark-pixel count is below this has no open "
        "lung to judge and is 'indeterminate' (the ROI holds 25,000 pixels)",
    )
    patient_threshold: float = Field(0.1, ge=0, le=1, description="the paper's t")

    # --- input limits ------------------------------------------------------------
    max_upload_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=1,
        description="request body of POST /patients/diagnose (the zip and the form fields); "
        "counted while it streams in, and refused with 413 as soon as it is exceeded",
    )
    decode_workers: int = Field(
        2,
        ge=0,
        le=64,
        description="processes that decode DICOM pixel data, shared by all requests (0: each "
        "request decodes in its own thread, one slice at a time across requests: the "
        "decoders hold the GIL)",
    )
    max_concurrent_uploads: int = Field(
        8,
        ge=1,
        description="diagnose requests in progress at once (upload, decode, inference); more "
        "are answered 503 queue-full with Retry-After before their body is read",
    )
    max_members: int = Field(5000, ge=1, description="files in the zip (folders not counted)")
    max_uncompressed_bytes: int = Field(
        4 * 1024 * 1024 * 1024,
        ge=1,
        description="what the zip's members declare, all together; also bounds the decoded "
        "slices (2 bytes a pixel). Checked before anything is decompressed",
    )
    max_compression_ratio: float = Field(
        200.0,
        gt=1,
        description="uncompressed / compressed size, per member over 1 MiB and for the whole "
        "archive: zip bombs expand ~1000-fold, CT data 1- to 10-fold",
    )
    max_slices_per_series: int = Field(2000, ge=1, description="also frames / pages per file")
    max_slices_total: int = Field(4000, ge=1, description="over all series of one upload")

    # --- access and logs -----------------------------------------------------------
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="keys accepted in the X-API-Key header of POST /patients/diagnose (a JSON "
        "list in COVIDCT_API_KEYS); empty: no key needed (the local development default)",
    )
    audit_hash_key: SecretStr | None = Field(
        None,
        description="secret of the HMAC-SHA256 that pseudonymises patient ids in the audit log; "
        "unset: a random key per process (hashes then correlate within one run only). Set "
        "it, and keep it secret, to correlate audit lines across restarts and replicas",
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")

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

    @property
    def warmup_sizes(self) -> list[int]:
        sizes = self.warmup_batch_sizes or range(1, self.max_batch_size + 1)
        return sorted({s for s in sizes if 1 <= s <= self.max_batch_size})


@lru_cache
def get_settings() -> Settings:
    return Settings()

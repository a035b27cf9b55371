"""The job layer's one frozen config, built once at start-up from the settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

StoreKind = Literal["sqlite", "redis"]

_REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class JobsConfig:
    """Where jobs live and how far they may go.

    `store_url`: "" (the default: SQLite in `data_dir`/jobs.sqlite3), `sqlite:///abs/path`,
    or a Redis URL (`redis://`, `rediss://`, `unix://`) for several replicas. Uploads wait
    in `data_dir`/uploads; with Redis every replica must see the same `data_dir` (a shared
    volume), since any replica may run a job another one accepted.
    """

    data_dir: Path
    store_url: str = field(default="", repr=False)  # may hold a Redis password
    result_ttl_s: float = 24 * 3600.0  # a finished job and its result are kept this long
    upload_budget_bytes: int = 8 * 1024**3  # uploads of pending jobs, all together
    max_queued_jobs: int = 200  # pending (queued + running) jobs, all replicas together
    lease_s: float = 60.0  # a claim lasts this long unless renewed (every lease_s / 3)
    retry_after_s: int = 30  # Retry-After of the 503 when the queue is full
    callback_allowlist: tuple[str, ...] = ()  # host or host:port; empty: callbacks refused
    callback_secret: str = field(default="", repr=False)  # HMAC-SHA256 key of callbacks
    callback_attempts: int = 5  # deliveries tried per callback
    callback_backoff_s: float = 1.0  # first retry delay, doubled after every attempt
    callback_timeout_s: float = 10.0  # per delivery
    poll_interval_s: float = 0.5  # how often an idle worker looks for work

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(
            self, "callback_allowlist", tuple(h.strip().lower() for h in self.callback_allowlist)
        )
        positive = {
            "result_ttl_s": self.result_ttl_s,
            "upload_budget_bytes": self.upload_budget_bytes,
            "max_queued_jobs": self.max_queued_jobs,
            "lease_s": self.lease_s,
            "retry_after_s": self.retry_after_s,
            "callback_attempts": self.callback_attempts,
            "callback_timeout_s": self.callback_timeout_s,
            "poll_interval_s": self.poll_interval_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0. Received: {name}={value}")
        if self.callback_backoff_s < 0:
            raise ValueError(
                f"callback_backoff_s must be >= 0. Received: {self.callback_backoff_s}"
            )
        if any(not h for h in self.callback_allowlist):
            raise ValueError("callback_allowlist must not hold an empty host. Received: ''")
        if self.callback_allowlist and not self.callback_secret:
            raise ValueError(
                "callback_secret must be set when callback_allowlist is not empty "
                "(callbacks are always signed). Received: an empty secret"
            )
        _store_kind(self.store_url)

    @property
    def store_kind(self) -> StoreKind:
        return _store_kind(self.store_url)

    @property
    def sqlite_path(self) -> Path:
        if self.store_url:
            path = urlsplit(self.store_url).path
            if path:
                return Path(path)
        return self.data_dir / "jobs.sqlite3"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    def store_description(self) -> str:
        """The store URL without its credentials, for logs."""
        if not self.store_url:
            return f"sqlite:///{self.sqlite_path}"
        parts = urlsplit(self.store_url)
        netloc = parts.hostname or ""
        if parts.port is not None:
            netloc += f":{parts.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _store_kind(url: str) -> StoreKind:
    scheme = urlsplit(url).scheme if url else "sqlite"
    if scheme == "sqlite":
        return "sqlite"
    if scheme in _REDIS_SCHEMES:
        return "redis"
    raise ValueError(
        "store_url must be empty, sqlite:///path or redis://, rediss://, unix://. "
        f"Received: a URL with scheme {scheme!r}"
    )

"""IngestLimits: what one upload may hold, checked before and while it is read."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class IngestLimits:
    """Limits on one upload; the defaults are the service's (app/settings.py builds these
    from COVIDCT_MAX_MEMBERS, ..._MAX_UNCOMPRESSED_BYTES and so on)."""

    max_members: int = 5000  # files in the zip (folders not counted)
    # What the members declare, all together; also bounds the decoded slices (2 bytes a pixel).
    max_uncompressed_bytes: int = 4 * 1024 * 1024 * 1024
    max_compression_ratio: float = 200.0  # per member over 1 MiB and for the whole archive
    max_slices_per_series: int = 2000  # also frames / pages per file
    max_slices_total: int = 4000  # over all series of one upload, before duplicates are dropped

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "max_compression_ratio":
                if isinstance(value, bool) or not isinstance(value, int | float) or not value > 1:
                    raise ValueError(f"{f.name} must be a number > 1. Received: {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be an integer >= 1. Received: {value!r}")

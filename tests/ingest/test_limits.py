"""IngestLimits: frozen, and only values that can bound an upload."""

from __future__ import annotations

import dataclasses

import pytest

from app.ingest import IngestLimits


def test_defaults_are_the_services() -> None:
    # The documented defaults (docs: COVIDCT_MAX_MEMBERS ... COVIDCT_MAX_SLICES_TOTAL).
    assert IngestLimits() == IngestLimits(5000, 4 << 30, 200.0, 2000, 4000)


@pytest.mark.parametrize(
    "field", ["max_members", "max_uncompressed_bytes", "max_slices_per_series", "max_slices_total"]
)
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "10"])
def test_counts_must_be_positive_integers(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        IngestLimits(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, 0.5, -3, False, "200"])
def test_the_compression_ratio_must_exceed_one(value: object) -> None:
    with pytest.raises(ValueError, match="max_compression_ratio"):
        IngestLimits(max_compression_ratio=value)  # type: ignore[arg-type]


def test_limits_are_frozen() -> None:
    limits = IngestLimits(max_members=3, max_compression_ratio=10)
    assert (limits.max_members, limits.max_compression_ratio) == (3, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_members = 4  # type: ignore[misc]

"""open_study (app/ingest/study.py): every header read and every limit checked before any
pixel is decoded; then one series decoded per step, giving what ingest_zip gives; what
waits to be decoded is held once."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import numpy as np
import pytest

import app.ingest.study
from app.errors import CorruptMemberError, TooManySlicesError
from app.ingest import DecodePool, IngestLimits, StudyIngest, ingest_zip, open_study
from dicom_factory import synthetic_ct
from shared_data import zip_files

UIDS = ("1.2.826.0.1.3680043.8.498.21", "1.2.826.0.1.3680043.8.498.22")


def two_series() -> bytes:
    rng = np.random.default_rng(0)
    return zip_files(
        (f"s{k}/{i}.dcm", synthetic_ct(rng.integers(0, 3000, (32, 32), np.uint16), uid=uid,
                                       z=-2.0 * i, instance=i + 1))
        for k, uid in enumerate(UIDS)
        for i in range(3)
    )  # fmt: skip


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The SeriesInstanceUIDs of the series decoded so far, in order."""
    seen: list[str] = []
    real = app.ingest.study.decode_series

    def recording(plan: Any, pool: Any) -> Any:
        seen.append(plan.key[2])
        return real(plan, pool)

    monkeypatch.setattr(app.ingest.study, "decode_series", recording)
    return seen


def test_series_decode_one_per_step_and_give_what_ingest_zip_gives(decoded: list[str]) -> None:
    archive = two_series()
    ingest = open_study(archive, IngestLimits())
    assert decoded == []  # headers only
    series = ingest.series()
    first = next(series)
    assert (first.index, first.key, decoded) == (1, UIDS[0], [UIDS[0]])
    second = next(series)
    assert (second.index, second.key, decoded) == (2, UIDS[1], list(UIDS))
    assert next(series, None) is None
    study = ingest.study()
    whole = ingest_zip(archive, IngestLimits())
    assert [s.key for s in study.series] == [s.key for s in whole.series]
    for mine, theirs in zip(study.series, whole.series, strict=True):
        np.testing.assert_array_equal(mine.pixels, theirs.pixels)
        assert (mine.index, mine.slices, mine.notes) == (theirs.index, theirs.slices, theirs.notes)


def test_a_limit_refuses_the_upload_before_any_series_decodes(decoded: list[str]) -> None:
    with pytest.raises(TooManySlicesError):
        open_study(two_series(), IngestLimits(max_slices_per_series=2))
    assert decoded == []


def test_nothing_usable_is_known_once_every_series_decoded() -> None:
    bad = synthetic_ct(np.zeros((32, 32), np.uint16))[:-100]  # pixel data cut short
    ingest = open_study(zip_files([("a.dcm", bad)]), IngestLimits())
    with pytest.raises(RuntimeError, match="before every series"):
        ingest.study()
    assert list(ingest.series()) == []
    with pytest.raises(CorruptMemberError):
        ingest.study()


N, SIDE = 20, 512
PIXEL_BYTES = N * SIDE * SIDE * 2  # 10.5 MB, stored uncompressed


def uncompressed_series() -> bytes:
    return zip_files(
        (f"s/{i}.dcm", synthetic_ct(np.full((SIDE, SIDE), i, np.uint16), z=-2.0 * i))
        for i in range(N)
    )


def test_a_decoded_series_lets_go_of_its_members_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    archive = uncompressed_series()
    plans: list[Any] = []
    real = app.ingest.study.decode_series

    def keeping(plan: Any, pool: Any) -> Any:
        plans.append(plan)  # held beyond decoding, as if someone still looked at it
        return real(plan, pool)

    monkeypatch.setattr(app.ingest.study, "decode_series", keeping)
    gc.collect()
    tracemalloc.start()
    try:
        study = ingest_zip(archive, IngestLimits())
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] / PIXEL_BYTES
    finally:
        tracemalloc.stop()
    assert len(plans) == 1 and study.series[0].pixels.nbytes == PIXEL_BYTES
    # The series' pixels, and of its frames their header facts only. Measured: 1.00; with
    # each frame's bytes and parsed dataset still held, 3.14.
    assert held < 1.5, held

    archive = uncompressed_series()

    def held(*pool: DecodePool) -> float:
        gc.collect()
        tracemalloc.start()
        try:
            ingest: StudyIngest | None = open_study(archive, IngestLimits(), *pool)
            gc.collect()
            size = tracemalloc.get_traced_memory()[0]
            del ingest
            return size / PIXEL_BYTES
        finally:
            tracemalloc.stop()

    # The member's bytes (for the workers) and not also the parsed dataset's copy of its
    # pixel data. Measured: 1.00 with a pool (never started: nothing is decoded here),
    # 2.04 without one (the dataset decodes in this thread).
    with_pool, without = held(DecodePool(1)), held()
    assert with_pool < 1.3 < 1.9 < without, (with_pool, without)

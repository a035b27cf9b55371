"""Decoding in worker processes (app/ingest/pool.py) gives ingest's pixels, configures the
libraries in each worker, and survives a worker that dies."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from app.ingest import DecodePool, DecodePoolBroken, IngestLimits, ingest_zip
from shared_data import P002, needs_data, zip_dirs, zip_files

LIMITS = IngestLimits()


def die(code: int) -> None:
    """A decode task whose worker process dies, as it would on a crashing decoder."""
    os._exit(code)


def square(x: int) -> int:
    if x < 0:
        raise ValueError("negative")
    return x * x


def worker_set_up(_: int) -> tuple[bool, list[str]]:
    """In a worker: pydicom's validation mode off?, and the JPEG Lossless decoder's plugins."""
    from pydicom import config
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLosslessSV1

    validation_off = config.settings.reading_validation_mode == config.IGNORE
    return validation_off, list(get_decoder(JPEGLosslessSV1).available_plugins)


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    p = DecodePool(2)
    yield p
    p.shutdown()


def test_tasks_come_back_in_order_with_their_own_errors(pool: DecodePool) -> None:
    out = list(pool.decode(square, [(3,), (-1,), (5,)]))
    assert out[0] == 9 and out[2] == 25
    assert isinstance(out[1], ValueError)


def test_workers_start_with_the_libraries_configured(pool: DecodePool) -> None:
    for validation_off, plugins in pool.decode(worker_set_up, [(0,), (1,)]):
        assert validation_off and "gdcm" not in plugins and "pylibjpeg" in plugins


def test_a_dead_worker_raises_and_the_next_call_gets_a_fresh_pool(pool: DecodePool) -> None:
    with pytest.raises(DecodePoolBroken):
        list(pool.decode(die, [(3,), (3,)]))
    assert list(pool.decode(square, [(4,)])) == [16]


def test_at_least_one_worker() -> None:
    with pytest.raises(ValueError, match="at least one worker"):
        DecodePool(0)


@needs_data
def test_p002_through_the_pool_equals_decoding_in_thread(pool: DecodePool) -> None:
    archive = zip_dirs(P002)
    here = ingest_zip(archive, LIMITS).series[0]
    there = ingest_zip(archive, LIMITS, pool).series[0]
    assert [s.source for s in there.slices] == [s.source for s in here.slices]
    np.testing.assert_array_equal(there.pixels, here.pixels)


@needs_data
def test_a_frame_that_fails_to_decode_is_skipped_in_the_pool_too(pool: DecodePool) -> None:
    good = sorted(P002.glob("*.dcm"))[:3]
    ds = pydicom.dcmread(good[1])
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(1000)])  # a JPEG stream with no image
    buf = io.BytesIO()
    ds.save_as(buf)
    files = [("s/a.dcm", good[0]), ("s/b.dcm", buf.getvalue()), ("s/c.dcm", good[2])]
    study = ingest_zip(zip_files(files), LIMITS, pool)
    (series,) = study.series
    assert [s.source for s in series.slices] == ["s/a.dcm", "s/c.dcm"]
    assert [(m.index, m.reason) for m in study.skipped] == [(2, "pixel data could not be decoded")]


@needs_data
def test_a_pool_that_breaks_midway_leaves_the_rest_to_this_thread(
    pool: DecodePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pool.decode

    def breaks_after_ten(
        fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]
    ) -> Iterator[Any]:  # as when a worker dies while the series decodes
        for i, outcome in enumerate(real(fn, tasks)):
            if i == 10:
                raise DecodePoolBroken
            yield outcome

    monkeypatch.setattr(pool, "decode", breaks_after_ten)
    archive = zip_dirs(P002)
    np.testing.assert_array_equal(
        ingest_zip(archive, LIMITS, pool).series[0].pixels,
        ingest_zip(archive, LIMITS).series[0].pixels,
    )

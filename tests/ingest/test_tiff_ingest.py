"""TIFF members (app/ingest/tiff.py): integer pages are stored values as they are;
what cannot hold raw CT values is refused with a reason."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.errors import UnsupportedImageError
from dicom_factory import PHI_NAME, tiff_bytes
from ingest_support import assert_no_leak, ingest, stored
from shared_data import P002, needs_data


@pytest.mark.parametrize(
    ("values", "kwargs", "reason"),
    [
        (np.zeros((512, 512), np.float32), {}, "float TIFF has lost the raw stored values"),
        (np.zeros((512, 512, 3), np.uint8), {"photometric": "rgb"}, "RGB"),
        (np.zeros((512, 512, 3), np.uint16), {"photometric": "rgb"}, "RGB"),
        (np.zeros((512, 512), np.uint8), {}, "8-bit TIFF"),
    ],
)
def test_tiffs_that_cannot_hold_raw_ct_are_rejected(
    values: np.ndarray, kwargs: dict[str, object], reason: str
) -> None:
    with pytest.raises(UnsupportedImageError, match=reason) as info:
        ingest([(f"{PHI_NAME}.tif", tiff_bytes(values, **kwargs))])
    assert info.value.status == 415
    assert_no_leak(info.value)


def test_tiff_pages_and_signed_values() -> None:
    pages = np.stack([np.full((512, 512), v, np.int16) for v in (-5, 7, 3000)])
    (series,) = ingest([("stack/one.tif", tiff_bytes(pages, photometric="minisblack"))]).series
    assert [s.frame for s in series.slices] == [0, 1, 2]
    assert series.pixels[:, 0, 0].tolist() == [0, 7, 3000]
    assert series.geometry is None and series.set_aside is None  # no tags: as displayed


def test_bigtiff_is_read() -> None:
    image = np.arange(512 * 512, dtype=np.uint32).reshape(512, 512) % 70_000
    (series,) = ingest([("big.tif", tiff_bytes(image, bigtiff=True))]).series
    np.testing.assert_array_equal(series.pixels[0], np.minimum(image, 65535))


def test_tiff_folders_are_series() -> None:
    image = np.ones((512, 512), np.uint16)
    files = [(f"{d}/IM{i}.tif", tiff_bytes(image)) for d in ("SR_3", "SR_2") for i in (1, 2)]
    study = ingest(files)
    assert [(s.key, len(s.slices)) for s in study.series] == [("SR_2", 2), ("SR_3", 2)]


@needs_data
def test_tiff_copy_of_p002_gives_its_pixels_in_natural_order() -> None:
    files = sorted(P002.glob("*.dcm"))
    pixels = np.stack([stored(p) for p in files])
    members = [
        (f"P002_tiff/IM{i + 1:05d}.tif", tiff_bytes(image, compression="zlib" if i % 10 else None))
        for i, image in enumerate(pixels)
    ]
    random.Random(3).shuffle(members)
    (series,) = ingest(members).series
    assert (series.kind, series.key) == ("tiff", "P002_tiff")
    names = [s.source for s in series.slices]
    assert names[8:10] == ["P002_tiff/IM00009.tif", "P002_tiff/IM00010.tif"]
    assert names == [f"P002_tiff/IM{i:05d}.tif" for i in range(1, 134)]
    np.testing.assert_array_equal(series.pixels, pixels)

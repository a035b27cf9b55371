"""Series assembly (app/ingest/series.py): grouping, order along the slice normal (head →
feet), duplicates, per-series limits and sizes, resampling to 512×512; natural sort."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from app.domain import Study
from app.errors import MixedSliceSizesError, TooManySlicesError
from app.ingest import IngestLimits, ingest_zip, natural_key
from dicom_factory import PHI_NAME, synthetic_ct
from ingest_support import assert_no_leak, hu_image, ingest, stored
from shared_data import NORMAL002, P002, VARIANTS, needs_data, zip_dirs

TCGA = VARIANTS / "tcga-luad-single-slices"


@pytest.fixture(scope="module")
def p002() -> Study:
    return ingest_zip(zip_dirs(P002), IngestLimits())


# --- real series ---------------------------------------------------------------------


@needs_data
def test_p002_is_one_series_in_head_to_feet_order(p002: Study) -> None:
    (series,) = p002.series
    assert (series.index, series.kind, len(series.slices)) == (1, "dicom", 133)
    assert [s.source for s in series.slices] == [f"P002/IM{i:04d}.dcm" for i in range(1, 134)]
    positions = np.array([s.position_mm for s in series.slices])
    assert np.all(np.diff(positions) < 0)
    assert positions[0] == pytest.approx(-173.7) and positions[-1] == pytest.approx(-437.7)
    assert "head → feet" in series.order
    assert series.pixels.dtype == np.uint16 and series.pixels.shape == (133, 512, 512)
    assert series.resampled_from is None and p002.skipped == () and p002.members == 133
    assert series.notes == () and series.set_aside is None  # axial, standard display


@needs_data
def test_p002_pixels_are_its_files_stored_values(p002: Study) -> None:
    expected = np.stack([stored(p) for p in sorted(P002.glob("*.dcm"))])
    np.testing.assert_array_equal(p002.series[0].pixels, expected)


@needs_data
def test_shuffled_names_and_order_keep_the_geometric_order(p002: Study) -> None:
    files = sorted(P002.glob("*.dcm"))
    names = [f"scan/{n:05d}.dcm" for n in random.Random(1).sample(range(10_000), len(files))]
    members: list[tuple[str, bytes | Path]] = list(zip(names, files, strict=True))
    random.Random(2).shuffle(members)
    (series,) = ingest(members).series
    original = dict(zip(names, (f.name for f in files), strict=True))
    assert [original[s.source] for s in series.slices] == [f.name for f in files]
    np.testing.assert_array_equal(series.pixels, p002.series[0].pixels)


@needs_data
def test_two_patients_give_two_series() -> None:
    study = ingest_zip(zip_dirs(P002, NORMAL002), IngestLimits())
    assert [s.index for s in study.series] == [1, 2]
    assert sorted(len(s.slices) for s in study.series) == [133, 167]
    assert len({s.key for s in study.series}) == 2


@needs_data
def test_normal002_is_ordered_head_to_feet() -> None:
    (series,) = ingest_zip(zip_dirs(NORMAL002), IngestLimits()).series
    assert [s.source for s in series.slices][:2] == ["normal002/IM0001.dcm", "normal002/IM0002.dcm"]
    assert np.all(np.diff([s.position_mm for s in series.slices]) < 0)


@needs_data
def test_same_image_twice_keeps_one_slice_with_a_note() -> None:
    study = ingest([(n, TCGA / n) for n in ("ID_0006.dcm", "ID_0003.dcm")])
    (series,) = study.series  # same SeriesInstanceUID and position
    assert [s.source for s in series.slices] == ["ID_0003.dcm"]  # same instance: by name
    assert any("dropped" in note for note in series.notes)


@needs_data
def test_abdomen_without_series_uid_is_one_series_by_folder() -> None:
    folder = VARIANTS / "abdomen-no-lung-series"
    files: list[tuple[str, bytes | Path]] = [
        (f"abdomen/{p.name}", p) for p in sorted(folder.glob("*.dcm"))
    ]
    (series,) = ingest(files).series
    assert (series.key, len(series.slices)) == ("abdomen", 20)
    assert np.all(np.diff([s.position_mm for s in series.slices]) < 0)
    assert any("SeriesInstanceUID missing" in note for note in series.notes)


@needs_data
def test_all_variants_together() -> None:
    files = sorted(VARIANTS.rglob("*.dcm"))
    study = ingest([(str(p.relative_to(VARIANTS)), p) for p in files])
    # 16 TCGA files in 15 series (ID_0003 = ID_0006), abdomen, JPEG-LS, JPEG 2000, enhanced.
    assert len(study.series) == 19 and study.members == len(files)
    assert sum(len(s.slices) for s in study.series) == 15 + 20 + 1 + 1 + 2
    assert len(study.skipped) == 1  # the topogram
    assert [s.set_aside for s in study.series] == [None] * 19  # all axial


# --- synthetic series ------------------------------------------------------------------


def test_position_missing_falls_back_to_instance_number_then_name() -> None:
    image = np.zeros((16, 16), np.uint16)
    by_instance = ingest(
        [(f"{n}.dcm", synthetic_ct(image, z=None, instance=i)) for n, i in (("a", 2), ("b", 1))]
    )
    series = by_instance.series[0]
    assert [s.source for s in series.slices] == ["b.dcm", "a.dcm"]
    assert series.order.startswith("InstanceNumber")
    by_name = ingest([(f"IM{i}.dcm", synthetic_ct(image, z=None, instance=None)) for i in (10, 9)])
    assert [s.source for s in by_name.series[0].slices] == ["IM9.dcm", "IM10.dcm"]
    assert by_name.series[0].order.startswith("file name")


def test_series_are_grouped_by_uid_and_numbered() -> None:
    image = np.zeros((512, 512), np.uint16)
    files = [
        (f"s{u}/{z}.dcm", synthetic_ct(image, uid=f"1.2.{u}", z=z))
        for u in (2, 1)
        for z in (0, 5, 10)
    ]
    study = ingest(files)
    assert [(s.index, s.key, len(s.slices)) for s in study.series] == [
        (1, "1.2.1", 3),
        (2, "1.2.2", 3),
    ]
    assert [s.position_mm for s in study.series[0].slices] == [10, 5, 0]


def test_slices_are_clipped_at_zero_and_resampled() -> None:
    hu = np.full((256, 256), -3000, np.int16)
    hu[64:192, 64:192] = 40
    (series,) = ingest([("x.dcm", synthetic_ct(hu, intercept="0"))]).series
    assert series.resampled_from == (256, 256) and series.pixels.shape == (1, 512, 512)
    assert any("resampled" in note for note in series.notes)
    assert series.pixels[0, 0, 0] == 0 and series.pixels[0, 256, 256] == 1064


def test_resampling_is_bilinear_with_corners_kept() -> None:
    ramp = np.tile(np.arange(0, 2560, 10, dtype=np.uint16), (256, 1))  # 0 … 2550 along x
    (series,) = ingest([("x.dcm", synthetic_ct(ramp))]).series
    row = series.pixels[0, 100].astype(float)
    np.testing.assert_allclose(row, np.linspace(0, 2550, 512), atol=0.5)
    assert np.all(series.pixels[0] == series.pixels[0, :1])


def test_mixed_sizes_in_a_series() -> None:
    files = [
        (f"{PHI_NAME}/a.dcm", synthetic_ct(np.zeros((512, 512), np.uint16), z=0)),
        (f"{PHI_NAME}/b.dcm", synthetic_ct(np.zeros((256, 256), np.uint16), z=5)),
    ]
    with pytest.raises(MixedSliceSizesError, match="512×512") as info:
        ingest(files)
    assert_no_leak(info.value)


def test_too_many_slices_in_a_series() -> None:
    files = [(f"{i}.dcm", synthetic_ct(np.zeros((8, 8), np.uint16), z=i)) for i in range(4)]
    with pytest.raises(TooManySlicesError, match="4 slices; the limit is 3"):
        ingest(files, max_slices_per_series=3)


def test_each_slice_keeps_its_own_rescale() -> None:
    hu = [hu_image((512, 512), seed=s) for s in range(4)]
    as_hu = [synthetic_ct(h, intercept="0", z=float(i)) for i, h in enumerate(hu[:2])]
    offset = [
        synthetic_ct((h + 1024).astype(np.uint16), intercept="-1024", z=float(i))
        for i, h in enumerate(hu[2:], start=2)
    ]
    files = [(f"{i}.dcm", data) for i, data in enumerate(as_hu + offset)]
    (series,) = ingest(files[::-1]).series
    np.testing.assert_array_equal(series.pixels, np.stack([h + 1024 for h in hu[::-1]]))


def test_natural_key() -> None:
    names = ["IM10.dcm", "im9.dcm", "IM00010b", "IM00009", "a2b10", "a2b9", "A1"]
    assert sorted(names, key=natural_key) == [
        "A1", "a2b9", "a2b10", "IM00009", "im9.dcm", "IM10.dcm", "IM00010b"
    ]  # fmt: skip

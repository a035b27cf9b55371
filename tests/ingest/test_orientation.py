"""Orientation (app/ingest/orientation.py, applied in series.py): only axial series are
judged, and axial slices reach the selector and the model in the standard radiological
display (rows anterior → posterior, columns patient right → left), whatever the storage.

The oracle is the patient-space geometry itself: where each stored pixel lies follows from
ImageOrientationPatient alone (DICOM PS3.3 C.7.6.2.1.1), independently of the code.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pydicom
import pytest

from app.domain import Study
from app.errors import MixedSliceSizesError
from app.ingest import AXIAL_LIMIT_DEG, IngestLimits, ingest_zip
from app.ingest.orientation import Orientation
from app.selection import PAPER_RULE, dark_pixel_counts, select_open_lung
from dicom_factory import (
    SERIES_UID,
    Volume,
    dicom_bytes,
    read_volume,
    reformatted,
    restored,
    synthetic_ct,
)
from ingest_support import ingest, stored
from shared_data import P002, VARIANTS, needs_data, zip_dirs

X, Y, Z = np.eye(3)
# The eight ways to store an axial slice in-plane: (row direction, column direction).
STORAGES = [(r, c) for a, b in ((X, Y), (Y, X)) for r in (a, -a) for c in (b, -b)]
_COORDINATES = np.indices((512, 512)).astype(np.uint16)  # [row index, column index]


def where(orientation: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Ingest an image holding each pixel's stored row index and one holding its column
    index, both stored with this orientation: [2, 512, 512], the stored (row, column) of
    each displayed pixel."""
    iop = [*orientation[0], *orientation[1]]
    files = [
        (f"{name}.dcm", synthetic_ct(values, uid=f"1.2.3.{i}", orientation=iop))
        for i, (name, values) in enumerate(zip(("rows", "cols"), _COORDINATES, strict=True))
    ]
    rows, cols = ingest(files).series  # by UID: 1.2.3.0 (rows), 1.2.3.1 (cols)
    return np.stack([rows.pixels[0], cols.pixels[0]])


def patient_xy(stored_at: np.ndarray, row: np.ndarray, col: np.ndarray) -> tuple[np.ndarray, ...]:
    """Patient x and y of each displayed pixel (spacing 1 mm, first pixel at the origin)."""
    r, c = stored_at.astype(np.float64)
    position = c[..., None] * row + r[..., None] * col
    return position[..., 0], position[..., 1]


@pytest.mark.parametrize(("row", "col"), STORAGES)
def test_every_in_plane_storage_reaches_the_standard_display(
    row: np.ndarray, col: np.ndarray
) -> None:
    x, y = patient_xy(where((row, col)), row, col)
    # Standard display: one column to the right is 1 mm to the patient's left (+x), one
    # row down is 1 mm posterior (+y); nothing else changes.
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)
    np.testing.assert_array_equal(np.diff(x, axis=0), 0)
    np.testing.assert_array_equal(np.diff(y, axis=0), 1)
    np.testing.assert_array_equal(np.diff(y, axis=1), 0)


@pytest.mark.parametrize("tilt", [-20.0, 12.5, 25.0])
def test_a_gantry_tilt_keeps_the_display_and_is_axial(tilt: float) -> None:
    t = math.radians(tilt)
    row, col = -X, np.array([0, -math.cos(t), math.sin(t)])  # prone, tilted about x
    x, y = patient_xy(where((row, col)), row, col)
    assert np.all(np.diff(x, axis=1) > 0) and np.all(np.diff(y, axis=0) > 0)


def test_the_axial_limit() -> None:
    def angle_of(tilt: float) -> tuple[float, bool, str]:
        t = math.radians(tilt)
        o = Orientation.from_cosines(np.array([1, 0, 0, 0, math.cos(t), math.sin(t)]))
        assert o is not None
        return round(o.angle_deg, 6), o.axial, o.plane

    assert AXIAL_LIMIT_DEG == 30
    assert angle_of(0) == (0, True, "axial")
    assert angle_of(30) == (30, True, "axial")
    assert angle_of(31) == (31, False, "oblique")
    assert angle_of(75) == (75, False, "coronal")
    assert angle_of(90) == (90, False, "coronal")
    sagittal = Orientation.from_cosines(np.array([0, 1, 0, 0, 0, -1]))
    assert sagittal is not None and (sagittal.angle_deg, sagittal.plane) == (90, "sagittal")


@pytest.mark.parametrize(
    "cosines", [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0], [1, 0, 0, 0, np.nan, 0]]
)
def test_unusable_orientations_are_none(cosines: list[float]) -> None:
    assert Orientation.from_cosines(np.array(cosines, dtype=float)) is None


def test_a_series_without_orientation_is_taken_as_stored_with_a_note() -> None:
    image = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512) % 4000
    (series,) = ingest([("a.dcm", synthetic_ct(image, z=None))]).series
    np.testing.assert_array_equal(series.pixels[0], image)
    assert series.set_aside is None
    assert any("no ImageOrientationPatient" in note for note in series.notes)


def test_an_in_plane_rotation_that_no_flip_undoes_is_noted() -> None:
    t = math.radians(10)
    iop = [math.cos(t), math.sin(t), 0, -math.sin(t), math.cos(t), 0]
    (series,) = ingest(
        [("a.dcm", synthetic_ct(np.zeros((64, 64), np.uint16), orientation=iop))]
    ).series
    assert series.set_aside is None
    assert any("in-plane rotation of 10°" in note for note in series.notes)


def test_non_square_slices_stored_in_two_orientations_are_mixed_sizes() -> None:
    image = np.zeros((256, 128), np.uint16)
    files = [
        ("a.dcm", synthetic_ct(image, z=0)),
        ("b.dcm", synthetic_ct(image, z=5, orientation=[0, 1, 0, 1, 0, 0])),  # transposed
    ]
    with pytest.raises(MixedSliceSizesError, match="different orientations"):
        ingest(files)


def test_oblique_slices_are_set_aside() -> None:
    t = math.radians(40)
    iop = [1, 0, 0, 0, math.cos(t), -math.sin(t)]
    image = np.zeros((512, 512), np.uint16)
    files = [(f"{z}.dcm", synthetic_ct(image, z=z, orientation=iop)) for z in (0, 5)]
    (series,) = ingest(files).series
    assert series.set_aside is not None
    assert series.set_aside.startswith("not axial: oblique (slice normal 40° from the head–feet")


# --- real data --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def volume() -> Volume:
    return read_volume(P002)


@pytest.fixture(scope="module")
def p002() -> Study:
    return ingest_zip(zip_dirs(P002), IngestLimits())


@needs_data
@pytest.mark.parametrize(
    ("steps", "differed_before"),
    [
        # Slices whose dark-pixel counts differed from the original's before orientation
        # was normalised (measured with the previous ingest, 2026-12): 88, 129, 122, 133.
        (("flip_columns",), 88),
        (("flip_rows",), 129),
        (("transpose",), 122),
        (("flip_columns", "flip_rows"), 133),
        (("transpose", "flip_columns"), None),
    ],
)
def test_p002_restored_flipped_or_transposed_is_the_same_series(
    volume: Volume, p002: Study, steps: tuple[str, ...], differed_before: int | None
) -> None:
    files = restored(volume, "P002x", *steps)
    first = pydicom.dcmread(io.BytesIO(files[0][1]))
    assert not np.array_equal(first.pixel_array, volume.pixels[0])  # stored otherwise
    (series,) = ingest(files).series
    (original,) = p002.series
    assert [s.position_mm for s in series.slices] == [s.position_mm for s in original.slices]
    assert "head → feet" in series.order
    counts, expected = (dark_pixel_counts(s.pixels, PAPER_RULE) for s in (series, original))
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(
        select_open_lung(series.pixels, PAPER_RULE).mask,
        select_open_lung(original.pixels, PAPER_RULE).mask,
    )
    np.testing.assert_array_equal(series.pixels, original.pixels)
    assert any(note.startswith("brought to the standard display") for note in series.notes)


@needs_data
def test_monochrome1_p002_is_the_same_series(volume: Volume, p002: Study) -> None:
    # Before the inversion was removed: 114 of 133 slices' dark-pixel counts differed.
    (series,) = ingest(restored(volume, "P002m1", photometric="MONOCHROME1")).series
    np.testing.assert_array_equal(series.pixels, p002.series[0].pixels)


@needs_data
@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_p002_reformats_are_set_aside(volume: Volume, plane: str) -> None:
    (series,) = ingest(reformatted(volume, plane, plane)).series
    assert len(series.slices) == 32 and series.resampled_from == (133, 512)
    assert series.set_aside is not None
    assert series.set_aside.startswith(f"not axial: {plane} (slice normal 90° from the head–feet")
    assert series.geometry is not None and series.geometry.normal_angle_deg == 90
    assert not any("standard display" in note for note in series.notes)


@needs_data
def test_enhanced_ct_is_flipped_left_right_and_ordered_head_to_feet() -> None:
    path = VARIANTS / "enhanced-ct-2-frames.dcm"
    (series,) = ingest([("e.dcm", path)]).series
    # Orientation (−1,0,0)/(0,1,0): columns run left → right, and the normal points to the
    # feet; frame 1 is higher. Intercept −1024 (in the functional groups): stored = HU + 1024.
    assert [(s.frame, s.position_mm) for s in series.slices] == [(1, -149.0), (0, -159.0)]
    np.testing.assert_array_equal(series.pixels, stored(path)[::-1, :, ::-1])
    assert series.notes == (
        "brought to the standard display (rows anterior → posterior, columns patient right → "
        "left): flipped left-right",
    )


@needs_data
@pytest.mark.parametrize("where_", ["shared", "per-frame"])
def test_enhanced_ct_orientation_is_read_per_frame(where_: str) -> None:
    ds = pydicom.dcmread(VARIANTS / "enhanced-ct-2-frames.dcm")
    coronal = [1, 0, 0, 0, 0, -1]
    shared = ds.SharedFunctionalGroupsSequence[0]
    if where_ == "shared":
        shared.PlaneOrientationSequence[0].ImageOrientationPatient = coronal
    else:  # frame 0 alone is coronal: its own group overrides the shared one
        item = pydicom.Dataset()
        item.ImageOrientationPatient = coronal
        ds.PerFrameFunctionalGroupsSequence[0].PlaneOrientationSequence = [item]
    (series,) = ingest([("e.dcm", dicom_bytes(ds))]).series
    what = "coronal" if where_ == "shared" else "1 of 2 slices coronal"
    assert series.set_aside is not None and series.set_aside.startswith(f"not axial: {what} (")


@needs_data
@pytest.mark.parametrize(
    ("name", "display"),
    [
        # Prone (HFP, FFP), stored as acquired: IOP (−1,0,0)/(0,−1,0): a half turn.
        ("ID_0050.dcm", lambda a: a[::-1, ::-1]),
        ("ID_0051.dcm", lambda a: a[::-1, ::-1]),
        ("ID_0056.dcm", lambda a: a[::-1, ::-1]),
        # Decubitus left (HFDL): IOP (0,−1,0)/(1,0,0): rows along x, columns along −y.
        ("ID_0052.dcm", lambda a: a.T[::-1]),
    ],
)
def test_tcga_slices_stored_turned_are_brought_to_the_display(name: str, display: object) -> None:
    path = VARIANTS / "tcga-luad-single-slices" / name
    ds = pydicom.dcmread(path)
    values = np.clip(
        ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept), -1024, None
    )
    (series,) = ingest([(name, path)]).series
    assert series.set_aside is None and len(series.notes) == 1
    np.testing.assert_array_equal(series.pixels[0], display(np.rint(values + 1024)))  # type: ignore[operator]


def test_a_study_keeps_its_axial_series_and_sets_the_others_aside() -> None:
    image = np.zeros((512, 512), np.uint16)
    axial = [(f"a/{z}.dcm", synthetic_ct(image, z=z)) for z in (0, 5)]
    coronal = [("c/0.dcm", synthetic_ct(image, uid="1.2.9", orientation=[1, 0, 0, 0, 0, -1]))]
    study = ingest(axial + coronal)
    assert [(s.key, s.set_aside is None) for s in study.series] == [
        (SERIES_UID, True),
        ("1.2.9", False),
    ]

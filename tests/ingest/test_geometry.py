"""A series' geometry (app/ingest/geometry.py → app.domain.Geometry): read from the
headers, spacing measured from the positions, notes where tags are missing; and the
comparison with the ranges a model card declares (Geometry.outside)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from app.domain import Geometry
from app.ingest import IngestLimits, ingest_zip
from dicom_factory import dicom_bytes, file_bytes, synthetic_ct
from ingest_support import ingest
from shared_data import P002, VARIANTS, needs_data, zip_dirs


@needs_data
def test_p002_geometry_is_its_headers_and_positions() -> None:
    (series,) = ingest_zip(zip_dirs(P002), IngestLimits()).series
    first, last = (pydicom.dcmread(P002 / f"IM{i:04d}.dcm") for i in (1, 133))
    spacing = tuple(float(v) for v in first.PixelSpacing)
    gap = (float(first.ImagePositionPatient[2]) - float(last.ImagePositionPatient[2])) / 132
    assert series.geometry == Geometry(
        pixel_spacing_mm=pytest.approx(spacing, abs=1e-6),  # type: ignore[arg-type]
        slice_thickness_mm=float(first.SliceThickness),
        spacing_between_slices_mm=pytest.approx(gap, abs=1e-6),  # type: ignore[arg-type]
        spacing_uniform=True,
        gantry_tilt_deg=float(first.GantryDetectorTilt),
        normal_angle_deg=0.0,
    )
    assert (spacing, float(first.SliceThickness), round(gap, 6)) == ((0.603515625,) * 2, 2, 2)
    assert not any(note.startswith("geometry") for note in series.notes)


@needs_data
def test_enhanced_ct_geometry_comes_from_the_functional_groups() -> None:
    (series,) = ingest([("e.dcm", VARIANTS / "enhanced-ct-2-frames.dcm")]).series
    # Pixel Measures: 0.388672 mm, 10 mm thick; positions −149 and −159 mm; no tilt tag.
    assert series.geometry == Geometry((0.388672, 0.388672), 10.0, 10.0, True, None, 0.0)


def slice_with(z: float, **tags: object) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(np.zeros((16, 16), np.uint16), z=z)))
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return file_bytes(ds)


def test_measured_spacing_and_a_missing_slice() -> None:
    tags = {"PixelSpacing": [0.7, 0.8], "SliceThickness": "1.25", "GantryDetectorTilt": "-15"}
    uniform = [(f"{z}.dcm", slice_with(z, **tags)) for z in (0.0, 1.25, 2.5, 3.75, 5.0)]
    (series,) = ingest(uniform).series
    assert series.geometry == Geometry((0.7, 0.8), 1.25, 1.25, True, -15.0, 0.0)
    gap = uniform[:2] + uniform[3:]  # the slice at 2.5 mm is missing: gaps 1.25, 2.5, 1.25
    (series,) = ingest(gap).series
    assert series.geometry is not None
    assert (series.geometry.spacing_between_slices_mm, series.geometry.spacing_uniform) == (
        1.25,
        False,
    )
    assert "geometry: spacing between slices not uniform (1.25 to 2.5 mm)" in series.notes


def test_missing_tags_are_unknown_with_a_note() -> None:
    (series,) = ingest([("a.dcm", synthetic_ct(np.zeros((16, 16), np.uint16), z=None))]).series
    assert series.geometry == Geometry()
    assert "geometry: no PixelSpacing (reported as unknown)" in series.notes
    assert "geometry: no SliceThickness (reported as unknown)" in series.notes


def test_a_transposed_series_reports_its_spacing_as_displayed() -> None:
    ds = pydicom.dcmread(io.BytesIO(synthetic_ct(np.zeros((16, 16), np.uint16))))
    ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
    ds.PixelSpacing = [0.5, 0.9]  # between rows (along x here), between columns (along y)
    (series,) = ingest([("a.dcm", dicom_bytes(ds))]).series
    assert series.geometry is not None and series.geometry.pixel_spacing_mm == (0.9, 0.5)


# --- the ranges seen in training --------------------------------------------------------

TRAINED = {"pixel_spacing_mm": [0.5, 0.8], "slice_thickness_mm": [1.0, 3.0]}


def test_geometry_inside_the_ranges_gives_no_warning() -> None:
    assert Geometry((0.6, 0.6), 2.0, 2.0, True).outside(TRAINED) == []
    assert Geometry().outside(TRAINED) == []  # unknown values are not compared


def test_geometry_outside_the_ranges_is_named() -> None:
    found = Geometry((0.39, 0.39), 10.0, 10.0, True).outside(TRAINED)
    assert found == [
        "pixel spacing 0.39 × 0.39 mm is outside the range seen in training (0.5 to 0.8 mm)",
        "slice thickness 10 mm is outside the range seen in training (1 to 3 mm)",
    ]


def test_pixel_spacing_is_compared_as_the_model_sees_it() -> None:
    # 256×256 at 1.2 mm is resampled to 512×512 at 0.6 mm: inside the range.
    assert Geometry((1.2, 1.2)).outside(TRAINED, resampled_from=(256, 256)) == []
    assert Geometry((1.2, 1.2)).outside(TRAINED) != []


@pytest.mark.parametrize("bounds", [[1.0], "1-3", [1.0, "3"], None, [True, 3]])
def test_malformed_ranges_are_not_compared(bounds: object) -> None:
    assert Geometry(slice_thickness_mm=10.0).outside({"slice_thickness_mm": bounds}) == []

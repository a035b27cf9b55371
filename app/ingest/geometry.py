"""A DICOM series' geometry (app.domain.Geometry) from its ordered frames.

Pixel spacing, slice thickness and gantry tilt are read from the headers (the most common
value when slices differ); the spacing between slices is measured from the positions along
the normal. A missing tag leaves its value None, with a note; nothing else changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from app.domain import Geometry
from app.ingest.frames import Frame

# Gaps along the normal are uniform when each is within this of their median (DS values
# carry ~1e-4 mm of rounding; a missing slice doubles a gap).
SPACING_TOLERANCE_MM = 0.01
SPACING_TOLERANCE_FRACTION = 0.01

T = TypeVar("T")


def series_geometry(frames: Sequence[Frame], displayed: bool) -> tuple[Geometry, list[str]]:
    """Geometry of the ordered, de-duplicated frames of one DICOM series, and its notes;
    `displayed`: the pixels were brought to the standard display (pixel spacing follows)."""
    notes: list[str] = []
    spacings = [_displayed_spacing(f) if displayed else f.spacing for f in frames]
    spacing = _common(spacings, "PixelSpacing", notes)
    thickness = _common([f.thickness for f in frames], "SliceThickness", notes)
    tilt = _common([f.tilt for f in frames], None, notes)
    angles = [f.orientation.angle_deg for f in frames if f.orientation is not None]
    gap, uniform = _spacing([f.position for f in frames], notes)
    geometry = Geometry(
        pixel_spacing_mm=spacing,
        slice_thickness_mm=thickness,
        spacing_between_slices_mm=gap,
        spacing_uniform=uniform,
        gantry_tilt_deg=tilt,
        normal_angle_deg=round(max(angles), 1) if angles else None,
    )
    return geometry, notes


def _displayed_spacing(frame: Frame) -> tuple[float, float] | None:
    """PixelSpacing (between rows, between columns) as the slice will be displayed."""
    if frame.spacing is None or frame.orientation is None or not frame.orientation.transpose:
        return frame.spacing
    return frame.spacing[1], frame.spacing[0]


def _common(values: list[T | None], tag: str | None, notes: list[str]) -> T | None:
    """The most common value; notes say when it is missing (for `tag`) or differs."""
    present = Counter(v for v in values if v is not None)
    if not present:
        if tag is not None:
            notes.append(f"geometry: no {tag} (reported as unknown)")
        return None
    value, n = present.most_common(1)[0]
    if n < len(values) and tag is not None:
        notes.append(f"geometry: {tag} differs between slices; the most common is reported")
    return value


def _spacing(positions: list[float | None], notes: list[str]) -> tuple[float | None, bool | None]:
    """Median gap between consecutive positions, and whether every gap is within tolerance."""
    if len(positions) < 2 or any(p is None for p in positions):
        return None, None
    gaps = np.abs(np.diff(np.array(positions, dtype=np.float64)))
    median = float(np.median(gaps))
    tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * median)
    uniform = bool(np.all(np.abs(gaps - median) <= tolerance))
    if not uniform:
        low, high = float(gaps.min()), float(gaps.max())
        notes.append(f"geometry: spacing between slices not uniform ({low:.3g} to {high:.3g} mm)")
    return round(median, 6), uniform

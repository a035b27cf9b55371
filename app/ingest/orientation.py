"""ImageOrientationPatient → the slice normal, whether a slice is axial, and the exact
flips and transposes that bring an axial slice to the standard radiological display.

Patient coordinates are DICOM's (LPS): +x towards the patient's left, +y posterior, +z
towards the head. The standard display, the paper's and the selector's ROI's: along a row
(rising column index) patient right → left (+x), down a column (rising row index)
anterior → posterior (+y); ImageOrientationPatient ≈ [1,0,0, 0,1,0] (docs/judging.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# A slice whose normal is more than this far from the head–feet axis is not axial: the
# ROI and the network mean nothing on it. Gantry tilts stay well under it (≤ ~30° on
# scanners that tilt at all); coronal and sagittal reformats are at 90°.
AXIAL_LIMIT_DEG = 30.0
# In-plane rotation left after the flips and transposes (which turn by multiples of 90°)
# above which the series' notes say the display is not the standard one.
ROTATION_NOTE_DEG = 1.0
# Stacking direction, by the normal's dominant axis, for descending position.
DIRECTIONS = ("left → right", "posterior → anterior", "superior → inferior (head → feet)")
_PLANES = ("sagittal", "coronal")  # the non-axial plane, by the normal's dominant axis


@dataclass(frozen=True)
class Orientation:
    """A slice's row and column directions (unit vectors in patient space)."""

    row: tuple[float, float, float]  # ImageOrientationPatient[0:3]: rising column index
    col: tuple[float, float, float]  # ImageOrientationPatient[3:6]: rising row index

    @staticmethod
    def from_cosines(cosines: np.ndarray) -> Orientation | None:
        """From the six direction cosines; None when they are not two finite, non-zero,
        non-parallel directions."""
        if cosines.shape != (6,) or not np.all(np.isfinite(cosines)):
            return None
        row, col = cosines[:3], cosines[3:]
        norms = float(np.linalg.norm(row)), float(np.linalg.norm(col))
        if not min(norms) > 1e-6:
            return None
        row, col = row / norms[0], col / norms[1]
        if not float(np.linalg.norm(np.cross(row, col))) > 1e-6:
            return None
        return Orientation(_triple(row), _triple(col))

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal, signed so that its dominant component is positive (descending
        position along it is head → feet for any axial slice, however it is stored)."""
        n = np.cross(self.row, self.col)
        n = n / np.linalg.norm(n)
        return n * float(np.sign(n[int(np.argmax(np.abs(n)))]))

    @property
    def axis(self) -> int:
        """Dominant axis of the normal: 0 x (sagittal), 1 y (coronal), 2 z (axial)."""
        return int(np.argmax(np.abs(self.normal)))

    @property
    def angle_deg(self) -> float:
        """Angle between the slice normal and the head–feet axis, 0…90°."""
        return math.degrees(math.acos(min(1.0, abs(float(self.normal[2])))))

    @property
    def axial(self) -> bool:
        return self.angle_deg <= AXIAL_LIMIT_DEG

    @property
    def plane(self) -> str:
        """'axial', 'coronal' or 'sagittal' (normal within the limit of an axis), else 'oblique'."""
        if self.axial:
            return "axial"
        axis = self.axis
        off_axis = math.degrees(math.acos(min(1.0, abs(float(self.normal[axis])))))
        return _PLANES[axis] if axis < 2 and off_axis <= AXIAL_LIMIT_DEG else "oblique"

    def position(self, ipp: np.ndarray) -> float:
        """ImagePositionPatient along the normal, in mm."""
        return float(ipp @ self.normal)

    # --- the way to the standard display ----------------------------------------------

    @property
    def transpose(self) -> bool:
        """Rows run along y (left-right along columns): swap rows and columns first."""
        return abs(self.row[1]) > abs(self.row[0])

    def _displayed(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Row and column directions after the transpose (if any)."""
        return (self.col, self.row) if self.transpose else (self.row, self.col)

    @property
    def flip_rows(self) -> bool:
        """Rows run posterior → anterior: reverse their order (up-down)."""
        return self._displayed()[1][1] < 0

    @property
    def flip_columns(self) -> bool:
        """Columns run left → right: reverse them (left-right)."""
        return self._displayed()[0][0] < 0

    @property
    def steps(self) -> tuple[str, ...]:
        """What `to_display` does, in words and order; () when already standard."""
        done = (
            ("transposed", self.transpose),
            ("flipped up-down", self.flip_rows),
            ("flipped left-right", self.flip_columns),
        )
        return tuple(step for step, applies in done if applies)

    @property
    def rotation_deg(self) -> float:
        """In-plane rotation left once in the display, −45…45° (0 for an exact one)."""
        row = self._displayed()[0]
        sign = -1.0 if self.flip_columns else 1.0
        return math.degrees(math.atan2(sign * row[1], sign * row[0]))

    def to_display(self, image: np.ndarray) -> np.ndarray:
        """The stored [rows, columns] image in the standard display (exact: a view)."""
        if self.transpose:
            image = image.T
        if self.flip_rows:
            image = image[::-1]
        if self.flip_columns:
            image = image[:, ::-1]
        return image


def _triple(v: np.ndarray) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])

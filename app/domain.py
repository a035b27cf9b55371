"""Typed objects that travel between the pipeline stages (ingest → select → infer → diagnose)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydicom.dataset import Dataset

Outcome = Literal["covid", "normal", "indeterminate"]


@dataclass(frozen=True)
class SliceInfo:
    """Where one slice came from. `source` is an archive member name: responses only, never logs."""

    source: str
    frame: int | None = None  # frame (DICOM) or page (TIFF) index in a multi-frame file
    position_mm: float | None = None  # ImagePositionPatient projected on the slice normal
    instance_number: int | None = None
    # DICOM only, as stored (patient data: never logged, hence out of repr): what a DICOM
    # result (app/reports) must reference. None for TIFF or where the header lacks them.
    sop_class_uid: str | None = field(default=None, repr=False)
    sop_instance_uid: str | None = field(default=None, repr=False)
    series_instance_uid: str | None = field(default=None, repr=False)
    study_instance_uid: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Geometry:
    """A DICOM series' geometry as stored; None where the header does not say.

    Pixel spacing is (between rows, between columns) in the standard display, before any
    resampling to 512×512; the spacing between slices is measured from the positions.
    """

    pixel_spacing_mm: tuple[float, float] | None = None
    slice_thickness_mm: float | None = None
    spacing_between_slices_mm: float | None = None  # median gap along the slice normal
    spacing_uniform: bool | None = None  # every gap within 0.01 mm or 1 % of the median
    gantry_tilt_deg: float | None = None  # GantryDetectorTilt, when present
    normal_angle_deg: float | None = None  # slice normal from the head–feet axis

    def outside(
        self, ranges: Mapping[str, object], resampled_from: tuple[int, int] | None = None
    ) -> list[str]:
        """What lies outside `ranges` (e.g. a model card's training_geometry: {
        "pixel_spacing_mm": [lo, hi], "slice_thickness_mm": [lo, hi],
        "spacing_between_slices_mm": [lo, hi], "gantry_tilt_deg": [lo, hi]}), in words.
        Pixel spacing is compared as the model sees it: after resampling to 512×512.
        Unknown values and malformed ranges are not compared."""
        values: dict[str, tuple[float, ...]] = {}
        if self.pixel_spacing_mm is not None:
            sides = resampled_from or (512, 512)
            values["pixel_spacing_mm"] = tuple(
                s * n / 512 for s, n in zip(self.pixel_spacing_mm, sides, strict=True)
            )
        for name in ("slice_thickness_mm", "spacing_between_slices_mm", "gantry_tilt_deg"):
            value = getattr(self, name)
            if value is not None:
                values[name] = (value,)
        found = []
        for name, seen in values.items():
            bounds = ranges.get(name)
            if not (isinstance(bounds, list | tuple) and len(bounds) == 2):
                continue
            if not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds):
                continue
            lo, hi = float(bounds[0]), float(bounds[1])
            if any(not lo <= v <= hi for v in seen):
                shown = " × ".join(f"{v:.3g}" for v in seen)
                label = name.replace("_", " ").removesuffix(" mm").removesuffix(" deg")
                unit = "°" if name.endswith("_deg") else " mm"
                found.append(
                    f"{label} {shown}{unit} is outside the range seen in training "
                    f"({lo:g} to {hi:g}{unit})"
                )
        return found


@dataclass(frozen=True)
class Series:
    """One ordered series.

    `pixels` is uint16 [N, 512, 512]: stored values, HU + 1024, clipped at 0.
    """

    index: int  # 1-based, in the order series appear in the response
    kind: Literal["dicom", "tiff"]
    key: str  # SeriesInstanceUID (DICOM) or the folder holding the TIFFs
    slices: tuple[SliceInfo, ...]
    pixels: np.ndarray
    order: str  # how the slices were ordered, in words (direction included)
    resampled_from: tuple[int, int] | None = None  # original (rows, cols) when not 512×512
    notes: tuple[str, ...] = ()  # decisions taken on this series (duplicates dropped, ...)
    # Why this series is not judged (e.g. "not axial: ..."); None when it can be judged.
    # A set-aside series never reaches the model and cannot decide the patient.
    set_aside: str | None = None
    geometry: Geometry | None = None  # DICOM only: TIFF has no geometry tags
    # DICOM only: one source instance's header without pixel data (the patient and study
    # modules of a DICOM result are copied from it). In memory only: never logged.
    source_header: Dataset | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3 or self.pixels.shape[0] != len(self.slices):
            raise ValueError(
                f"pixels must be [N, H, W] with N = len(slices). Received: "
                f"shape={self.pixels.shape}, slices={len(self.slices)}"
            )


@dataclass(frozen=True)
class SkippedMember:
    """An archive member that gave no slice, by index (names may hold patient data)."""

    index: int
    reason: str


@dataclass(frozen=True)
class Study:
    """Everything ingest got out of one upload."""

    series: tuple[Series, ...]
    skipped: tuple[SkippedMember, ...] = ()
    members: int = 0  # archive members seen (directories excluded)


@dataclass(frozen=True)
class Selection:
    """The paper's open-lung rule applied to one series."""

    counts: np.ndarray  # int64 [N]: pixels < dark_value inside the ROI
    threshold: float  # (max - min) / divisor
    mask: np.ndarray  # bool [N]: counts > threshold
    has_lung: bool  # max(counts) >= min_lung_pixels

    @property
    def n_selected(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class Verdict:
    """The patient threshold applied to one series (or, at the top, the deciding series)."""

    outcome: Outcome
    k: int  # selected slices scored COVID (probability > 0.5)
    n: int  # selected slices
    required: int  # max(1, ceil(t * n)); 0 when indeterminate
    threshold: float  # t
    reason: str = ""


@dataclass(frozen=True)
class SeriesResult:
    series: Series
    selection: Selection
    covid_probability: np.ndarray  # float32 [N], NaN where the slice was not selected
    verdict: Verdict


@dataclass(frozen=True)
class PatientResult:
    verdict: Verdict
    series: tuple[SeriesResult, ...]
    deciding_series: int | None  # Series.index, None when indeterminate
    timings_ms: dict[str, float] = field(default_factory=dict)

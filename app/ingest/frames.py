"""What the readers hand to series assembly: frames (future slices) and skipped members.

A member that gives no slice is skipped with a category and a reason free of patient data:
readers raise `Skip`, and what is skipped travels back as `Skipped` values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
from pydicom.dataset import Dataset

from app.domain import SkippedMember
from app.ingest.orientation import Orientation

SIZE = 512  # slices leave ingest as SIZE × SIZE
MAX_SIDE = 4096  # a larger image is no CT slice (and may be a decompression bomb)

# Why a member gave nothing. When nothing usable is left, the first category present (in
# app/ingest/study.py's order) picks the error.
Category = Literal["encrypted", "syntax", "image", "corrupt", "other"]


class Skip(Exception):
    """A member (or frame) that gives no slice: a category and a reason free of patient data."""

    def __init__(self, category: Category, reason: str) -> None:
        super().__init__(reason)
        self.category, self.reason = category, reason


@dataclass(frozen=True)
class Skipped:
    """A skipped member, with the category that picks the error when nothing is left."""

    category: Category
    member: SkippedMember

    @staticmethod
    def of(index: int, skip: Skip) -> Skipped:
        return Skipped(skip.category, SkippedMember(index, skip.reason))


class DecodeTask(NamedTuple):
    """What a decode worker gets for one DICOM frame (`dicom.decode_frame(*task)`): the
    Pixel Data element's value and pydicom's description of it, never the member's header."""

    syntax: str  # Transfer Syntax UID
    pixels: bytes  # the Pixel Data value: the file's (its frames share it) or one frame's
    frame: int  # the frame in `pixels`, 0-based
    options: dict[str, Any]  # pydicom's pixel description: rows, columns, bits, frames ...
    slope: float  # RescaleSlope
    intercept: float  # RescaleIntercept


@dataclass(frozen=True)
class Frame:
    """One future slice: header facts now, pixels on `load()` (uint16 stored values, in the
    stored orientation; series assembly brings them to the standard display)."""

    member: int
    name: str
    kind: Literal["dicom", "tiff"]
    key: str  # SeriesInstanceUID, or the folder (TIFF; DICOM without the UID)
    shape: tuple[int, int]  # (rows, columns) as stored
    load: Callable[[], np.ndarray]
    frame: int | None = None  # 0-based, in multi-frame files only
    position: float | None = None  # mm along the slice normal, signed so head → feet falls
    instance: int | None = None
    by_folder: bool = False  # DICOM without SeriesInstanceUID
    task: DecodeTask | None = None  # DICOM: what a decode worker gets
    orientation: Orientation | None = None  # None: TIFF, or no readable orientation
    spacing: tuple[float, float] | None = None  # PixelSpacing (between rows, columns), stored
    thickness: float | None = None  # SliceThickness, mm
    tilt: float | None = None  # GantryDetectorTilt, degrees
    # DICOM: SOP Class, SOP Instance, Series and Study Instance UIDs as stored ("" where
    # absent) and the member's header without pixel data. Patient data: never logged.
    uids: tuple[str, str, str, str] | None = field(default=None, repr=False)
    header: Dataset | None = field(default=None, repr=False, compare=False)

    @property
    def display_shape(self) -> tuple[int, int]:
        """(rows, columns) once in the standard display (a transpose swaps them)."""
        if self.orientation is not None and self.orientation.transpose:
            return self.shape[1], self.shape[0]
        return self.shape

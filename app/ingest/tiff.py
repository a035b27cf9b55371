"""A TIFF member → frames, one per page: integer pages are stored values as they are.

TIFF has no orientation or geometry tags: its pages are taken as displayed.
"""

from __future__ import annotations

import io
import posixpath
from functools import partial
from typing import cast

import numpy as np
import tifffile

from app import errors
from app.ingest.frames import MAX_SIDE, Frame, Skip
from app.ingest.limits import IngestLimits

_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF


def is_tiff(data: bytes) -> bool:
    return data[:4] in _MAGIC


def read_tiff(index: int, name: str, data: bytes, limits: IngestLimits) -> list[Frame]:
    """One frame per page; pixels decode later, from the still open file."""
    pages: list[tifffile.TiffPage] = []
    for item in tifffile.TiffFile(io.BytesIO(data)).pages:
        page = cast(tifffile.TiffPage, item)  # TiffFrame only when pages.useframes is set
        if len(pages) == limits.max_slices_per_series:
            raise errors.TooManySlicesError(f"archive member {index} holds too many pages")
        _check_page(page)
        pages.append(page)
    key, multi = posixpath.dirname(name) or ".", len(pages) > 1
    return [
        Frame(index, name, "tiff", key, (rows, cols), partial(_load, page), i if multi else None)
        for i, page in enumerate(pages)
        for rows, cols in [page.shape]
    ]


def _check_page(page: tifffile.TiffPage) -> None:
    dtype = np.dtype(page.dtype) if page.dtype is not None else np.dtype("V")
    if dtype.kind == "f":
        raise Skip("image", "float TIFF has lost the raw stored values")
    if page.samplesperpixel != 1 or page.photometric != tifffile.PHOTOMETRIC.MINISBLACK:
        raise Skip("image", "RGB, palette or multi-sample TIFF cannot hold raw CT values")
    if dtype.kind not in "ui":
        raise Skip("image", "TIFF sample format cannot hold raw CT values")
    if dtype.itemsize < 2:
        raise Skip("image", "8-bit TIFF cannot hold raw CT values (16-bit needed)")
    if len(page.shape) != 2 or not all(0 < side <= MAX_SIDE for side in page.shape):
        raise Skip("image", f"TIFF page is not a 2-D image up to {MAX_SIDE} pixels a side")


def _load(page: tifffile.TiffPage) -> np.ndarray:
    """Integer pages are stored values as they are: uint16 kept, others clipped to uint16."""
    values = page.asarray()
    if values.dtype == np.uint16:
        return values
    return np.clip(values.astype(np.int64), 0, 65535).astype(np.uint16)

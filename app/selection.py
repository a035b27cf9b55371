"""Stage 2: the paper's open-lung slice selector (Rahimzadeh et al. 2021, section 2.2).

For every slice, count the pixels darker than `dark_value` (300 ≈ −724 HU: air and lung)
inside rows 240:340 and columns 120:370 of the 512×512 image. With `max` and `min` the
largest and smallest count of the series, a slice is selected when its count exceeds
(max − min) / 1.5. The threshold is relative, so it keeps some slices even in a series
with no lung at all; a series whose largest count is below `min_lung_pixels` is flagged
(`has_lung=False`) so that diagnosis can answer `indeterminate` instead.

Both the service and the offline evaluation call `select_open_lung`: the rule exists once.
"""

from __future__ import annotations

import numpy as np

from app.domain import Selection
from app.settings import Settings

# The paper's constants; the service passes its validated settings (same defaults).
DARK_VALUE = 300
ROI_ROWS = (240, 340)
ROI_COLS = (120, 370)
THRESHOLD_DIVISOR = 1.5


def dark_pixel_counts(
    stack: np.ndarray,
    *,
    dark_value: int = DARK_VALUE,
    roi_rows: tuple[int, int] = ROI_ROWS,
    roi_cols: tuple[int, int] = ROI_COLS,
) -> np.ndarray:
    """Pixels < dark_value in the ROI of each slice: [N, 512, 512] stored values → int64 [N]."""
    if stack.ndim != 3:
        raise ValueError(f"stack must be [N, H, W]. Received: shape={stack.shape}")
    roi = stack[:, roi_rows[0] : roi_rows[1], roi_cols[0] : roi_cols[1]]
    return np.count_nonzero(roi < dark_value, axis=(1, 2)).astype(np.int64)


def select_open_lung(
    stack: np.ndarray,
    *,
    dark_value: int = DARK_VALUE,
    roi_rows: tuple[int, int] = ROI_ROWS,
    roi_cols: tuple[int, int] = ROI_COLS,
    divisor: float = THRESHOLD_DIVISOR,
    min_lung_pixels: int = 0,
) -> Selection:
    """Apply the open-lung rule to one series. stack: [N, 512, 512] stored values (HU + 1024)."""
    counts = dark_pixel_counts(stack, dark_value=dark_value, roi_rows=roi_rows, roi_cols=roi_cols)
    if counts.size == 0:
        return Selection(counts, 0.0, np.zeros(0, dtype=bool), has_lung=False)
    # The paper divides the range by 1.5 without adding the minimum back.
    threshold = float(counts.max() - counts.min()) / divisor
    return Selection(
        counts=counts,
        threshold=threshold,
        mask=counts > threshold,
        has_lung=bool(counts.max() >= min_lung_pixels),
    )


def select_with_settings(stack: np.ndarray, settings: Settings) -> Selection:
    """The rule with the service's validated settings (the service and `models evaluate`)."""
    return select_open_lung(
        stack,
        dark_value=settings.dark_value,
        roi_rows=settings.roi_rows,
        roi_cols=settings.roi_cols,
        divisor=settings.threshold_divisor,
        min_lung_pixels=settings.min_lung_pixels,
    )

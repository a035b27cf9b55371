"""Stage 2: the paper's open-lung slice selector (Rahimzadeh et al. 2021, section 2.2).

For every slice, count the pixels darker than `dark_value` (300 ≈ −724 HU: air and lung)
inside rows 240:340 and columns 120:370 of the 512×512 image. With `max` and `min` the
largest and smallest count of the series, a slice is selected when its count exceeds
(max − min) / 1.5. The threshold is relative, so it keeps some slices even in a series
with no lung at all; a series whose largest count is below `min_lung_pixels` is flagged
(`has_lung=False`) so that diagnosis can answer `indeterminate` instead.

Both the service and the offline evaluation call `select_open_lung` with a `SelectionRule`
(built once from the settings at start-up): the rule exists once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app.domain import Selection

# The paper's constants.
DARK_VALUE = 300
ROI_ROWS = (240, 340)
ROI_COLS = (120, 370)
THRESHOLD_DIVISOR = 1.5


@dataclass(frozen=True)
class SelectionRule:
    """The open-lung rule's constants: the paper's, plus the service's no-lung floor."""

    dark_value: int = DARK_VALUE  # stored value under which a pixel is air/lung
    roi_rows: tuple[int, int] = ROI_ROWS  # [start, stop) of the ROI's rows (y)
    roi_cols: tuple[int, int] = ROI_COLS  # [start, stop) of the ROI's columns (x)
    divisor: float = THRESHOLD_DIVISOR  # selected when count > (max - min) / divisor
    min_lung_pixels: int = 0  # largest count under this → has_lung False (the paper: none)

    def __post_init__(self) -> None:
        for name in ("roi_rows", "roi_cols"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi <= 512:
                raise ValueError(f"{name} must satisfy 0 <= lo < hi <= 512. Received: {lo, hi}")
        if self.divisor <= 0:
            raise ValueError(f"divisor must be > 0. Received: divisor={self.divisor}")


PAPER_RULE = SelectionRule()


def dark_pixel_counts(stack: np.ndarray, rule: SelectionRule = PAPER_RULE) -> np.ndarray:
    """Pixels < dark_value in the ROI of each slice: [N, 512, 512] stored values → int64 [N]."""
    if stack.ndim != 3:
        raise ValueError(f"stack must be [N, H, W]. Received: shape={stack.shape}")
    rows, cols = rule.roi_rows, rule.roi_cols
    roi = stack[:, rows[0] : rows[1], cols[0] : cols[1]]
    counts: np.ndarray = np.count_nonzero(roi < rule.dark_value, axis=(1, 2)).astype(np.int64)
    return counts


def select_open_lung(stack: np.ndarray, rule: SelectionRule = PAPER_RULE) -> Selection:
    """Apply the open-lung rule to one series. stack: [N, 512, 512] stored values (HU + 1024)."""
    counts = dark_pixel_counts(stack, rule)
    if counts.size == 0:
        return Selection(counts, 0.0, np.zeros(0, dtype=bool), has_lung=False)
    # The paper divides the range by 1.5 without adding the minimum back.
    threshold = float(counts.max() - counts.min()) / rule.divisor
    return Selection(
        counts=counts,
        threshold=threshold,
        mask=counts > threshold,
        has_lung=bool(counts.max() >= rule.min_lung_pixels),
    )

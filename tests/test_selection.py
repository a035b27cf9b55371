"""The paper's open-lung rule on synthetic stacks whose counts are known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from app.selection import SelectionRule, dark_pixel_counts, select_open_lung

FLOOR_500 = SelectionRule(min_lung_pixels=500)

ROI_PIXELS = 100 * 250


def stack_with_counts(counts: list[int], *, outside_dark: bool = True) -> np.ndarray:
    """512×512 slices, bright (1000) except `count` dark (0) pixels inside the ROI.

    Dark pixels outside the ROI (everywhere else, when outside_dark) must not count.
    """
    stack = np.full((len(counts), 512, 512), 1000, dtype=np.uint16)
    if outside_dark:
        stack[:, :240, :] = 0
        stack[:, 340:, :] = 0
        stack[:, :, :120] = 0
        stack[:, :, 370:] = 0
    for i, c in enumerate(counts):
        rows, cols = np.unravel_index(np.arange(c), (100, 250))
        stack[i, 240 + rows, 120 + cols] = 0
    return stack


@pytest.mark.parametrize("counts", [[0, 10, 20], [5], [ROI_PIXELS, 0, 123, 7]])
def test_counts_only_roi_pixels(counts: list[int]) -> None:
    assert dark_pixel_counts(stack_with_counts(counts)).tolist() == counts


def test_cutoff_is_strictly_below_300() -> None:
    stack = np.full((3, 512, 512), 1000, dtype=np.uint16)
    stack[0, 250, 200] = 299  # dark
    stack[1, 250, 200] = 300  # not dark: the rule is value < 300
    stack[2, 250, 200] = 301
    assert dark_pixel_counts(stack).tolist() == [1, 0, 0]


def test_paper_threshold_is_range_over_1_5_not_offset_by_min() -> None:
    # max 9000, min 3000: threshold (9000-3000)/1.5 = 4000, not 3000 + 4000.
    sel = select_open_lung(stack_with_counts([3000, 4000, 4001, 6000, 9000]))
    assert sel.threshold == pytest.approx(4000.0)
    assert sel.mask.tolist() == [False, False, True, True, True]


def test_ties_at_threshold_are_not_selected() -> None:
    # threshold = (3000 - 0) / 1.5 = 2000; a count equal to it is not "greater than".
    sel = select_open_lung(stack_with_counts([0, 2000, 2000, 2001, 3000]))
    assert sel.mask.tolist() == [False, False, False, True, True]


def test_all_equal_counts_select_every_slice_with_dark_pixels() -> None:
    sel = select_open_lung(stack_with_counts([1500] * 4))
    assert sel.threshold == 0.0
    assert sel.mask.all()


def test_single_slice() -> None:
    assert select_open_lung(stack_with_counts([800])).mask.tolist() == [True]
    assert select_open_lung(stack_with_counts([0])).mask.tolist() == [False]


def test_empty_roi_everywhere_selects_nothing_and_has_no_lung() -> None:
    sel = select_open_lung(stack_with_counts([0, 0, 0]), FLOOR_500)
    assert sel.n_selected == 0
    assert not sel.has_lung


def test_relative_rule_keeps_slices_without_lung_so_floor_flags_it() -> None:
    # Like the abdomen-only fixture: the largest count is 17 pixels, yet the rule keeps some.
    sel = select_open_lung(stack_with_counts([0, 2, 17, 12, 3, 0]), FLOOR_500)
    assert sel.mask.tolist() == [False, False, True, True, False, False]
    assert not sel.has_lung
    assert select_open_lung(stack_with_counts([0, 600]), FLOOR_500).has_lung


def test_empty_stack() -> None:
    sel = select_open_lung(np.zeros((0, 512, 512), np.uint16))
    assert sel.n_selected == 0 and not sel.has_lung


def test_rejects_wrong_rank() -> None:
    with pytest.raises(ValueError, match="Received"):
        dark_pixel_counts(np.zeros((512, 512)))

"""Drawing a map over its slice (app/overlay.py): lung window, colour map, PNG, peak."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.overlay import (
    COLOUR_LUT,
    blend,
    encode_png,
    heatmap_peak,
    lung_window,
    overlay_png,
)
from support import ct_like_slices


def test_lung_window_by_hand() -> None:
    # -1000 HU = stored 24 → 0; 400 HU = 1424 → 255; -300 HU = 724 → 127.5, rounded 128.
    stored = np.array([[0, 24, 724, 1424, 3000]], np.uint16)
    np.testing.assert_array_equal(lung_window(stored), [[0, 0, 128, 255, 255]])


def test_lookup_table_is_matplotlibs_inferno() -> None:
    colormaps = pytest.importorskip("matplotlib").colormaps
    expected = colormaps["inferno"](np.arange(256))[:, :3] * 255
    # 33 stops, linear between them: measured within 2 levels of matplotlib's 256 entries.
    assert np.abs(COLOUR_LUT - expected).max() <= 2.5
    assert COLOUR_LUT.shape == (256, 3) and COLOUR_LUT.dtype == np.uint8


def heat_blob(size: int = 512) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.exp(-(((yy - 300) / 60.0) ** 2 + ((xx - 200) / 80.0) ** 2)).astype(np.float32)


def test_blend_by_hand() -> None:
    colormaps = pytest.importorskip("matplotlib").colormaps
    stored = ct_like_slices(1, seed=3)[0, ..., 0]
    heat = heat_blob()
    grey = np.clip((stored - 24.0) / 1400 * 255, 0, 255)[..., None]
    # The map's value picks one of the 256 entries (0 → the first, 1 → the last).
    colour = colormaps["inferno"](np.rint(heat * 255).astype(int))[..., :3] * 255
    alpha = 0.6 * heat[..., None]
    expected = grey * (1 - alpha) + colour * alpha
    got = blend(stored, heat).astype(np.float64)
    # The table's 2.5 weighted by the opacity (at most 0.6), plus rounding: within 2.
    assert np.abs(got - expected).max() <= 2
    # A map of zeros leaves the slice as it is: grey, the lung window's values.
    unchanged = blend(stored, np.zeros_like(heat))
    for channel in range(3):
        np.testing.assert_array_equal(unchanged[..., channel], lung_window(stored))


def test_blend_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"Received: \(512, 512\), \(256, 256\)"):
        blend(np.zeros((512, 512)), np.zeros((256, 256)))


def test_png_is_a_palette_image_close_to_the_blend() -> None:
    stored = ct_like_slices(1, seed=4)[0, ..., 0]
    rgb = blend(stored, heat_blob())
    png = encode_png(rgb)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "P" and image.size == (512, 512)
        back = np.asarray(image.convert("RGB"), dtype=np.int64)
    # Measured on eight P002 slices with their maps: at most 13 levels per channel.
    assert np.abs(back - rgb).max() <= 14
    assert overlay_png(stored, heat_blob()) == png  # deterministic


def test_peak_by_hand() -> None:
    heat = np.zeros((512, 512), np.float32)
    assert heatmap_peak(heat) is None
    heat[10, 20] = heat[300, 5] = 1.0  # a tie: the first in row-major order
    heat[400, 400] = 0.5
    assert heatmap_peak(heat) == (10, 20)
    assert heatmap_peak(heat_blob()) == (300, 200)

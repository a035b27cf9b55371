"""models.keras2_hdf5: the one reader of Keras 2 HDF5 files (weight import, ImageNet transfer)."""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from keras2_h5 import HEADS, write_keras2_h5
from models.architecture import build_fpn_resnet50v2
from models.keras2_hdf5 import (
    WeightImportError,
    is_whole_model,
    read_keras2_h5,
    weight_kind,
)

KERAS23_HEADS = {head: f"dense_{i}" for i, head in enumerate(HEADS, start=1)}


@pytest.fixture(scope="module")
def small() -> keras.Model:
    return build_fpn_resnet50v2(input_size=96, seed=5)


@pytest.mark.parametrize("whole_model", [True, False])
def test_reader_takes_the_layers_with_weights_in_file_order(
    small: keras.Model, tmp_path: Path, whole_model: bool
) -> None:
    path = tmp_path / "FPN-fold1.hdf5"
    write_keras2_h5(
        path, small, rename=KERAS23_HEADS, whole_model=whole_model, scope_suffix="_1"
    )
    layers = read_keras2_h5(path)
    assert is_whole_model(path) is whole_model
    # Every layer with weights, none without; the heads last, as the writer listed them.
    assert list(layers) == [
        *(layer.name for layer in small.layers if layer.weights and layer.name not in HEADS),
        *(f"dense_{i}" for i in range(6, 0, -1)),
    ]
    conv = layers["conv1_conv"]
    assert conv.weight_names == ("conv1_conv_1/kernel:0", "conv1_conv_1/bias:0")
    assert conv.kinds() == ("kernel", "bias")
    np.testing.assert_array_equal(conv.arrays[0], small.get_layer("conv1_conv").kernel.numpy())
    assert layers["post_bn"].kinds() == ("gamma", "beta", "moving_mean", "moving_variance")


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("conv1_conv/kernel:0", "kernel"),
        ("conv1_conv_1/kernel:0", "kernel"),
        ("model_1/post_bn_1/moving_variance:0", "moving_variance"),
        ("bias", "bias"),
    ],
)
def test_weight_kind_drops_scope_and_suffix(name: str, kind: str) -> None:
    assert weight_kind(name) == kind


def test_a_keras3_file_is_refused_plainly(tmp_path: Path) -> None:
    path = tmp_path / "model.weights.h5"
    with h5py.File(path, "w") as f:
        f.create_group("layers")
    with pytest.raises(WeightImportError, match="not a Keras 2 HDF5 weights file"):
        read_keras2_h5(path)
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(WeightImportError, match="not an HDF5 file"):
        read_keras2_h5(tmp_path / "text.hdf5")

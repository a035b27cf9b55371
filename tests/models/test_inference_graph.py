"""Export-time rewrite for inference (models/inference_graph.py): BN folded or fused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.architecture import build_fpn_resnet50v2
from models.inference_graph import (
    FoldedBatchNormalization,
    FusedInferenceBatchNormalization,
    foldable_pairs,
    inference_graph,
)
from support import WIDE_HEAD_STD, ct_like_slices, give_trained_statistics


@pytest.fixture(scope="module")
def small_model() -> keras.Model:
    model = build_fpn_resnet50v2(input_size=128, head_init_std=WIDE_HEAD_STD, seed=0)
    return give_trained_statistics(model, seed=1)


def _outputs_of(model: keras.Model, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    probe = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    return [np.asarray(y) for y in probe([x], training=False)]


def test_the_32_bottleneck_batch_norms_fold_and_the_17_others_stay(
    small_model: keras.Model,
) -> None:
    pairs = foldable_pairs(small_model)
    assert len(pairs) == 32
    assert pairs["conv2_block1_1_conv"].name == "conv2_block1_1_bn"
    assert pairs["conv5_block3_2_conv"].name == "conv5_block3_2_bn"
    folded, counts = inference_graph(small_model)
    assert counts == {"folded_batch_norms": 32, "fused_batch_norms": 17}
    kinds = [type(layer) for layer in folded.layers]
    assert kinds.count(FoldedBatchNormalization) == 32
    assert kinds.count(FusedInferenceBatchNormalization) == 17  # preact_bn ×16, post_bn
    assert kinds.count(keras.layers.BatchNormalization) == 0
    assert folded.get_layer("conv2_block1_1_conv").use_bias
    assert not small_model.get_layer("conv2_block1_1_conv").use_bias  # original untouched


def test_folded_model_computes_the_same_function(small_model: keras.Model) -> None:
    x = ct_like_slices(3, seed=4)[:, 192:320, 192:320]
    folded, _ = inference_graph(small_model)
    names = [
        "conv3_block1_2_relu",
        "conv3_block1_out",
        "conv4_block1_preact_relu",
        "post_relu",
        "P3",
    ]
    for name, a, b in zip(
        names, _outputs_of(small_model, names, x), _outputs_of(folded, names, x), strict=True
    ):
        assert np.std(a) > 1e-3, name  # real activations, not all zero
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()))
    expected, got = np.asarray(small_model(x)), np.asarray(folded(x))
    assert np.ptp(expected[:, 0]) > 1e-3, expected
    np.testing.assert_allclose(got, expected, atol=1e-4)  # the wide head amplifies rounding


def test_a_convolution_read_twice_is_not_folded() -> None:
    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    bn = keras.layers.BatchNormalization(name="bn")(conv)
    out = keras.layers.Add()([bn, conv])  # the raw convolution output is read again
    model = keras.Model(inputs, out)
    assert foldable_pairs(model) == {}
    copy, counts = inference_graph(model)
    assert counts == {"folded_batch_norms": 0, "fused_batch_norms": 1}
    assert isinstance(copy.get_layer("bn"), FusedInferenceBatchNormalization)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(copy(x), model(x), atol=1e-5)


def test_a_model_without_batch_norm_comes_back_as_it_is() -> None:
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    same, counts = inference_graph(model)
    assert same is model and not any(counts.values())

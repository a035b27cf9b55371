"""The paper's FPN-ResNet50V2 (models/architecture.py): size, shapes, raw input, checks."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.architecture import (
    FEATURE_LAYERS,
    FIRST_CONV_LAYER,
    GFLOPS_PER_SLICE,
    PAPER_PARAMETERS,
    UpsampleLike,
    build_fpn_resnet50v2,
    estimate_gflops,
    feature_model,
)
from support import WIDE_HEAD_STD, ct_like_slices

FEATURE_SHAPES = {
    "conv4_block1_preact_relu": (32, 32, 512),  # C3
    "conv5_block1_preact_relu": (16, 16, 1024),  # C4
    "post_relu": (16, 16, 2048),  # C5
    "P3": (30, 30, 256),
    "P4": (14, 14, 256),
    "P5": (16, 16, 256),
    "P6": (8, 8, 256),
    "P7": (4, 4, 256),
}


@pytest.fixture(scope="module")
def model() -> keras.Model:
    return build_fpn_resnet50v2(head_init_std=WIDE_HEAD_STD, seed=0)


def test_parameter_count_is_the_papers(model: keras.Model) -> None:
    assert PAPER_PARAMETERS == 34_058_656
    assert model.count_params() == 34_058_656


def test_input_and_output_shapes(model: keras.Model) -> None:
    assert model.input_shape == (None, 512, 512, 1)
    assert model.output_shape == (None, 2)


@pytest.mark.parametrize(("name", "shape"), FEATURE_SHAPES.items())
def test_feature_shapes(model: keras.Model, name: str, shape: tuple[int, ...]) -> None:
    assert tuple(model.get_layer(name).output.shape) == (None, *shape)


def test_feature_model_runs_at_the_stated_shapes(model: keras.Model) -> None:
    assert tuple(FEATURE_SHAPES) == FEATURE_LAYERS
    features = feature_model(model)(ct_like_slices(1), training=False)
    assert {n: tuple(f.shape) for n, f in features.items()} == {
        n: (1, *s) for n, s in FEATURE_SHAPES.items()
    }


def test_the_raw_input_goes_straight_to_the_backbone(model: keras.Model) -> None:
    """No scaling layer (DESIGN.md section 3): the input, then ResNet50V2's own padding."""
    assert [layer.name for layer in model.layers[:3]] == ["slices", "conv1_pad", FIRST_CONV_LAYER]


def test_backbone_keeps_keras_names_and_shapes(model: keras.Model) -> None:
    """A later ImageNet transfer maps weights by layer name: all but the first conv fit."""
    reference = keras.applications.ResNet50V2(
        include_top=False, weights=None, input_shape=(96, 96, 3)
    )
    # Only Keras's weightless max-pooling layers are unnamed (max_pooling2d_<k>, numbered
    # per process); every layer with weights has a fixed name.
    for ref in (layer for layer in reference.layers if layer.weights):
        ours = model.get_layer(ref.name)
        shapes = [tuple(w.shape) for w in ours.weights]
        ref_shapes = [tuple(w.shape) for w in ref.weights]
        if ref.name == FIRST_CONV_LAYER:
            assert shapes == [(7, 7, 1, 64), (64,)] and ref_shapes[0] == (7, 7, 3, 64)
        else:
            assert shapes == ref_shapes, ref.name


@pytest.fixture(scope="module")
def scored(model: keras.Model) -> np.ndarray:
    """Output for three different slices, then the first two scaled by 2 and by 0.37."""
    x = ct_like_slices(3)
    return model(np.concatenate([x, 2 * x[:1], 0.37 * x[1:2]]), training=False).numpy()


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p[:, 0].astype(np.float64) / p[:, 1])


def test_outputs_are_probabilities_that_vary(scored: np.ndarray) -> None:
    assert scored.shape == (5, 2)
    np.testing.assert_allclose(scored.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(scored[:3, 0]) > 0.05, scored


def test_the_network_sees_the_scale_of_the_values(scored: np.ndarray) -> None:
    """Untrained, the network is positively homogeneous: its biases are 0 and its batch
    norms multiply by the constant 1/sqrt(1 + eps); ReLU, max-pooling, zero padding and
    nearest resizing commute with a positive factor. So scaling a slice by c scales the
    logit difference by c exactly (up to rounding), where a per-slice normalisation
    would leave it unchanged."""
    logits = _logit(scored)
    assert abs(logits[0]) > 0.1 and abs(logits[1]) > 0.1, logits
    # Measured relative deviations: 1.5e-8 (x 2) and 5.7e-5 (x 0.37, a smaller logit
    # read back from float32 probabilities of 0.87 and 0.67).
    assert logits[3] == pytest.approx(2 * logits[0], rel=1e-3)
    assert logits[4] == pytest.approx(0.37 * logits[1], rel=1e-3)


def test_paper_head_init_scores_every_slice_about_half() -> None:
    small = build_fpn_resnet50v2(input_size=128, seed=0)
    x = ct_like_slices(2)[:, :128, :128]
    p = small(x, training=False).numpy()
    np.testing.assert_allclose(p, 0.5, atol=0.01)


def test_seed_makes_builds_reproducible() -> None:
    first, second, other = (build_fpn_resnet50v2(input_size=96, seed=s) for s in (3, 3, 4))
    for name in (FIRST_CONV_LAYER, "P3", "P3_dense", "classification"):
        np.testing.assert_array_equal(
            first.get_layer(name).weights[0].numpy(), second.get_layer(name).weights[0].numpy()
        )
        assert not np.array_equal(
            first.get_layer(name).weights[0].numpy(), other.get_layer(name).weights[0].numpy()
        )


def test_head_init_std_sets_the_head_kernels(model: keras.Model) -> None:
    kernel = model.get_layer("P3_dense").weights[0].numpy()
    assert kernel.std() == pytest.approx(WIDE_HEAD_STD, rel=0.02)


def test_gflops_per_slice_agree_with_tensorflows_profiler(model: keras.Model) -> None:
    """TensorFlow's own FLOP statistics of the Conv2D and MatMul ops of one slice's graph
    are the independent count (measured: 40.787402792 GFLOP, equal to ours)."""
    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(
        tf.TensorSpec([1, 512, 512, 1], tf.float32)
    )
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options.update(output="none", account_type_regexes=["Conv2D", "MatMul"])
    profile = tf.compat.v1.profiler.profile(graph=fn.graph, options=options)
    assert estimate_gflops(model) == pytest.approx(profile.total_float_ops / 1e9, rel=1e-9)
    assert abs(profile.total_float_ops / 1e9 - GFLOPS_PER_SLICE) < 0.05
    assert abs(GFLOPS_PER_SLICE - 41) < 0.5  # the paper's "about 41 GFLOP"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": 500}, "Received: input_size=500"),
        ({"input_size": 64}, "Received: input_size=64"),
        ({"input_size": 512.0}, "Received: input_size=512.0"),
        ({"head_init_std": 0}, "Received: head_init_std=0"),
        ({"head_init_std": -0.1}, "Received: head_init_std=-0.1"),
        ({"seed": -1}, "Received: seed=-1"),
        ({"seed": 1.5}, "Received: seed=1.5"),
    ],
)
def test_argument_checks(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_fpn_resnet50v2(**kwargs)  # type: ignore[arg-type]


def test_flags_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        build_fpn_resnet50v2(512)  # type: ignore[misc]


def test_keras_file_round_trip(tmp_path: Path) -> None:
    """Training checkpoints (.keras) reload: the custom layers are registered."""
    small = build_fpn_resnet50v2(input_size=128, head_init_std=WIDE_HEAD_STD, seed=1)
    small.save(tmp_path / "small.keras")
    reloaded = keras.saving.load_model(tmp_path / "small.keras")
    assert [layer.name for layer in reloaded.layers] == [layer.name for layer in small.layers]
    assert isinstance(reloaded.get_layer("P4_upsampled"), UpsampleLike)
    for ours, theirs in zip(small.weights, reloaded.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy(), err_msg=ours.path)

"""The paper's network: an FPN with concatenating merges on a ResNet50V2 backbone.

Rahimzadeh, Attar & Sakhaei (2021), section 2.3, figure 9; DESIGN.md section 3.

    slices [N, 512, 512, 1] float32, raw stored values (HU + 1024), NOT scaled
      -> ResNet50V2 (Keras layer names kept, so weights map by name)
           C3 = conv4_block1_preact_relu  [N, 32, 32,  512]
           C4 = conv5_block1_preact_relu  [N, 16, 16, 1024]
           C5 = post_relu                 [N, 16, 16, 2048]
      -> FPN, 256 channels, lateral merges concatenate instead of add
           P3 [N, 30, 30, 256]   P4 [N, 14, 14, 256]   P5 [N, 16, 16, 256]
           P6 [N,  8,  8, 256]   P7 [N,  4,  4, 256]
      -> per level: flatten -> dropout 0.5 -> dense(2, relu); concatenate (10)
      -> classification: dense(2, softmax); class 0 = covid, class 1 = normal

Shapes are for the 512 x 512 input; 34,058,656 parameters in all.

No scaling of the input (DESIGN.md section 3): the authors fed the raw 16-bit values
(`cv2.imread(..., IMREAD_UNCHANGED)`) straight to `predict`, and the paper warns that
dividing by a constant or by each image's own maximum can reduce the accuracy. The first
layer after the input is the backbone's `conv1_pad`; the model card says
`preprocessing: none` (app/contract.py), and the export refuses a graph that scales.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers, ops

from app.contract import CLASS_NAMES, IMAGE_SIZE

# Backbone outputs the FPN reads (Keras's own ResNet50V2 layer names).
C3_LAYER = "conv4_block1_preact_relu"
C4_LAYER = "conv5_block1_preact_relu"
C5_LAYER = "post_relu"
BACKBONE_FEATURE_LAYERS = (C3_LAYER, C4_LAYER, C5_LAYER)
PYRAMID_LEVELS = ("P3", "P4", "P5", "P6", "P7")
FEATURE_LAYERS = (*BACKBONE_FEATURE_LAYERS, *PYRAMID_LEVELS)
CLASSIFICATION_LAYER = "classification"
# The first convolution sees one channel instead of ImageNet's three: the only backbone
# layer whose ImageNet weights cannot be copied as they are (paper section 2.4).
FIRST_CONV_LAYER = "conv1_conv"

FPN_CHANNELS = 256
DROPOUT_RATE = 0.5
PAPER_PARAMETERS = 34_058_656  # for a 512 x 512 x 1 input
# Forward pass of one 512 x 512 slice: 20.4 G multiply-adds = 40.8 GFLOP (2 FLOP per
# multiply-add), counted over the convolutions and dense layers by `estimate_gflops`.
GFLOPS_PER_SLICE = 40.8


@keras.saving.register_keras_serializable(package="covidct")
class UpsampleLike(layers.Layer):
    """Nearest-neighbour resize of `source` to the spatial size of `target`.

    keras-retinanet's UpsampleLike. C4 and C5 have the same size (ResNet50V2's last stack
    has stride 1), so for P4 it is the identity; for P3 it doubles 16 -> 32.
    """

    def call(self, inputs: Any) -> Any:
        source, target = inputs
        size = (target.shape[1], target.shape[2])
        if source.shape[1:3] == size:
            return source
        return ops.image.resize(source, size, interpolation="nearest")

    def compute_output_shape(self, input_shape: Any) -> tuple[Any, ...]:
        source, target = input_shape
        return (source[0], target[1], target[2], source[3])


# --- block helpers ---------------------------------------------------------------------


def _conv(x: Any, name: str, *, kernel: int, strides: int = 1, padding: str = "same") -> Any:
    return layers.Conv2D(FPN_CHANNELS, kernel, strides=strides, padding=padding, name=name)(x)


def _lateral_merge(top: Any, lateral: Any, *, level: int) -> Any:
    """concat(`top` resized to C<level>'s size, 1x1 conv of C<level>): P<level>_merged."""
    reduced = _conv(lateral, f"C{level}_reduced", kernel=1)
    upsampled = UpsampleLike(name=f"P{level + 1}_upsampled")([top, reduced])
    return layers.Concatenate(name=f"P{level}_merged")([upsampled, reduced])


def _fpn(c3: Any, c4: Any, c5: Any) -> list[Any]:
    """P3..P7. Paddings and merge inputs are the variant that gives the paper's count.

    The issue pins 34,058,656 parameters; of the variants tried, only this one reaches it:
    - P5: 'same' 3x3 on C5_reduced (16x16);
    - P4: 'valid' 3x3 on P4_merged = concat(C5_reduced, C4_reduced): 512 ch, 14x14;
    - P3: 'valid' 3x3 on P3_merged = concat(upsampled P4_merged, C3_reduced): 768 ch,
      30x30. Upsampling P4_merged (as keras-retinanet upsamples the merged P4) rather
      than C4_reduced is what makes 768 input channels;
    - P6, P7: 'same' stride-2 3x3 (as keras-retinanet): 8x8 and 4x4.
    The near misses (measured): upsampling C4_reduced (256 ch) instead of P4_merged gives
    33,468,832; 'valid' P5 34,027,936; 'valid' P6 and P7 34,047,392; 'same' P3 and P4
    34,152,864.
    """
    c5_reduced = _conv(c5, "C5_reduced", kernel=1)
    p5 = _conv(c5_reduced, "P5", kernel=3)
    p4_merged = _lateral_merge(c5_reduced, c4, level=4)
    p4 = _conv(p4_merged, "P4", kernel=3, padding="valid")
    p3_merged = _lateral_merge(p4_merged, c3, level=3)
    p3 = _conv(p3_merged, "P3", kernel=3, padding="valid")
    p6 = _conv(c5, "P6", kernel=3, strides=2)
    p7 = _conv(layers.Activation("relu", name="P6_relu")(p6), "P7", kernel=3, strides=2)
    return [p3, p4, p5, p6, p7]


def _level_head(feature: Any, level: str, *, init_std: float, seed: int | None) -> Any:
    """flatten -> dropout 0.5 -> dense(2, relu) for one pyramid level."""
    x = layers.Flatten(name=f"{level}_flatten")(feature)
    x = layers.Dropout(DROPOUT_RATE, name=f"{level}_dropout")(x)
    return _dense(x, f"{level}_dense", activation="relu", init_std=init_std, seed=seed)


def _dense(x: Any, name: str, *, activation: str, init_std: float, seed: int | None) -> Any:
    init = keras.initializers.RandomNormal(stddev=init_std, seed=seed)
    return layers.Dense(
        len(CLASS_NAMES), activation=activation, kernel_initializer=init, name=name
    )(x)


def _check_args(input_size: int, head_init_std: float, seed: int | None) -> None:
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ValueError(f"input_size must be an int. Received: input_size={input_size!r}")
    if input_size < 96 or input_size % 32:
        raise ValueError(
            "input_size must be a multiple of 32 and at least 96 (P4's valid 3x3 needs "
            f"C4 of 3x3 or more). Received: input_size={input_size}"
        )
    if not head_init_std > 0:
        raise ValueError(f"head_init_std must be positive. Received: head_init_std={head_init_std}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be None or an int >= 0. Received: seed={seed!r}")


# --- the builder ------------------------------------------------------------------------


def build_fpn_resnet50v2(
    *,
    input_size: int = IMAGE_SIZE,
    head_init_std: float = 0.001,
    seed: int | None = None,
    name: str = "fpn_resnet50v2",
) -> keras.Model:
    """The untrained network; input float32 [N, size, size, 1] raw stored values, unscaled.

    Output [N, 2] softmax, class 0 = covid, class 1 = normal.

    Args:
        input_size: side of the square input; 512 is the serving contract.
        head_init_std: std of the normal init of the dense kernels of the heads (the paper's
            0.001 makes every slice score about 0.5 before training).
        seed: if set, seeds all initialisation (`keras.utils.set_random_seed`, which also
            seeds Python's, NumPy's and TensorFlow's global generators), so two builds with
            the same seed have the same weights.
        name: model name.
    """
    _check_args(input_size, head_init_std, seed)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    slices = keras.Input((input_size, input_size, 1), dtype="float32", name="slices")
    backbone = keras.applications.ResNet50V2(include_top=False, weights=None, input_tensor=slices)
    c3, c4, c5 = (backbone.get_layer(n).output for n in BACKBONE_FEATURE_LAYERS)
    pyramid = _fpn(c3, c4, c5)
    heads = [
        _level_head(p, level, init_std=head_init_std, seed=_sub_seed(seed, i))
        for i, (level, p) in enumerate(zip(PYRAMID_LEVELS, pyramid, strict=True))
    ]
    merged = layers.Concatenate(name="heads_concat")(heads)
    probabilities = _dense(
        merged,
        CLASSIFICATION_LAYER,
        activation="softmax",
        init_std=head_init_std,
        seed=_sub_seed(seed, len(heads)),
    )
    return keras.Model(slices, probabilities, name=name)


def _sub_seed(seed: int | None, index: int) -> int | None:
    # One seed per head layer: the same seed in every layer would give equal kernels.
    return None if seed is None else seed * 100 + index


def feature_model(model: keras.Model) -> keras.Model:
    """A model from the same input to the named backbone features and pyramid levels."""
    outputs = {n: model.get_layer(n).output for n in FEATURE_LAYERS}
    return keras.Model(model.input, outputs, name=f"{model.name}_features")


def estimate_gflops(model: keras.Model) -> float:
    """Forward FLOP per slice (2 per multiply-add) of the convolutions and dense layers."""
    macs = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            kh, kw = layer.kernel_size
            _, h, w, c_out = layer.output.shape
            macs += kh * kw * layer.input.shape[-1] * c_out * h * w
        elif isinstance(layer, layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return 2 * macs / 1e9

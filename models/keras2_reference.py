"""An independent Keras 2 build of the authors' network: what imports are checked against.

Written in `tf-keras` (the Keras 2 implementation) from the paper (section 2.3) and the
facts of the authors' notebook `COVID_Train&Validation.ipynb` (mr7495/COVID-CT-Code), not
from models/architecture.py, so that `verify-import` and the tests compare two separate
builds. The facts it follows:
- Keras 2.3.0 on TensorFlow 2.2, run as a graph. The input `Input(shape=(512, 512, 1))` is
  made first (`input_1`); then a ResNet50V2 with ImageNet weights is built only to save
  them, then the backbone `ResNet50V2(weights=None, include_top=False, input_tensor=...)`:
  the second ResNet50V2 of the process, so its variables are named `conv1_conv_1/kernel:0`
  and so on, while its layers keep Keras's names (`conv1_conv`).
- C3, C4, C5 = `conv4_block1_preact_relu`, `conv5_block1_preact_relu`, `post_relu`.
- The pyramid, keras-retinanet style but concatenating: `C5_reduced` (1x1);
  `P5_upsampled` = UpsampleLike([C5_reduced, C4]); `P5` (3x3, same) on C5_reduced;
  `C4_reduced` (1x1); concatenate([P5_upsampled, C4_reduced]); `P4_upsampled` =
  UpsampleLike([that, C3]); `P4` (3x3, valid) on the concatenation; `C3_reduced` (1x1);
  concatenate([P4_upsampled, C3_reduced]); `P3` (3x3, valid); `P6` (3x3, stride 2, same)
  on C5; `C6_relu`; `P7` (3x3, stride 2, same). 256 channels each.
- One head per level, P3 to P7 in that order: Flatten, Dropout(0.5), Dense(2, relu);
  the five concatenated (axis 1), then Dense(2, softmax). These layers are unnamed, so
  Keras 2.3 calls them `flatten_1` …, `dense_1` … `dense_6` in creation order.
  Dense kernels start as RandomNormal(0, 0.001).
- Compiled with Nadam (lr 1e-4), categorical cross-entropy; ModelCheckpoint keeps the
  best validation accuracy with `model.save`, optimizer state included.
- Evaluation loads the file with `load_model(..., custom_objects={'UpsampleLike': ...})`
  and predicts on `cv2.imread(path, cv2.IMREAD_UNCHANGED)`: the raw 16-bit values, no
  scaling; class 0 = covid (class indices in alphabetical order).

Keras 2 and Keras 3 must not share a process: run this module as a command of its own,
`python -m models.keras2_reference predict FILE SLICES.npy OUT.npy`, which builds the
network, loads FILE with Keras's own `load_weights(by_name=True)` after checking that the
file and the build have the same layers with weights, and writes the softmax outputs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

INPUT_SHAPE = (512, 512, 1)
FEATURES = 256
C_LAYERS = ("conv4_block1_preact_relu", "conv5_block1_preact_relu", "post_relu")
HEAD_COUNT = 6  # five levels and the final classification
KERAS23_DENSE_NAMES = tuple(f"dense_{i}" for i in range(1, HEAD_COUNT + 1))
_DENSE = re.compile(r"^dense(?:_(\d+))?$")


def _keras2() -> Any:
    """tf-keras in graph mode, as Keras 2.3 ran: must come before any Keras op."""
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    import tf_keras

    return tf_keras


def _upsample_like_class(keras: Any) -> Any:
    import tensorflow as tf

    class UpsampleLike(keras.layers.Layer):
        """keras-retinanet's layer: nearest resize of `source` to the size of `target`
        (TensorFlow 1's resize, no half-pixel centres, as Keras 2.3 ran it)."""

        def call(self, inputs: Any) -> Any:
            source, target = inputs
            size = tf.shape(target)[1:3]
            return tf.compat.v1.image.resize_nearest_neighbor(
                source, size, align_corners=False, half_pixel_centers=False
            )

        def compute_output_shape(self, input_shape: Any) -> Any:
            source, target = input_shape
            return (source[0], target[1], target[2], source[-1])

    return UpsampleLike


def _dense(keras: Any, activation: str, name: str) -> Any:
    init = keras.initializers.RandomNormal(mean=0.0, stddev=0.001)  # one per layer, as theirs
    return keras.layers.Dense(2, activation=activation, kernel_initializer=init, name=name)


def build_network(keras: Any, *, dense_names: Sequence[str] = KERAS23_DENSE_NAMES) -> Any:
    """The authors' network, untrained, in the order and with the names their code gives.

    `keras` is the module `_keras2()` returns. `dense_names`: the six dense layers' names in
    creation order (Keras 2.3 counts from `dense_1`, tf.keras from `dense`).
    """
    layers = keras.layers
    upsample_like = _upsample_like_class(keras)
    inputs = keras.Input(shape=INPUT_SHAPE, name="input_1")
    # Their ImageNet-weights ResNet50V2 came first; building it (without weights) makes
    # the backbone the second, with the graph names Keras 2.3 gave theirs.
    keras.applications.ResNet50V2(weights=None, include_top=False)
    base = keras.applications.ResNet50V2(weights=None, include_top=False, input_tensor=inputs)
    c3, c4, c5 = (base.get_layer(n).output for n in C_LAYERS)

    def conv(x: Any, name: str, kernel: int, strides: int = 1, padding: str = "same") -> Any:
        return layers.Conv2D(FEATURES, kernel, strides=strides, padding=padding, name=name)(x)

    p5 = conv(c5, "C5_reduced", 1)
    p5_up = upsample_like(name="P5_upsampled")([p5, c4])
    p5 = conv(p5, "P5", 3)
    p4 = conv(c4, "C4_reduced", 1)
    p4 = layers.Concatenate(axis=3, name="concatenate_1")([p5_up, p4])
    p4_up = upsample_like(name="P4_upsampled")([p4, c3])
    p4 = conv(p4, "P4", 3, padding="valid")
    p3 = conv(c3, "C3_reduced", 1)
    p3 = layers.Concatenate(axis=3, name="concatenate_2")([p4_up, p3])
    p3 = conv(p3, "P3", 3, padding="valid")
    p6 = conv(c5, "P6", 3, strides=2)
    p7 = layers.Activation("relu", name="C6_relu")(p6)
    p7 = conv(p7, "P7", 3, strides=2)
    heads = []
    for i, level in enumerate((p3, p4, p5, p6, p7), start=1):
        x = layers.Flatten(name=f"flatten_{i}")(level)
        x = layers.Dropout(0.5, name=f"dropout_{i}")(x)
        heads.append(_dense(keras, "relu", dense_names[i - 1])(x))
    x = layers.Concatenate(axis=1, name="concatenate_3")(heads)
    out = _dense(keras, "softmax", dense_names[5])(x)
    return keras.Model(inputs=inputs, outputs=out)


def compile_as_the_authors(keras: Any, model: Any) -> None:
    """Nadam, lr 1e-4, categorical cross-entropy, accuracy (the legacy optimizer: graph mode)."""
    model.compile(
        optimizer=keras.optimizers.legacy.Nadam(learning_rate=1e-4),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )


def dense_names_of(path: str | Path) -> tuple[str, ...]:
    """The file's six auto-named dense layers, in creation order (their number)."""
    from models.keras2_hdf5 import read_keras2_h5

    found = [name for name in read_keras2_h5(path) if _DENSE.match(name)]
    found.sort(key=lambda name: int(_DENSE.match(name)[1] or 0))  # type: ignore[index]
    if len(found) != HEAD_COUNT:
        raise ValueError(
            f"the authors' network has {HEAD_COUNT} dense layers named dense_<i>. "
            f"Received: {found} in {Path(path).name}"
        )
    return tuple(found)


def load_file(keras: Any, path: str | Path) -> Any:
    """The network built here with the weights of `path` (whole model or weights only)."""
    from models.keras2_hdf5 import read_keras2_h5

    model = build_network(keras, dense_names=dense_names_of(path))
    theirs = set(read_keras2_h5(path))
    ours = {layer.name for layer in model.layers if layer.weights}
    if theirs != ours:
        raise ValueError(
            "the file's layers with weights differ from the authors' network. Received: "
            f"missing {sorted(ours - theirs)}, extra {sorted(theirs - ours)}"
        )
    model.load_weights(str(path), by_name=True)  # Keras checks every shape
    return model


def predict_file(path: str | Path, slices: np.ndarray, *, batch_size: int = 4) -> np.ndarray:
    """Softmax outputs [N, 2] of the file's network under Keras 2 on raw `slices`."""
    keras = _keras2()
    model = load_file(keras, path)
    return np.asarray(model.predict(slices.astype(np.float32), batch_size=batch_size, verbose=0))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.keras2_reference",
        description="Run an authors' Keras 2 HDF5 file on slices, under Keras 2 (tf-keras).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="softmax outputs [N, 2] of FILE on SLICES.npy")
    p.add_argument("file", type=Path, help="Keras 2 HDF5 file (FPN-fold1.hdf5 …)")
    p.add_argument("slices", type=Path, help=".npy float32 [N, 512, 512, 1] raw stored values")
    p.add_argument("out", type=Path, help=".npy to write")
    args = parser.parse_args(argv)
    np.save(args.out, predict_file(args.file, np.load(args.slices)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

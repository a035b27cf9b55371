"""Write a Keras 3 model's weights in the HDF5 layout of Keras 2 (for the reader's tests).

The layout Keras 2.3 gave the authors' ModelCheckpoint files: `model_weights/` with the
attribute `layer_names`, one group per layer with the attribute `weight_names`, each
weight at `<layer>/<scope>/<name>:0`. tests/models/test_keras2_files.py writes the real
thing with Keras 2 itself; this writer is for fast tests of the mapping and its refusals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from models.architecture import CLASSIFICATION_LAYER, PYRAMID_LEVELS

HEADS = [f"{level}_dense" for level in PYRAMID_LEVELS] + [CLASSIFICATION_LAYER]


def write_keras2_h5(
    path: Path,
    model: Any,
    *,
    rename: dict[str, str] | None = None,
    whole_model: bool = True,
    skip: set[str] | tuple[str, ...] = (),
    scope_suffix: str = "",
) -> None:
    """Write `model`'s weights as Keras 2 did, renaming layers as Keras 2 named them.

    `scope_suffix`: what graph-mode Keras 2 appended to a layer's variable scope when the
    name was taken already ("_1" for the second ResNet50V2 of a process).
    """
    rename = rename or {}
    layers = [layer for layer in model.layers if layer.name not in skip]
    # Keras 2 lists layers in its own topological order; put the heads last, reversed, so
    # only their number suffix tells their creation order.
    heads = [layer for layer in layers if layer.name in HEADS]
    layers = [layer for layer in layers if layer.name not in HEADS] + heads[::-1]
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = b"2.3.0"
        f.attrs["backend"] = b"tensorflow"
        group = f.create_group("model_weights") if whole_model else f
        if whole_model:
            f.attrs["model_config"] = b'{"class_name": "Model"}'
            f.create_group("optimizer_weights").create_dataset("iterations:0", data=np.int64(9))
            group.attrs["keras_version"] = b"2.3.0"
        names = [rename.get(layer.name, layer.name) for layer in layers]
        group.attrs["layer_names"] = np.array([n.encode() for n in names])
        for layer, name in zip(layers, names, strict=True):
            g = group.create_group(name)
            weight_names = [f"{name}{scope_suffix}/{w.name}:0" for w in layer.weights]
            g.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
            for weight_name, w in zip(weight_names, layer.weights, strict=True):
                g.create_dataset(weight_name, data=np.asarray(w))

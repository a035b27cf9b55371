"""Read Keras 2 HDF5 weight files: the authors' `FPN-fold<k>.hdf5` and Keras's ImageNet files.

One reader for the two users: the weight import (models/import_weights.py) and the
ImageNet transfer of training (models/transfer.py). It needs h5py only, never Keras, so it
reads files written by Keras 2.3 (the authors), tf.keras or `tf-keras` alike.

The layout Keras 2 writes, with `model.save` (ModelCheckpoint) or with `save_weights`:
- a whole-model file keeps the weights under the group `model_weights/` (beside
  `optimizer_weights/` and the `model_config` attribute); a weights-only file at the root;
- that group's attribute `layer_names` lists every layer, with or without weights, in the
  model's order;
- each layer's group has the attribute `weight_names`, the variables' graph names in the
  layer's order, e.g. `conv1_conv/kernel:0` — or `conv1_conv_1/kernel:0` when the
  backbone was the second ResNet50V2 built in the process (graph-mode name scopes are made
  unique, the layer names are not) — each stored at `<layer>/<weight name>`.
The weight's kind is the last part of its name (`kernel`, `bias`, `gamma`, `beta`,
`moving_mean`, `moving_variance`); the scope before it is not needed and not trusted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

logger = logging.getLogger(__name__)


class WeightImportError(ValueError):
    """A weights file that cannot be read, or does not fit the architecture."""


@dataclass(frozen=True)
class H5Layer:
    """One layer's weights as the file stores them, in the file's order."""

    name: str
    weight_names: tuple[str, ...]
    arrays: tuple[np.ndarray, ...]

    def kinds(self) -> tuple[str, ...]:
        """`kernel`, `bias` … : each weight name without its scope and `:0` suffix."""
        return tuple(weight_kind(w) for w in self.weight_names)


def weight_kind(weight_name: str) -> str:
    """`conv1_conv_1/kernel:0` → `kernel`."""
    return weight_name.split("/")[-1].split(":")[0]


def read_keras2_h5(path: str | Path) -> dict[str, H5Layer]:
    """The layers with weights of a Keras 2 HDF5 file (whole model or weights only), in order."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightImportError(f"not an HDF5 file: {e}. Received: {path}") from e
    with f:
        group = weights_group(f)
        if group is None:
            raise WeightImportError(
                "no 'layer_names' attribute: not a Keras 2 HDF5 weights file (a Keras 3 "
                f".keras or .weights.h5 file is loaded with keras instead). Received: {path}"
            )
        layers = {}
        for name in map(_text, group.attrs["layer_names"]):
            weight_names = tuple(map(_text, group[name].attrs.get("weight_names", [])))
            if weight_names:
                arrays = tuple(np.asarray(group[name][w]) for w in weight_names)
                layers[name] = H5Layer(name, weight_names, arrays)
    logger.info(
        "read %d layers with weights (%s values) from %s",
        len(layers),
        f"{sum(a.size for layer in layers.values() for a in layer.arrays):,}",
        Path(path).name,
    )
    return layers


def weights_group(f: h5py.File) -> Any:
    """The group holding `layer_names`: `model_weights/` of a whole model, else the root."""
    group = f.get("model_weights", f)
    return group if "layer_names" in group.attrs else None


def is_whole_model(path: str | Path) -> bool:
    """True for a `model.save` file (architecture, weights, optimizer), False for weights only."""
    with h5py.File(path, "r") as f:
        return "model_weights" in f and "model_config" in f.attrs


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)

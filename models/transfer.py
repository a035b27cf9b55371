"""ImageNet transfer for the backbone (paper section 2.4).

The paper loads Keras's ImageNet weights of ResNet50V2 into every backbone layer but the
first convolution: `conv1_conv` sees one channel here instead of ImageNet's three, so it
keeps its random initialisation (Keras 2's `load_weights(by_name=True, skip_mismatch=True)`
skipped that whole layer, bias included; so does this). The FPN and the heads start random.

The weights come from Keras's `resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5`:
a local copy (`--imagenet-weights PATH`), else Keras's cache or a download where the
machine is online. When neither works the network trains from scratch, and says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.keras2_hdf5 import WeightImportError, read_keras2_h5

logger = logging.getLogger(__name__)

IMAGENET_FILE = "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
# Where keras.applications.ResNet50V2(weights="imagenet", include_top=False) gets them.
IMAGENET_URL = (
    f"https://storage.googleapis.com/tensorflow/keras-applications/resnet/{IMAGENET_FILE}"
)
IMAGENET_MD5 = "fac2f116257151a9d068a22e544a4917"
FIRST_CONV = "conv1_conv"
FROM_SCRATCH = "training from scratch (no ImageNet transfer)"


@dataclass(frozen=True)
class Transfer:
    """What the backbone started from; goes into the run record and the model card."""

    source: str  # a file path, or "" when training from scratch
    layers: int = 0  # layers whose weights were copied
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        if not self.source:
            return FROM_SCRATCH
        return (
            f"ImageNet ResNet50V2 weights ({Path(self.source).name}) in {self.layers} backbone "
            f"layers; random: {', '.join(self.skipped)}, the FPN and the heads"
        )


def fetch_imagenet_weights(cache_dir: str | Path | None = None) -> Path | None:
    """Keras's notop file from its cache or a download; None (logged) when it cannot be had."""
    import keras

    try:
        path = keras.utils.get_file(
            IMAGENET_FILE,
            IMAGENET_URL,
            cache_subdir="models",
            file_hash=IMAGENET_MD5,
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except Exception as e:  # keras wraps URL, HTTP and hash errors in plain Exception
        logger.warning("ImageNet weights could not be downloaded (%s): %s", e, FROM_SCRATCH)
        return None
    return Path(path)


def transfer_imagenet(model: Any, weights_path: str | Path) -> Transfer:
    """Copy the file's ResNet50V2 weights into `model` by layer name, all but conv1_conv.

    Every other layer of the file must exist in `model` with the same shapes: a file that
    is not ResNet50V2's is refused before any weight is set.
    """
    layers = read_keras2_h5(weights_path)
    if FIRST_CONV not in layers:
        raise WeightImportError(
            f"no {FIRST_CONV} layer: not a ResNet50V2 file. Received: {weights_path}"
        )
    plan, problems = [], []
    for name, h5 in layers.items():
        if name == FIRST_CONV:
            continue
        try:
            layer = model.get_layer(name)
        except ValueError:
            problems.append(f"file layer {name} is not in the model")
            continue
        shapes = [tuple(w.shape) for w in layer.weights]
        if shapes != [tuple(a.shape) for a in h5.arrays]:
            problems.append(f"{name}: shapes {[a.shape for a in h5.arrays]}, ours {shapes}")
        plan.append((layer, h5))
    if problems:
        raise WeightImportError(
            f"{weights_path} does not fit the backbone:\n  " + "\n  ".join(problems)
        )
    for layer, h5 in plan:
        layer.set_weights(list(h5.arrays))
    transfer = Transfer(str(weights_path), len(plan), (FIRST_CONV,))
    logger.info("backbone initialised: %s", transfer.describe())
    return transfer


def initialise_backbone(model: Any, imagenet: str | Path | None) -> Transfer:
    """`imagenet`: a file path, "auto" (Keras's cache or a download), or None (from scratch)."""
    if imagenet is None:
        logger.warning("ImageNet transfer disabled: %s", FROM_SCRATCH)
        return Transfer("")
    if str(imagenet) == "auto":
        path = fetch_imagenet_weights()
        return transfer_imagenet(model, path) if path else Transfer("")
    path = Path(imagenet)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file not found. Received: {path}")
    return transfer_imagenet(model, path)

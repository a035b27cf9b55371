"""Import the paper's published networks (Keras 2 HDF5, `FPN-fold1.hdf5` …) into a SavedModel.

The authors trained with Keras 2.3 and saved whole models with ModelCheckpoint; the file
layout and its reader are models/keras2_hdf5.py. Their network takes the raw stored
values (they fed `cv2.imread(..., IMREAD_UNCHANGED)` to `predict`), and so does the
export: no scaling anywhere, the card says `preprocessing: none`. `python -m models
verify-import FILE DIR` compares the export with the file loaded by Keras 2 itself.

Mapping to `models.architecture`:
- by layer name wherever the names agree: the whole ResNet50V2 backbone (Keras's names)
  and the FPN convolutions (`C3_reduced` … `P7`, named as in keras-retinanet);
- by order for the layers the authors left to Keras's automatic names: their six
  `dense_<i>` layers, in creation order (number suffix), are our `P3_dense` … `P7_dense`
  and `classification` (the paper's code builds the heads P3 to P7, then the final dense).
Weightless layers (their `UpsampleLike`, concatenations, dropout …) are ignored.
Every weight must land somewhere and every one of ours must be filled, with equal shapes:
anything else is refused with the full list of problems, before a single weight is set.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.contract import COVID_CTSET, PREPROCESSING_NONE, ModelCard, complete_card
from models.keras2_hdf5 import H5Layer, WeightImportError, read_keras2_h5, weight_kind

__all__ = ["H5Layer", "WeightImportError", "import_weights", "plan_import", "read_keras2_h5"]

logger = logging.getLogger(__name__)

# Keras's automatic name stem per layer class: dense, dense_1 … (tf.keras) or dense_1 …
# (standalone Keras 2).
AUTO_NAME_STEMS = {
    "Dense": "dense",
    "Conv2D": "conv2d",
    "BatchNormalization": "batch_normalization",
}
_AUTO_NAME = re.compile(r"^(?P<stem>[a-z_]+?)(?:_(?P<number>\d+))?$")
# Not measured here (`python -m models evaluate` adds metrics with their data set).
AUTHORS_EVALUATION = (
    "Not evaluated by covidct. The authors report for this network, on COVID-CTset images "
    "held out from training, 98.49 % slice accuracy on 7,996 images and about 237 of 245 "
    "patients identified correctly (Rahimzadeh et al. 2021; not re-measured here)."
)


# --- mapping ------------------------------------------------------------------------------------


def plan_import(
    model: Any, layers: Mapping[str, H5Layer], *, creation_order: Sequence[str] = ()
) -> list[tuple[Any, H5Layer]]:
    """Pair every layer of `model` that has weights with one layer of the file.

    `creation_order` lists our layers that the source model left auto-named, in the order
    they were created there (default: the heads of models.architecture). Raises
    WeightImportError listing every missing, extra or mis-shaped weight.
    """
    if not creation_order:
        creation_order = _default_creation_order()
    ours = [layer for layer in model.layers if layer.weights]
    pairs = [(layer, layers[layer.name]) for layer in ours if layer.name in layers]
    matched = {h5.name for _, h5 in pairs}
    unmatched = [layer for layer in ours if layer.name not in layers]
    leftover = [h5 for name, h5 in layers.items() if name not in matched]
    problems: list[str] = []
    pairs += _pair_auto_named(unmatched, leftover, creation_order, problems)
    for layer, h5 in pairs:
        problems += _shape_problems(layer, h5)
    if problems:
        raise WeightImportError(
            f"the weights do not fit the architecture ({len(problems)} problems):\n  "
            + "\n  ".join(problems)
        )
    return pairs


def _pair_auto_named(
    unmatched: list[Any], leftover: list[H5Layer], order: Sequence[str], problems: list[str]
) -> list[tuple[Any, H5Layer]]:
    """Pair our unmatched layers with the file's auto-named ones, stem by stem, by order."""
    rank = {name: i for i, name in enumerate(order)}
    pairs = []
    for class_name, stem in AUTO_NAME_STEMS.items():
        ours = [layer for layer in unmatched if type(layer).__name__ == class_name]
        ours.sort(key=lambda layer: rank.get(layer.name, len(rank)))
        theirs = sorted((h5 for h5 in leftover if _stem(h5.name) == stem), key=_number)
        pairs += list(zip(ours, theirs, strict=False))
        problems += [
            f"missing: no weights in the file for our layer {layer.name}"
            for layer in ours[len(theirs) :]
        ]
        problems += [
            f"extra: file layer {h5.name} has no place in the architecture"
            for h5 in theirs[len(ours) :]
        ]
    # Named layers of other kinds cannot be paired by order: each one is a problem.
    problems += [
        f"missing: no weights in the file for our layer {layer.name}"
        for layer in unmatched
        if type(layer).__name__ not in AUTO_NAME_STEMS
    ]
    problems += [
        f"extra: file layer {h5.name} has no place in the architecture"
        for h5 in leftover
        if _stem(h5.name) not in AUTO_NAME_STEMS.values()
    ]
    return pairs


def _stem(name: str) -> str | None:
    match = _AUTO_NAME.match(name)
    return match["stem"] if match else None


def _number(h5: H5Layer) -> int:
    match = _AUTO_NAME.match(h5.name)
    return int(match["number"]) if match and match["number"] else 0


def _shape_problems(layer: Any, h5: H5Layer) -> list[str]:
    source = f"file layer {h5.name}" + ("" if h5.name == layer.name else f" → {layer.name}")
    if len(layer.weights) != len(h5.arrays):
        return [
            f"{source}: {len(h5.arrays)} weights {list(h5.weight_names)}, ours has "
            f"{len(layer.weights)} {[w.name for w in layer.weights]}"
        ]
    problems = []
    for variable, weight_name, array in zip(layer.weights, h5.weight_names, h5.arrays, strict=True):
        kind = weight_kind(weight_name)
        if kind != variable.name:
            problems.append(f"{source}: weight {weight_name} where ours is {variable.name}")
        elif tuple(array.shape) != tuple(variable.shape):
            problems.append(
                f"{source}: {kind} has shape {tuple(array.shape)}, ours {tuple(variable.shape)}"
            )
    return problems


def _default_creation_order() -> list[str]:
    from models.architecture import CLASSIFICATION_LAYER, PYRAMID_LEVELS

    return [f"{level}_dense" for level in PYRAMID_LEVELS] + [CLASSIFICATION_LAYER]


def apply_plan(pairs: Sequence[tuple[Any, H5Layer]]) -> int:
    """Set the planned weights; returns the number of values set."""
    for layer, h5 in pairs:
        layer.set_weights(list(h5.arrays))
    return sum(a.size for _, h5 in pairs for a in h5.arrays)


# --- the command --------------------------------------------------------------------------------


def import_weights(
    h5_path: str | Path,
    out_dir: str | Path,
    *,
    fold: int | None = None,
    version: str | None = None,
    training_data: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Load a Keras 2 HDF5 network into the architecture and export it as a SavedModel."""
    from models.architecture import build_fpn_resnet50v2
    from models.export import export_saved_model

    source = Path(h5_path)
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; import elsewhere or replace it (--force)")
    layers = read_keras2_h5(source)
    model = build_fpn_resnet50v2()
    values = apply_plan(plan_import(model, layers))
    if values != model.count_params():
        raise WeightImportError(f"set {values:,} of {model.count_params():,} values")
    fold = fold if fold is not None else _fold_from_name(source.name)
    digest = _sha256(source)
    card = ModelCard(
        version=version or f"1.0.0+imported.{source.stem}",
        weights_source="imported",
        weights_detail=(
            f"Imported from the Keras 2 HDF5 file {source.name} (sha256 {digest}) by "
            f"models.import_weights: {len(layers)} layers, {values:,} values, mapped by name "
            "and, for auto-named dense layers, by creation order. Like the authors' network, "
            "the export takes the raw stored values (HU + 1024) with no scaling."
        ),
        preprocessing=PREPROCESSING_NONE,
        training_data=training_data
        or f"{COVID_CTSET}; trained and published by the authors (fold {fold or '?'})",
        evaluation_data=AUTHORS_EVALUATION,
        fold=fold,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        source_file=source.name,
        source_sha256=digest,
    )
    return export_saved_model(model, out_dir, complete_card(card), overwrite=overwrite)


def _fold_from_name(name: str) -> int | None:
    match = re.search(r"fold[-_]?(\d)", name, flags=re.IGNORECASE)
    return int(match[1]) if match else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- command line -------------------------------------------------------------------------------


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import-weights",
        help="import the paper's published Keras 2 HDF5 network (FPN-fold1.hdf5 …)",
        description="Map the weights of a Keras 2 HDF5 file (the authors' FPN-fold<k>.hdf5, "
        "saved with keras-retinanet's UpsampleLike) into the architecture by layer name, and "
        "by order for auto-named dense layers; refuse on any missing, extra or mis-shaped "
        "weight; export a SavedModel whose card says weights_source 'imported' and names "
        "the file (with its sha256).",
    )
    p.add_argument("h5", type=Path, help="the HDF5 file, e.g. FPN-fold1.hdf5")
    p.add_argument("--out", type=Path, required=True, help="SavedModel directory to write")
    p.add_argument("--fold", type=int, default=None, help="fold (default: from the file name)")
    p.add_argument("--version", default=None, help="model card version")
    p.add_argument("--training-data", default=None, help="model card training_data text")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run_command)


def run_command(args: Any) -> int:
    from app.contract import read_card

    try:
        path = import_weights(
            args.h5,
            args.out,
            fold=args.fold,
            version=args.version,
            training_data=args.training_data,
            overwrite=args.force,
        )
    except (ValueError, OSError) as e:  # WeightImportError is a ValueError
        logger.error("%s", e)
        return 1
    card = read_card(path)
    print(f"imported {args.h5.name} → {path} (model {card.version}, fold {card.fold})")
    return 0

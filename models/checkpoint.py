"""A training checkpoint → the service's SavedModel: `python -m models export`.

The checkpoint is a run directory's `best.keras` (or `last.keras`, or any .keras file);
the model card comes from the run record (`run.json`) beside it: weights_source "trained",
the training data and fold, the validation metrics of the checkpoint's epoch. The SavedModel
itself is written by models.export.export_saved_model.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.contract import ModelCard
from models.train import BEST, LAST, MONITOR, RUN_RECORD

logger = logging.getLogger(__name__)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    version: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A training checkpoint (.keras, or a run directory: its best.keras) → SavedModel.

    The card comes from the run record beside the checkpoint: weights_source "trained",
    the training data and fold, the validation metrics of the checkpoint's epoch.
    Only the model's weights are exported, once (the optimiser state stays behind).
    """
    import keras

    import models.architecture  # noqa: F401  (registers the custom layers for loading)
    from models.export import export_saved_model

    path = Path(checkpoint)
    if path.is_dir():
        path = path / BEST
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found. Received: {path}")
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; export elsewhere or replace it (--force)")
    model = keras.models.load_model(path, compile=False)
    record_path = path.parent / RUN_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    card = trained_card(path, record, version=version)
    return export_saved_model(model, out_dir, card, overwrite=overwrite)


def trained_card(
    checkpoint: Path, record: dict[str, Any] | None, *, version: str | None = None
) -> ModelCard:
    """The model card of an exported checkpoint, from its run record where there is one."""
    stamp = datetime.now(UTC)
    if record is None:
        logger.warning(
            "no %s beside %s: the card will not name data or metrics", RUN_RECORD, checkpoint
        )
        return ModelCard(
            version=version or f"1.0.0+trained.{stamp:%Y%m%d%H%M}",
            weights_source="trained",
            weights_detail=f"Trained checkpoint {checkpoint.name} (no run record found).",
            created_at=stamp.isoformat(timespec="seconds"),
        )
    entry = _checkpoint_epoch(checkpoint, record)
    fold = record["data"].get("fold")
    epoch = entry["epoch"] if entry else None
    tag = f"fold{fold}." if fold is not None else ""
    config = record.get("config", {})
    detail = (
        f"Trained by models.train for {record['epochs_completed']} epochs; exported "
        f"{checkpoint.name}"
        + (f" (epoch {epoch}, validation accuracy {entry[MONITOR]:.4f})" if entry else "")
        + f". Backbone: {record['backbone_init']}. Recipe: Nadam lr "
        f"{config.get('learning_rate')}, batch {config.get('batch_size')}, categorical "
        f"cross-entropy, augmentation {'on' if config.get('augment') else 'off'}."
    )
    metrics = None
    if entry:
        metrics = {
            "validation": {
                "epoch": epoch,
                "accuracy": entry.get(MONITOR),
                "loss": entry.get("val_loss"),
                "slices": record["data"].get("validation_slices"),
            }
        }
    return ModelCard(
        version=version or f"1.0.0+{tag}e{epoch or 0}.{stamp:%Y%m%d%H%M}",
        weights_source="trained",
        weights_detail=detail,
        training_data=record["data"]["description"],
        fold=fold,
        metrics=metrics,
        created_at=stamp.isoformat(timespec="seconds"),
        training_run={
            "epochs_completed": record["epochs_completed"],
            "started_at": record.get("started_at"),
            "versions": record.get("versions"),
        },
    )


def _checkpoint_epoch(checkpoint: Path, record: dict[str, Any]) -> dict[str, Any] | None:
    if checkpoint.name == BEST:
        return record.get("best")
    if checkpoint.name == LAST and record["history"]:
        return record["history"][-1]
    return None


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a training checkpoint as the service's SavedModel",
        description="Load a checkpoint (best.keras of a run, or a run directory) and write a "
        "SavedModel per the serving contract, weights stored once, with a model card filled "
        "from the run record (weights_source 'trained', data, fold, validation metrics).",
    )
    p.add_argument("checkpoint", type=Path, help="a .keras checkpoint or a run directory")
    p.add_argument("--out", type=Path, required=True, help="SavedModel directory to write")
    p.add_argument("--version", default=None, help="model card version (default: derived)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    from app.contract import read_card
    from models.export import directory_size

    try:
        path = export_checkpoint(
            args.checkpoint, args.out, version=args.version, overwrite=args.force
        )
    except (ValueError, OSError) as e:
        logger.error("%s", e)
        return 1
    card = read_card(path)
    print(f"exported model {card.version} to {path} ({directory_size(path) / 1e6:.1f} MB)")
    return 0

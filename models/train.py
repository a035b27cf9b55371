"""Training with the paper's recipe (section 2.4): `python -m models train`.

    network    models.architecture.build_fpn_resnet50v2, ImageNet backbone (models.transfer)
    optimiser  Nadam, learning rate 1e-4; categorical cross-entropy; batch 14
    data       flips, rotation up to 360°, zoom / shift / shear 0.05 (models.data)
    keep       the best validation accuracy (ModelCheckpoint, save_best_only)

A run directory holds everything a run writes:

    best.keras    the model at the best validation accuracy so far (what `export` takes)
    last.keras    the model and optimiser state after the last finished epoch (`--resume`)
    run.json      the run record: data, settings, backbone initialisation, per-epoch
                  history, best epoch; export (models.checkpoint) fills the model card from it
    history.csv   the per-epoch metrics (Keras CSVLogger)

TensorFlow and Keras are imported by the functions that need them, so `--help` is quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from models import data as datasets
from models.data import TrainingData
from models.transfer import IMAGENET_FILE

logger = logging.getLogger(__name__)

BEST = "best.keras"
LAST = "last.keras"
RUN_RECORD = "run.json"
HISTORY = "history.csv"
MONITOR = "val_accuracy"


@dataclass(frozen=True)
class TrainConfig:
    """The paper's recipe by default; `run_eagerly` only for tiny runs and debugging."""

    epochs: int = 20  # as in the authors' training notebook
    batch_size: int = 14
    validation_batch_size: int = 10
    learning_rate: float = 1e-4
    steps_per_epoch: int | None = None  # default: one pass over the training slices
    validation_steps: int | None = None  # default: all validation slices
    augment: bool = True
    imagenet: str | None = "auto"  # a notop .h5 path, "auto" (cache or download), None
    head_init_std: float = 0.001
    seed: int | None = None
    run_eagerly: bool = False
    verbose: int = 1  # Keras: 1 progress bar, 2 one line per epoch

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "validation_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1. Received: {name}={getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0. Received: {self.learning_rate}")


@dataclass
class TrainResult:
    run_dir: Path
    record: dict[str, Any]
    model: Any = field(repr=False)  # the Keras model after the last epoch

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / BEST


# --- training -----------------------------------------------------------------------------------


def train(
    training_data: TrainingData, config: TrainConfig, run_dir: str | Path, *, resume: bool = False
) -> TrainResult:
    """Train (or, with `resume`, continue) a run in `run_dir`; returns the run record."""

    run = Path(run_dir)
    record_path = run / RUN_RECORD
    if resume:
        model, record = _resume(run)
    else:
        if record_path.exists():
            raise FileExistsError(
                f"{run} already holds a run; pass resume=True (--resume) to continue it or "
                f"choose another run directory. Received: run_dir={run}"
            )
        run.mkdir(parents=True, exist_ok=True)
        model, record = _new_run(training_data, config)
    model.run_eagerly = config.run_eagerly
    record["config"] = asdict(config)
    initial_epoch = record["epochs_completed"]
    if initial_epoch >= config.epochs:
        logger.info("run %s already has %d of %d epochs", run, initial_epoch, config.epochs)
        return TrainResult(run, record, model)

    steps = config.steps_per_epoch or math.ceil(len(training_data.train) / config.batch_size)
    train_ds = datasets.make_dataset(
        training_data.train,
        batch_size=config.batch_size,
        training=True,
        augment=config.augment,
        seed=config.seed,
    )
    val_ds = datasets.make_dataset(
        training_data.validation, batch_size=config.validation_batch_size, training=False
    )
    callbacks = _callbacks(run, record, resume=resume)
    logger.info(
        "training epochs %d..%d, %d steps of %d slices per epoch; %s; validation %d slices",
        initial_epoch + 1,
        config.epochs,
        steps,
        config.batch_size,
        training_data.description,
        len(training_data.validation),
    )
    model.fit(
        train_ds,
        epochs=config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps,
        validation_data=val_ds,
        validation_steps=config.validation_steps,
        callbacks=callbacks,
        verbose=config.verbose,
        shuffle=False,  # the dataset shuffles itself, every pass
    )
    record["status"] = "finished"
    _write_json(record_path, record)
    return TrainResult(run, record, model)


def _callbacks(run: Path, record: dict[str, Any], *, resume: bool) -> list[Any]:
    """Keep the best validation accuracy (best.keras), record every epoch (last.keras,
    run.json, history.csv), stop on a NaN loss."""
    import keras

    best = record["best"][MONITOR] if record["best"] else None
    return [
        keras.callbacks.ModelCheckpoint(
            run / BEST,
            monitor=MONITOR,
            mode="max",
            save_best_only=True,
            initial_value_threshold=best,  # on resume, beat the best so far
        ),
        _run_recorder(run, record),
        keras.callbacks.CSVLogger(run / HISTORY, append=resume),
        keras.callbacks.TerminateOnNaN(),
    ]


def _new_run(training_data: TrainingData, config: TrainConfig) -> tuple[Any, dict[str, Any]]:
    import keras
    import tensorflow as tf

    from models.architecture import build_fpn_resnet50v2
    from models.transfer import initialise_backbone

    model = build_fpn_resnet50v2(head_init_std=config.head_init_std, seed=config.seed)
    transfer = initialise_backbone(model, config.imagenet)
    model.compile(
        optimizer=keras.optimizers.Nadam(learning_rate=config.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    record = {
        "status": "running",
        "started_at": _now(),
        "data": {
            "description": training_data.description,
            "fold": training_data.fold,
            "train_slices": len(training_data.train),
            "validation_slices": len(training_data.validation),
        },
        "backbone_init": transfer.describe(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "epochs_completed": 0,
        "best": None,
        "history": [],
    }
    return model, record


def _resume(run: Path) -> tuple[Any, dict[str, Any]]:
    import keras

    import models.architecture  # noqa: F401  (registers the custom layers for loading)

    record_path, last = run / RUN_RECORD, run / LAST
    if not (record_path.is_file() and last.is_file()):
        raise FileNotFoundError(
            f"nothing to resume: {run} holds no {RUN_RECORD} and {LAST} (a run writes them "
            f"at the end of its first epoch). Received: run_dir={run}"
        )
    record = json.loads(record_path.read_text())
    model = keras.models.load_model(last)  # weights and optimiser state
    logger.info(
        "resuming %s after epoch %d (optimiser step %d)",
        run,
        record["epochs_completed"],
        int(model.optimizer.iterations.numpy()),
    )
    record["status"] = "running"
    return model, record


def _run_recorder(run: Path, record: dict[str, Any]) -> Any:
    """Keras callback: after every epoch, save last.keras, then the run record."""
    import keras

    class RunRecorder(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items()}
            entry = {"epoch": epoch + 1, **logs}
            record["history"].append(entry)
            record["epochs_completed"] = epoch + 1
            best = record["best"]
            if MONITOR in logs and (best is None or logs[MONITOR] > best[MONITOR]):
                record["best"] = {**entry, "checkpoint": BEST}
            self.model.save(run / LAST)
            record["updated_at"] = _now()
            _write_json(run / RUN_RECORD, record)

    return RunRecorder()


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- command line -------------------------------------------------------------------------------


def add_train_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train the network on COVID-CTset (paper recipe by default)",
        description="Train FPN-ResNet50V2 with the paper's recipe (Nadam 1e-4, categorical "
        "cross-entropy, batch 14, flips, rotation up to 360°, zoom/shift/shear 0.05, keep "
        "the best validation accuracy) on COVID-CTset's fold layout (--csv-dir, --images, "
        "--fold) or on class folders (--train-dir, --val-dir). Writes best.keras, last.keras, "
        "run.json and history.csv to --run-dir.",
    )
    p.add_argument("--run-dir", type=Path, required=True, help="where the run is written")
    fold = p.add_argument_group("COVID-CTset fold layout")
    fold.add_argument("--csv-dir", type=Path, help="the dataset's CSV folder (train<k>.csv …)")
    fold.add_argument("--images", type=Path, help="folder the CSV file names are relative to")
    fold.add_argument("--fold", type=int, default=1, help="fold 1..5 (default 1)")
    folders = p.add_argument_group("class-folder layout")
    folders.add_argument("--train-dir", type=Path, help="folder with covid/ and normal/")
    folders.add_argument("--val-dir", type=Path, help="validation folder with covid/, normal/")
    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--validation-batch-size", type=int, default=d.validation_batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="default 1e-4")
    p.add_argument("--steps-per-epoch", type=int, help="default: one pass over the data")
    p.add_argument("--validation-steps", type=int, help="default: all validation slices")
    init = p.add_mutually_exclusive_group()
    init.add_argument(
        "--imagenet-weights",
        metavar="PATH",
        help=f"Keras's {IMAGENET_FILE} (default: Keras's cache, else a download; "
        "offline: from scratch, said plainly)",
    )
    init.add_argument("--no-imagenet", action="store_true", help="train from scratch")
    p.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    p.add_argument("--head-init-std", type=float, default=d.head_init_std, help="default 0.001")
    p.add_argument("--seed", type=int, help="seed initialisation, shuffling and augmentation")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--run-eagerly", action="store_true", help="no tf.function (debug, tiny runs)")
    p.add_argument(
        "--verbose",
        type=int,
        default=1,
        choices=(0, 1, 2),
        help="1 progress bar (default), 2 one line per epoch, 0 silent",
    )
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    try:
        training_data = _training_data(args)
        config = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            validation_batch_size=args.validation_batch_size,
            learning_rate=args.learning_rate,
            steps_per_epoch=args.steps_per_epoch,
            validation_steps=args.validation_steps,
            augment=not args.no_augment,
            imagenet=None if args.no_imagenet else (args.imagenet_weights or "auto"),
            head_init_std=args.head_init_std,
            seed=args.seed,
            run_eagerly=args.run_eagerly,
            verbose=args.verbose,
        )
        started = time.perf_counter()
        result = train(training_data, config, args.run_dir, resume=args.resume)
    except (ValueError, OSError) as e:  # bad data, layout, weights file or run directory
        logger.error("%s", e)
        return 1
    best = result.record["best"]
    summary = f"epoch {best['epoch']}, {MONITOR} {best[MONITOR]:.4f}" if best else "none"
    print(
        f"trained {result.record['epochs_completed']} epochs in "
        f"{time.perf_counter() - started:.0f} s; best: {summary} → {result.best_checkpoint}"
    )
    return 0


def _training_data(args: argparse.Namespace) -> TrainingData:
    fold_layout = bool(args.csv_dir or args.images)
    folder_layout = bool(args.train_dir or args.val_dir)
    pairs = (args.csv_dir, args.images) if fold_layout else (args.train_dir, args.val_dir)
    if fold_layout == folder_layout or not all(pairs):
        raise ValueError(
            "give --csv-dir and --images (fold layout) or --train-dir and --val-dir "
            "(class folders), not both"
        )
    if fold_layout:
        return datasets.fold_data(args.csv_dir, args.images, args.fold)
    return datasets.folder_data(args.train_dir, args.val_dir)

"""COVID-CTset on disk, and the training input pipeline.

Three layouts are read:

- the fold layout of COVID-CTset's `Train&Validation.zip`: per-fold CSVs `CSV/train<k>.csv`,
  `CSV/validation<k>.csv`, `CSV/test<k>.csv` of `filename,class` rows (class `covid` or
  `normal`), with the images in one folder that the file names are relative to;
- a plain class-folder layout: `<root>/covid/**.tif`, `<root>/normal/**.tif`;
- raw patient folders, as `COVID-CTset.zip` ships them:
  `<root>/<class>/<patient>/<series>/*.tif` (series SR_2, SR_3, SR_4), for evaluation.

Slices are fed as they are stored: raw 16-bit values (HU + 1024), unscaled, as the paper's
network takes them (the authors read their TIFFs with `cv2.IMREAD_UNCHANGED` and fed them
straight to the network; DESIGN.md section 3). Float TIFFs (images someone normalised to
[0, 1], e.g. for display) have lost those values and are refused.

`TrainingData` is what `models.train` trains on: the fold layout (`fold_data`) or the
class folders (`folder_data`).

TensorFlow is imported only by the functions that build the tf.data pipeline.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tifffile

from app.contract import CLASS_NAMES, IMAGE_SIZE
from app.ingest import natural_key  # the service's natural sort (IM00010 after IM00009)

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
TIFF_SUFFIXES = (".tif", ".tiff")
# The paper's augmentation (section 2.4; its Keras 2 ImageDataGenerator arguments).
ROTATION = 1.0  # fraction of a full turn: up to ±360°
ZOOM = 0.05
SHIFT = 0.05
SHEAR = 0.05


class DatasetError(ValueError):
    """Training or evaluation data that cannot be read as asked."""


@dataclass(frozen=True)
class LabeledSlice:
    path: Path
    label: int  # index into CLASS_NAMES: 0 = covid, 1 = normal


@dataclass(frozen=True)
class PatientFolder:
    """One patient of the raw layout: its class and its series folders (natural order)."""

    label: int
    patient: str  # "<class folder>/<patient folder>"
    series: tuple[Path, ...]


# --- reading slices ------------------------------------------------------------------------


def class_index(name: str) -> int | None:
    """'covid', 'COVID', 'covid-19' → 0; 'normal', 'Normal' → 1; anything else → None."""
    key = name.strip().lower()
    for index, class_name in enumerate(CLASS_NAMES):
        if key.startswith(class_name):
            return index
    return None


def read_slice(path: str | Path) -> np.ndarray:
    """One 512×512 slice as float32, the raw integer stored values unscaled."""
    try:
        image = tifffile.imread(path)
    except Exception as e:  # tifffile raises several kinds for a broken file
        raise DatasetError(f"cannot read TIFF: {e}. Received: {path}") from e
    image = np.squeeze(image)
    if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(
            f"a slice must be one {IMAGE_SIZE}×{IMAGE_SIZE} image. Received: "
            f"shape={image.shape} in {path}"
        )
    _check_raw(image.dtype, path)
    return image.astype(np.float32)


def _check_raw(dtype: np.dtype[Any], where: str | Path) -> None:
    if not np.issubdtype(dtype, np.integer):
        raise DatasetError(
            f"slices must hold raw integer stored values, not {dtype} (a float TIFF "
            f"normalised to [0, 1] has lost the values the network and the open-lung rule "
            f"take). Received: {where}"
        )


def read_series(folder: str | Path) -> np.ndarray:
    """A series folder's TIFFs in natural file-name order: [N, 512, 512] stored values.

    Integer TIFFs only: a float TIFF normalised to [0, 1] has lost the raw values that
    the open-lung rule's cut-off (300) refers to.
    """
    files = sorted(_tiffs(Path(folder), recursive=False), key=lambda p: natural_key(p.name))
    if not files:
        raise DatasetError(f"no TIFF in series folder. Received: {folder}")
    stack = np.stack([tifffile.imread(f) for f in files])
    if stack.ndim != 3 or stack.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"series must be [N, 512, 512]. Received: {stack.shape} in {folder}")
    _check_raw(stack.dtype, folder)
    return stack


def _tiffs(folder: Path, *, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return [p for p in folder.glob(pattern) if p.suffix.lower() in TIFF_SUFFIXES and p.is_file()]


# --- the layouts ------------------------------------------------------------------------------


def fold_csv(csv_dir: str | Path, split: str, fold: int) -> Path:
    """`<csv_dir>/<split><fold>.csv` (any case), e.g. CSV/train1.csv."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}. Received: split={split!r}")
    wanted = f"{split}{fold}.csv"
    folder = Path(csv_dir)
    matches = [p for p in folder.glob("*") if p.name.lower() == wanted] if folder.is_dir() else []
    if not matches:
        raise DatasetError(f"no {wanted} in the CSV folder. Received: csv_dir={folder}")
    return matches[0]


def read_fold_csv(csv_path: str | Path, images_dir: str | Path) -> list[LabeledSlice]:
    """Rows `filename,class` → slices; file names are relative to `images_dir`.

    A file name that is not found there is looked up by its base name anywhere under
    `images_dir` (the archives differ in their folder nesting). Any row left unresolved,
    or any unknown class, is an error: a fold with holes is a wrong path, not a dataset.
    """
    images = Path(images_dir)
    if not images.is_dir():
        raise DatasetError(f"images folder not found. Received: images_dir={images}")
    samples, missing = [], []
    by_name: dict[str, Path] | None = None
    with open(csv_path, newline="", encoding="utf-8-sig") as f:  # BOM or not
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in reader.fieldnames or []}
        if not {"filename", "class"} <= set(columns):
            raise DatasetError(
                f"CSV needs columns filename and class. Received: {reader.fieldnames} in {csv_path}"
            )
        for line, row in enumerate(reader, start=2):
            name, label = row[columns["filename"]].strip(), class_index(row[columns["class"]])
            if label is None:
                raise DatasetError(
                    f"unknown class on line {line} of {csv_path}; expected one of "
                    f"{CLASS_NAMES}. Received: {row[columns['class']]!r}"
                )
            path = images / name
            if not path.is_file():
                if by_name is None:
                    by_name = {p.name: p for p in _tiffs(images, recursive=True)}
                path = by_name.get(Path(name).name, path)
            if not path.is_file():
                missing.append(name)
                continue
            samples.append(LabeledSlice(path, label))
    if missing:
        raise DatasetError(
            f"{len(missing)} of {len(missing) + len(samples)} images of {csv_path} are not "
            f"under {images} (first: {missing[:3]}). Received: images_dir={images}"
        )
    if not samples:
        raise DatasetError(f"no rows in {csv_path}")
    return samples


def read_class_folders(root: str | Path) -> list[LabeledSlice]:
    """`<root>/covid/**.tif` and `<root>/normal/**.tif` (folder names in any case)."""
    folder = Path(root)
    samples = []
    for sub, label in _class_folders(folder, "folder"):
        files = sorted(_tiffs(sub, recursive=True), key=lambda p: natural_key(str(p)))
        samples += [LabeledSlice(p, label) for p in files]
    if not samples:
        raise DatasetError(f"no TIFF under {folder}/covid or {folder}/normal")
    return samples


def find_patients(root: str | Path) -> list[PatientFolder]:
    """`<root>/<class>/<patient>/<series>/*.tif`; a patient folder holding TIFFs itself is
    one series."""
    base = Path(root)
    patients = []
    for class_dir, label in _class_folders(base, "patients folder"):
        for patient in sorted(
            (p for p in class_dir.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name)
        ):
            series = [p for p in patient.iterdir() if p.is_dir() and _tiffs(p, recursive=False)]
            if _tiffs(patient, recursive=False):
                series.append(patient)
            if not series:
                logger.warning("skipped patient folder %s: no TIFF series", patient.name)
                continue
            series.sort(key=lambda p: natural_key(p.name))
            patients.append(PatientFolder(label, f"{class_dir.name}/{patient.name}", tuple(series)))
    if not patients:
        raise DatasetError(f"no <class>/<patient>/<series>/*.tif under {base}")
    return patients


def _class_folders(root: Path, what: str) -> Iterator[tuple[Path, int]]:
    """(sub-folder, class index) for each sub-folder named after a class; others are skipped."""
    if not root.is_dir():
        raise DatasetError(f"{what} not found. Received: {root}")
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = class_index(sub.name)
        if label is None:
            logger.warning("skipped folder %s: not a class name %s", sub.name, CLASS_NAMES)
            continue
        yield sub, label


def keep_patients(patients: Sequence[PatientFolder], names: Iterable[str]) -> list[PatientFolder]:
    """Only the patients whose folder name is listed (e.g. one fold's test patients).

    A listed name that matches no folder is an error: a typo must not shrink a test set.
    """
    wanted = {n.strip() for n in names if n.strip() and not n.startswith("#")}
    kept = [p for p in patients if p.patient.rsplit("/", 1)[-1] in wanted]
    missing = wanted - {p.patient.rsplit("/", 1)[-1] for p in kept}
    if missing:
        raise DatasetError(
            f"{len(missing)} listed patients have no folder (first: {sorted(missing)[:3]}). "
            f"Received: {len(wanted)} names"
        )
    return kept


def describe(samples: Sequence[LabeledSlice]) -> str:
    """'1820 covid, 1916 normal slices'."""
    counts = Counter(s.label for s in samples)
    return ", ".join(f"{counts[i]} {name}" for i, name in enumerate(CLASS_NAMES)) + " slices"


# --- training data ------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingData:
    train: tuple[LabeledSlice, ...]
    validation: tuple[LabeledSlice, ...]
    description: str  # goes into the model card's training_data
    fold: int | None = None


def fold_data(csv_dir: str | Path, images_dir: str | Path, fold: int) -> TrainingData:
    """COVID-CTset's fold layout: CSV/train<k>.csv and CSV/validation<k>.csv over one folder."""
    splits = {}
    for split in ("train", "validation"):
        path = fold_csv(csv_dir, split, fold)
        splits[split] = (path, tuple(read_fold_csv(path, images_dir)))
    description = f"COVID-CTset fold {fold}: " + "; ".join(
        f"{path.name} ({describe(samples)})" for path, samples in splits.values()
    )
    return TrainingData(splits["train"][1], splits["validation"][1], description, fold)


def folder_data(train_dir: str | Path, validation_dir: str | Path) -> TrainingData:
    """Class folders: <train_dir>/{covid,normal}/ and <validation_dir>/{covid,normal}/."""
    train = tuple(read_class_folders(train_dir))
    validation = tuple(read_class_folders(validation_dir))
    description = (
        f"class folders: {Path(train_dir).name} ({describe(train)}); "
        f"{Path(validation_dir).name} ({describe(validation)})"
    )
    return TrainingData(train, validation, description)


# --- the tf.data pipeline ---------------------------------------------------------------------


def augmentation(
    *,
    rotation: float = ROTATION,
    zoom: float = ZOOM,
    shift: float = SHIFT,
    shear: float = SHEAR,
    seed: int | None = None,
) -> Any:
    """The paper's augmentation as Keras 3 layers: flips, rotation, zoom, shift, shear.

    Empty borders take the nearest pixel, as Keras 2's ImageDataGenerator did by default.
    Rotation and shear are each a fraction: of a full turn, of the image width.
    """
    import keras
    from keras import layers

    fill = {"fill_mode": "nearest"}

    def sub_seed(i: int) -> int | None:
        return None if seed is None else seed + i

    return keras.Sequential(
        [
            layers.RandomFlip("horizontal_and_vertical", seed=sub_seed(0)),
            layers.RandomRotation(rotation, seed=sub_seed(1), **fill),
            layers.RandomZoom(zoom, zoom, seed=sub_seed(2), **fill),
            layers.RandomTranslation(shift, shift, seed=sub_seed(3), **fill),
            layers.RandomShear(shear, shear, seed=sub_seed(4), **fill),
        ],
        name="paper_augmentation",
    )


def make_dataset(
    samples: Sequence[LabeledSlice],
    *,
    batch_size: int,
    training: bool,
    augment: bool = True,
    seed: int | None = None,
) -> tf.data.Dataset:
    """(slices float32 [B, 512, 512, 1] stored values, one-hot labels float32 [B, 2]).

    With `training`: shuffled every pass, repeated without end (the caller sets the steps
    per epoch) and, with `augment`, augmented per batch. Otherwise in order, once.
    """
    import tensorflow as tf

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    if not samples:
        raise DatasetError("no slices to feed")
    paths = [str(s.path) for s in samples]
    labels = np.eye(len(CLASS_NAMES), dtype=np.float32)[[s.label for s in samples]]
    ds = tf.data.Dataset.from_tensor_slices((paths, labels))
    if training:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True).repeat()
    ds = ds.map(_load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    if training and augment:
        augmenter = augmentation(seed=seed)
        ds = ds.map(
            lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def _load(path: Any, label: Any) -> tuple[Any, Any]:
    import tensorflow as tf

    image = tf.numpy_function(lambda p: read_slice(p.decode()), [path], tf.float32)
    image = tf.ensure_shape(image[..., None], (IMAGE_SIZE, IMAGE_SIZE, 1))
    return image, label


def as_batches(items: Iterable[np.ndarray], batch_size: int) -> Iterable[np.ndarray]:
    """Stack [512, 512] arrays into float32 [B, 512, 512, 1] batches of at most batch_size."""
    batch: list[np.ndarray] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield np.stack(batch).astype(np.float32)[..., None]
            batch = []
    if batch:
        yield np.stack(batch).astype(np.float32)[..., None]

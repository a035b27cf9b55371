"""`python -m models verify-import FILE DIR`: does the SavedModel DIR compute what FILE does?

FILE is a Keras 2 HDF5 network of the authors (`FPN-fold1.hdf5`, whole model or weights
only); DIR the SavedModel `import-weights` made from it. FILE is run under Keras 2 itself,
in a process of its own (models/keras2_reference.py: an independent build of the authors'
network, loaded with Keras's `load_weights`), DIR as the service runs it, both on the same
raw slices; the command prints the largest covid-probability difference and how many
predicted classes agree, and fails when the difference exceeds the tolerance.

The slices: by default 8 synthetic CT-like slices (deterministic; no patient data is
bundled), or 8 slices spread over a DICOM series of your own (`--dicom-dir`), decoded by
the service's ingest to HU + 1024. With trained weights, synthetic slices may all score
the same; the command says so, and then only a real series shows agreement.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLICES = 8
# The import copies every weight exactly; what is left is float rounding of two different
# graphs (Keras 2's and the folded export's): measured 1.3e-5 in covid probability on 8
# P002 slices (tests/models/test_keras2_files.py).
DEFAULT_TOLERANCE = 1e-4
# Below this spread of the file's scores, agreement says little about the network.
MIN_SPREAD = 0.1


@dataclass(frozen=True)
class Comparison:
    """The authors' file under Keras 2 against the SavedModel, slice by slice."""

    keras2: np.ndarray  # covid probability [N]
    saved_model: np.ndarray  # covid probability [N]

    @property
    def max_difference(self) -> float:
        return float(np.max(np.abs(self.keras2 - self.saved_model)))

    @property
    def spread(self) -> float:
        return float(np.ptp(self.keras2))

    @property
    def classes_agree(self) -> int:
        return int(np.sum((self.keras2 > 0.5) == (self.saved_model > 0.5)))

    def report(self, tolerance: float) -> list[str]:
        n = len(self.keras2)
        lines = [
            f"max |covid probability difference| = {self.max_difference:.3g} over {n} slices "
            f"(tolerance {tolerance:g})",
            f"predicted class agrees on {self.classes_agree} of {n} slices",
            f"the file's covid probabilities span {self.keras2.min():.4f} … "
            f"{self.keras2.max():.4f}",
        ]
        if self.spread < MIN_SPREAD:
            lines.append(
                f"warning: the file's scores spread by only {self.spread:.3g} on these "
                "slices, so agreement says little; run with --dicom-dir on a chest CT series"
            )
        return lines


def synthetic_slices(n: int = DEFAULT_SLICES) -> np.ndarray:
    """n deterministic CT-like slices, float32 [n, 512, 512, 1], raw stored values."""
    from models.calibration import ct_like_slices

    return ct_like_slices(n, seed=0)


def series_slices(dicom_dir: str | Path, n: int = DEFAULT_SLICES) -> np.ndarray:
    """n slices spread evenly over the first series of a folder of DICOM files, decoded by
    the service's ingest (HU + 1024, clipped at 0), float32 [n, 512, 512, 1]."""
    import io
    import zipfile

    from app.ingest import IngestLimits, configure_libraries, ingest_zip

    folder = Path(dicom_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no files in the DICOM folder. Received: {folder}")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for path in files:
            zf.write(path, path.relative_to(folder).as_posix())
    configure_libraries()
    study = ingest_zip(buffer.getvalue(), IngestLimits())
    pixels = study.series[0].pixels
    index = np.unique(np.linspace(0, len(pixels) - 1, n).round().astype(int))
    return pixels[index].astype(np.float32)[..., None]


def keras2_covid_probability(h5_path: str | Path, slices: np.ndarray) -> np.ndarray:
    """The file's covid probabilities under Keras 2, run in a process of its own."""
    with tempfile.TemporaryDirectory(prefix="covidct-verify-") as tmp:
        x, y = Path(tmp) / "slices.npy", Path(tmp) / "out.npy"
        np.save(x, slices)
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        done = subprocess.run(
            [sys.executable, "-m", "models.keras2_reference", "predict", str(h5_path), x, y],
            capture_output=True, text=True, cwd=ROOT, env=env, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"Keras 2 could not run {Path(h5_path).name}: {done.stderr.strip()[-2000:]}"
            )
        probabilities = np.load(y)
    from app.contract import COVID_CLASS

    return np.asarray(probabilities[:, COVID_CLASS], np.float64)


def saved_model_covid_probability(saved_model_dir: str | Path, slices: np.ndarray) -> np.ndarray:
    """Covid probabilities of the SavedModel, through its serving signature."""
    import tensorflow as tf

    from app import contract

    loaded = tf.saved_model.load(str(saved_model_dir))
    fn = loaded.signatures[contract.SIGNATURE_KEY]
    contract.check_signature(fn)
    out = fn(**{contract.INPUT_NAME: tf.constant(slices, tf.float32)})
    return np.asarray(out[contract.OUTPUT_COVID].numpy(), np.float64)


def verify_import(
    h5_path: str | Path,
    saved_model_dir: str | Path,
    *,
    dicom_dir: str | Path | None = None,
    n: int = DEFAULT_SLICES,
) -> Comparison:
    slices = synthetic_slices(n) if dicom_dir is None else series_slices(dicom_dir, n)
    keras2 = keras2_covid_probability(h5_path, slices)
    return Comparison(keras2, saved_model_covid_probability(saved_model_dir, slices))


# --- command line -------------------------------------------------------------------------------


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "verify-import",
        help="compare a SavedModel with the Keras 2 HDF5 file it was imported from",
        description="Run the authors' HDF5 file under Keras 2 (tf-keras, in a process of "
        "its own) and the SavedModel on the same raw slices; print the largest covid-"
        "probability difference; exit 1 when it exceeds the tolerance.",
    )
    p.add_argument("h5", type=Path, help="the HDF5 file, e.g. FPN-fold1.hdf5")
    p.add_argument("saved_model", type=Path, help="the SavedModel directory import-weights wrote")
    p.add_argument(
        "--dicom-dir",
        type=Path,
        default=None,
        help="a folder of one chest CT series (DICOM) to take slices from "
        "(default: synthetic CT-like slices)",
    )
    p.add_argument("--slices", type=int, default=DEFAULT_SLICES, help="how many slices")
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest covid-probability difference accepted (default {DEFAULT_TOLERANCE:g})",
    )
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    from app.contract import read_card

    try:
        card = read_card(args.saved_model)
        comparison = verify_import(
            args.h5, args.saved_model, dicom_dir=args.dicom_dir, n=args.slices
        )
    except (ValueError, OSError, RuntimeError) as e:
        logger.error("%s", e)
        return 1
    source = "synthetic CT-like slices" if args.dicom_dir is None else "the DICOM series"
    print(f"{args.h5.name} (Keras 2) vs {args.saved_model} (model {card.version}, "
          f"preprocessing {card.preprocessing!r}) on {source}:")  # fmt: skip
    for line in comparison.report(args.tolerance):
        print(f"  {line}")
    ok = comparison.max_difference <= args.tolerance
    print("OK: the SavedModel computes the file's network" if ok else "MISMATCH")
    return 0 if ok else 1

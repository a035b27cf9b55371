"""Reference computations for the evaluation tests, written apart from models/ on purpose:
the AUC as a pairwise count, and DICOM pixels read with pydicom alone (not app.ingest)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pydicom


def pairwise_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """P(a positive outscores a negative), ties counted half: every pair counted."""
    positive = np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def stored_values(path: Path) -> np.ndarray:
    """One slice as HU + 1024 clipped at 0 (the paper's domain), by pydicom's own decoders."""
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return np.clip(hu + 1024, 0, None)


def open_lung_mask(images: list[np.ndarray]) -> np.ndarray:
    """The paper's rule written out: pixels < 300 in rows 240:340, columns 120:370; selected
    when the count exceeds (max - min) / 1.5 of the series."""
    counts = np.array([(image[240:340, 120:370] < 300).sum() for image in images])
    return counts > (counts.max() - counts.min()) / 1.5

"""PNG plots of an evaluation: confusion matrices, ROC, the patient threshold sweep.

matplotlib is imported by the functions (Agg backend: no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.contract import CLASS_NAMES
from models.metrics import PaperMetrics
from models.reports import REPORTED_THRESHOLDS, SliceReport, SweepPoint


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    path: Path, metrics: PaperMetrics, title: str, classes: Sequence[str] = CLASS_NAMES
) -> None:
    plt = _pyplot()
    counts = np.array(metrics.counts)
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(counts, cmap="Blues")
    for (i, j), v in np.ndenumerate(counts):
        dark = v > counts.max() / 2
        ax.text(j, i, str(v), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = metrics.overall_accuracy
    ax.set_title(f"{title}\naccuracy {accuracy:.4f}" if accuracy is not None else title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_roc(
    path: Path, slices: SliceReport | None, sweep: Sequence[SweepPoint] = (), label: str = "slices"
) -> None:
    """The slice ROC and, where given, the patient-level points of the threshold sweep."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if slices is not None and slices.auc is not None:
        text = f"{label} (AUC {slices.auc:.4f}"
        if interval := slices.auc_interval:
            text += f", {interval.level:.0%} CI {interval.low:.3f}-{interval.high:.3f}"
        ax.plot(slices.roc.fpr, slices.roc.tpr, label=text + ")")
    points = [
        (1 - p.specificity, p.sensitivity)
        for p in sweep
        if p.specificity is not None and p.sensitivity is not None
    ]
    if points:
        x, y = zip(*points, strict=True)
        ax.plot(x, y, "o-", markersize=3, label="patients (rule, t swept)")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 − specificity (covid positive)")
    ax.set_ylabel("sensitivity")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sweep(path: Path, sweep: Sequence[SweepPoint]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    t = [p.threshold for p in sweep]
    for key in ("accuracy", "sensitivity", "specificity"):
        values = [getattr(p, key) for p in sweep]
        ax.plot(t, [np.nan if v is None else v for v in values], label=key)
    for mark in REPORTED_THRESHOLDS:
        ax.axvline(mark, color="grey", linestyle=":")
    ax.set_xlabel("patient threshold t (fraction of selected slices that must be COVID)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

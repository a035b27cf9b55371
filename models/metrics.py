"""The paper's metrics (section 3.1) as typed values: confusion matrix, per-class ratios, ROC.

Per class c (positive = c), with TP, FN, FP, TN counted for c: accuracy (TP + TN) / all,
sensitivity TP / (TP + FN), specificity TN / (TN + FP), precision TP / (TP + FP); overall
accuracy = correct / all. A ratio with nothing to count is None, never NaN. The ROC comes
from the covid probability; its AUC equals the Mann-Whitney probability that a positive
outscores a negative (ties counted half), and `bootstrap_auc` gives a seeded percentile
interval for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.contract import CLASS_NAMES, COVID_CLASS


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


@dataclass(frozen=True)
class ClassMetrics:
    """One class taken as the positive one."""

    tp: int
    fn: int
    fp: int
    tn: int

    @property
    def accuracy(self) -> float | None:
        return _ratio(self.tp + self.tn, self.tp + self.fn + self.fp + self.tn)

    @property
    def sensitivity(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    def to_json(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "fn": self.fn,
            "fp": self.fp,
            "tn": self.tn,
            "accuracy": self.accuracy,
            "sensitivity": self.sensitivity,
            "specificity": self.specificity,
            "precision": self.precision,
        }


@dataclass(frozen=True)
class PaperMetrics:
    """A confusion matrix (rows the true class, columns the predicted, CLASS_NAMES order)
    and the paper's metrics from it."""

    counts: tuple[tuple[int, ...], ...]

    @classmethod
    def from_labels(cls, labels: np.ndarray, predicted: np.ndarray) -> PaperMetrics:
        """labels, predicted: int [N], indices into CLASS_NAMES."""
        k = len(CLASS_NAMES)
        flat = np.asarray(labels, dtype=np.int64) * k + np.asarray(predicted, dtype=np.int64)
        matrix = np.bincount(flat, minlength=k * k).reshape(k, k)
        return cls(tuple(tuple(int(v) for v in row) for row in matrix))

    @property
    def n(self) -> int:
        return sum(map(sum, self.counts))

    @property
    def overall_accuracy(self) -> float | None:
        return _ratio(sum(self.counts[i][i] for i in range(len(self.counts))), self.n)

    def of(self, class_index: int) -> ClassMetrics:
        """The metrics with `class_index` (into CLASS_NAMES) as the positive class."""
        tp = self.counts[class_index][class_index]
        fn = sum(self.counts[class_index]) - tp
        fp = sum(row[class_index] for row in self.counts) - tp
        return ClassMetrics(tp, fn, fp, self.n - tp - fn - fp)

    @property
    def covid(self) -> ClassMetrics:
        return self.of(COVID_CLASS)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "overall_accuracy": self.overall_accuracy,
            "confusion": {
                "rows": "true",
                "columns": "predicted",
                "classes": list(CLASS_NAMES),
                "counts": [list(row) for row in self.counts],
            },
            **{name: self.of(c).to_json() for c, name in enumerate(CLASS_NAMES)},
        }


@dataclass(frozen=True)
class Roc:
    """ROC points from the strictest cut-off (0, 0) to (1, 1); empty without both classes."""

    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    thresholds: tuple[float, ...]  # the score of each point after the first
    auc: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "fpr": list(self.fpr),
            "tpr": list(self.tpr),
            "thresholds": list(self.thresholds),
            "auc": self.auc,
        }


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> Roc:
    """ROC of `scores` (float [N]) for the boolean `positive` [N]. Tied scores form one
    step, so the AUC is the Mann-Whitney probability with ties counted half."""
    steps = _roc_steps(np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64))
    if steps is None:
        return Roc((), (), (), None)
    tp, fp, thresholds = steps
    fpr, tpr = fp / fp[-1], tp / tp[-1]
    return Roc(tuple(fpr.tolist()), tuple(tpr.tolist()), tuple(thresholds.tolist()), _area(tp, fp))


def _roc_steps(
    positive: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Cumulative true and false positive counts (int, from 0) at each distinct score, from
    the highest; None without both classes."""
    if positive.all() or not positive.any():
        return None
    order = np.argsort(-scores, kind="stable")
    s, pos = scores[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.r_[0, np.cumsum(pos)[last_of_tie]]
    fp = np.r_[0, np.cumsum(~pos)[last_of_tie]]
    return tp, fp, s[last_of_tie]


def _area(tp: np.ndarray, fp: np.ndarray) -> float:
    """Trapezoids over the counts, divided once: exact where the AUC is 0 or 1."""
    twice = int(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])))
    return twice / (2 * int(tp[-1]) * int(fp[-1]))


@dataclass(frozen=True)
class AucInterval:
    """A percentile bootstrap interval of the AUC.

    Resampling is stratified (each resample keeps the numbers of positives and negatives)
    and by slice: slices of one patient are not independent, so with few patients the
    interval understates the uncertainty about other patients.
    """

    low: float
    high: float
    level: float
    resamples: int
    seed: int
    unit: str = "slice, stratified by label"

    def to_json(self) -> dict[str, Any]:
        return {
            "low": self.low,
            "high": self.high,
            "level": self.level,
            "resamples": self.resamples,
            "seed": self.seed,
            "unit": self.unit,
        }


def bootstrap_auc(
    positive: np.ndarray,
    scores: np.ndarray,
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> AucInterval | None:
    """The AUC's percentile interval over `resamples` seeded, stratified resamples; None
    without both classes."""
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1. Received: resamples={resamples}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1). Received: level={level}")
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[positive], scores[~positive]
    if not (pos.size and neg.size):
        return None
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    aucs = np.empty(resamples)
    for i in range(resamples):
        sample = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
        steps = _roc_steps(labels, sample)
        assert steps is not None  # both classes are in every stratified resample
        aucs[i] = _area(steps[0], steps[1])
    tail = (1 - level) / 2
    low, high = np.quantile(aucs, [tail, 1 - tail])
    return AucInterval(float(low), float(high), level, resamples, seed)

"""models.metrics: the paper's ratios, the ROC and the bootstrap interval of its AUC.

Expected values come from hand counts or from a direct pairwise count (the Mann-Whitney
definition of the AUC), never from the functions under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import PaperMetrics, bootstrap_auc, roc_curve
from reference import pairwise_auc


def test_roc_counts_ties_as_half():
    roc = roc_curve(np.array([True, True, False, False]), np.array([0.5, 0.5, 0.5, 0.1]))
    assert roc.auc == pytest.approx((2 * 1 + 2 * 0.5) / 4)
    assert roc.fpr[0] == 0 and roc.tpr[-1] == 1 and roc.fpr[-1] == 1
    assert roc_curve(np.array([True]), np.array([0.3])).auc is None


def test_the_auc_is_the_pairwise_probability():
    rng = np.random.default_rng(3)
    positive = rng.random(60) < 0.4
    # Rounded so that many scores tie, within and across the classes.
    scores = np.round(rng.random(60) * 0.6 + 0.3 * positive, 1)
    assert roc_curve(positive, scores).auc == pytest.approx(pairwise_auc(positive, scores))


def test_metrics_without_a_class_are_none_not_nan():
    metrics = PaperMetrics.from_labels(np.array([0, 0]), np.array([0, 1]))
    assert metrics.covid.sensitivity == 0.5
    assert metrics.covid.specificity is None  # no normal slice at all
    assert metrics.of(1).precision == 0.0
    assert metrics.to_json()["covid"]["specificity"] is None


def test_the_bootstrap_interval_is_seeded_and_brackets_the_auc():
    rng = np.random.default_rng(7)
    positive = np.r_[np.ones(40, bool), np.zeros(60, bool)]
    scores = rng.normal(0.6 * positive, 0.5)
    auc = pairwise_auc(positive, scores)
    a = bootstrap_auc(positive, scores, resamples=500, seed=1)
    b = bootstrap_auc(positive, scores, resamples=500, seed=1)
    c = bootstrap_auc(positive, scores, resamples=500, seed=2)
    assert a is not None and b is not None and c is not None
    assert (a.low, a.high) == (b.low, b.high)  # the seed fixes the interval
    assert (a.low, a.high) != (c.low, c.high)
    assert a.low < auc < a.high
    # The AUC's standard error here is about 0.05 (Hanley & McNeil with n = 40 + 60 and
    # AUC ≈ 0.8): a 95 % interval some 0.2 wide, not 0 and not the whole unit interval.
    assert 0.08 < a.high - a.low < 0.4


def test_a_perfect_separation_gives_a_point_interval():
    """Every stratified resample keeps both classes apart: AUC 1 each time."""
    positive = np.array([True] * 5 + [False] * 7)
    scores = np.r_[np.linspace(0.6, 0.9, 5), np.linspace(0.1, 0.5, 7)]
    interval = bootstrap_auc(positive, scores, resamples=200, seed=0)
    assert interval is not None and (interval.low, interval.high) == (1.0, 1.0)
    assert bootstrap_auc(np.array([True, True]), np.array([0.2, 0.4])) is None
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_auc(positive, scores, resamples=0)

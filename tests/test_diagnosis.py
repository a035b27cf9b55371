"""The patient threshold k >= max(1, ceil(t*n)) as a table, and the multi-series rule."""

from __future__ import annotations

import numpy as np
import pytest

from app.diagnosis import judge_patient, judge_series, model_slices, required_covid_slices
from app.domain import Selection, Verdict


@pytest.mark.parametrize(
    ("n", "t", "required"),
    [
        (1, 0.0, 1),
        (50, 0.0, 1),  # the paper's "threshold 1": one COVID slice suffices
        (10, 0.1, 1),
        (11, 0.1, 2),
        (30, 0.1, 3),  # 0.1 * 30 is 3.0000000000000004 in floats: still 3
        (31, 0.1, 4),
        (5, 0.1, 1),  # ceil(0.5) = 1
        (70, 0.3, 21),  # 0.3 * 70 = 20.999999999999996 in floats: 21
        (40, 0.25, 10),
        (40, 1.0, 40),
        (0, 0.1, 1),
    ],
)
def test_required_covid_slices(n: int, t: float, required: int) -> None:
    assert required_covid_slices(n, t) == required


@pytest.mark.parametrize("t", [-0.01, 1.01])
def test_threshold_outside_unit_interval_rejected(t: float) -> None:
    with pytest.raises(ValueError, match="Received"):
        required_covid_slices(10, t)


def probs(k: int, n: int) -> np.ndarray:
    return np.array([0.9] * k + [0.1] * (n - k), dtype=np.float32)


def selected(n: int, *, has_lung: bool = True) -> Selection:
    """A selection that keeps all n slices."""
    return Selection(np.full(n, 1000), 0.0, np.ones(n, dtype=bool), has_lung=has_lung)


@pytest.mark.parametrize(
    ("k", "n", "t", "outcome"),
    [
        (0, 20, 0.0, "normal"),
        (1, 20, 0.0, "covid"),
        (1, 20, 0.1, "normal"),
        (2, 20, 0.1, "covid"),
        (3, 30, 0.1, "covid"),
        (2, 30, 0.1, "normal"),
        (20, 20, 1.0, "covid"),
        (19, 20, 1.0, "normal"),
    ],
)
def test_judge_series_table(k: int, n: int, t: float, outcome: str) -> None:
    v = judge_series(selected(n), probs(k, n), threshold=t)
    assert (v.outcome, v.k, v.n) == (outcome, k, n)


def test_probability_exactly_half_is_not_covid() -> None:
    assert judge_series(selected(2), np.array([0.5, 0.5], np.float32), threshold=0.0).k == 0


def test_no_selected_slice_is_indeterminate_never_normal() -> None:
    v = judge_series(selected(0), np.zeros(0, np.float32), threshold=0.1)
    assert v.outcome == "indeterminate"


def test_no_lung_is_indeterminate_even_with_covid_scores() -> None:
    v = judge_series(selected(3, has_lung=False), probs(3, 3), threshold=0.1)
    assert v.outcome == "indeterminate"


def test_no_lung_or_set_aside_series_never_reaches_the_model() -> None:
    assert model_slices(selected(3, has_lung=False)).size == 0
    assert model_slices(selected(3), set_aside="not axial").size == 0
    assert model_slices(selected(3)).tolist() == [0, 1, 2]


def test_set_aside_series_is_indeterminate_with_its_reason() -> None:
    v = judge_series(selected(3), np.zeros(0, np.float32), threshold=0.1, set_aside="not axial")
    assert (v.outcome, v.reason, v.n) == ("indeterminate", "not axial", 0)


def test_probabilities_must_score_the_selected_slices() -> None:
    with pytest.raises(ValueError, match="Received"):
        judge_series(selected(3), probs(1, 2), threshold=0.1)


def verdict(outcome: str, k: int, n: int, required: int = 1) -> Verdict:
    return Verdict(outcome, k, n, required, 0.1)  # type: ignore[arg-type]


def test_patient_is_covid_when_any_series_is_covid() -> None:
    v, best = judge_patient(
        [verdict("normal", 0, 60), verdict("covid", 5, 40, 4), verdict("indeterminate", 0, 0, 0)],
        threshold=0.1,
    )
    assert (v.outcome, best) == ("covid", 1)


def test_patient_normal_needs_one_judged_series() -> None:
    v, best = judge_patient(
        [verdict("indeterminate", 0, 0, 0), verdict("normal", 1, 30, 3)], threshold=0.1
    )
    assert (v.outcome, v.n, best) == ("normal", 30, 1)


def test_patient_indeterminate_when_nothing_judged() -> None:
    v, best = judge_patient([verdict("indeterminate", 0, 3, 0)], threshold=0.1)
    assert (v.outcome, best) == ("indeterminate", None)
    assert judge_patient([], threshold=0.1)[0].outcome == "indeterminate"

"""Stage 4: the patient threshold (Rahimzadeh et al. 2021, section 3.2).

A slice is COVID when its covid probability > 0.5 (the argmax of two classes). With n
selected slices of which k are COVID, and a threshold fraction t, a series is COVID when
k >= max(1, ceil(t * n)); t = 0 is the paper's "threshold 1" (one COVID slice suffices),
t = 0.1 its reported setting. No selected slice, or no open lung → `indeterminate`.

A patient with several series: COVID when any judged series is COVID, `normal` when at
least one series was judged and none is COVID, `indeterminate` when none could be judged.
The top-level k and n are those of the deciding series (the COVID series with the largest
k / required margin, else the judged series with the most selected slices).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.domain import Outcome, Selection, Verdict

SLICE_COVID_CUTOFF = 0.5


def required_covid_slices(n: int, threshold: float) -> int:
    """max(1, ceil(t·n)). Rounded first so that 0.1·30 counts as 3, not 3.0000000000000004 → 4."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]. Received: threshold={threshold}")
    if n < 0:
        raise ValueError(f"n must be >= 0. Received: n={n}")
    return max(1, math.ceil(round(threshold * n, 9)))


@dataclass(frozen=True)
class PatientRule:
    """The patient threshold's configuration: t when a request does not give one."""

    threshold: float = 0.1  # the paper's reported setting

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1]. Received: threshold={self.threshold}")


def model_slices(selection: Selection, *, set_aside: str | None = None) -> np.ndarray:
    """Indices (int64, ascending) of the slices the model must score; empty when the series
    cannot be judged (set aside, e.g. not axial, or no open lung): such a series never
    reaches the model. The service and `models evaluate` both call this."""
    if set_aside is not None or not selection.has_lung:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(selection.mask).astype(np.int64)


def judge_series(
    selection: Selection,
    covid_probability: np.ndarray,
    *,
    threshold: float,
    set_aside: str | None = None,
) -> Verdict:
    """Judge one series. `covid_probability` ([n], float) scores the slices that
    `model_slices(selection, set_aside=...)` named, in that order."""
    n = int(covid_probability.size)
    if set_aside is not None:
        return Verdict("indeterminate", 0, 0, 0, threshold, reason=set_aside)
    if not selection.has_lung:
        return Verdict("indeterminate", 0, n, 0, threshold, reason="no open lung in the series")
    if n != selection.n_selected:
        raise ValueError(
            f"covid_probability must score the {selection.n_selected} selected slices. "
            f"Received: {n} probabilities"
        )
    if n == 0:
        return Verdict("indeterminate", 0, 0, 0, threshold, reason="no slice selected")
    k = int(np.count_nonzero(covid_probability > SLICE_COVID_CUTOFF))
    required = required_covid_slices(n, threshold)
    outcome: Outcome = "covid" if k >= required else "normal"
    return Verdict(outcome, k, n, required, threshold, reason=f"{k} of {n} selected slices COVID")


def judge_patient(verdicts: Sequence[Verdict], *, threshold: float) -> tuple[Verdict, int | None]:
    """Combine series verdicts; returns the patient verdict and the deciding series' position."""
    covid = [i for i, v in enumerate(verdicts) if v.outcome == "covid"]
    judged = [i for i, v in enumerate(verdicts) if v.outcome != "indeterminate"]
    if covid:
        best = max(covid, key=lambda i: (verdicts[i].k - verdicts[i].required, verdicts[i].n))
    elif judged:
        best = max(judged, key=lambda i: verdicts[i].n)
    else:
        return (
            Verdict("indeterminate", 0, 0, 0, threshold, reason="no series with open lung"),
            None,
        )
    return verdicts[best], best

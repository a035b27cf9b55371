"""Typed evaluation reports, built from scores; their JSON form and their terminal summary.

Slice level (paper section 3.1): a slice is COVID when its covid probability > 0.5; the
paper's metrics of `models.metrics`, the ROC and its AUC with a bootstrap interval.

Patient level (paper Table 6): each patient judged as the service judges it
(`models.scoring.judge`) at each reported threshold t and over a sweep of t. A patient the
service would call `indeterminate` (no open lung, or every series set aside) is counted
apart: the confusion matrix and its metrics cover the judged patients.

Selector recall (external data with slice labels): the share of the radiologists' infected
slices that the open-lung rule keeps, i.e. that the service sends to the model at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from app.contract import CLASS_NAMES, COVID_CLASS
from app.selection import SelectionRule
from models.metrics import AucInterval, PaperMetrics, Roc, bootstrap_auc, roc_curve
from models.scoring import PatientScore, SliceScores, judge

REPORTED_THRESHOLDS = (0.0, 0.1)  # t = 0 is the paper's "threshold 1"; 0.1 its setting
SWEEP = tuple(round(t, 2) for t in np.arange(0.0, 1.0001, 0.01))


@dataclass(frozen=True)
class Bootstrap:
    """How the AUC's interval is drawn."""

    resamples: int = 2000
    seed: int = 0
    level: float = 0.95


DEFAULT_BOOTSTRAP = Bootstrap()


@dataclass(frozen=True)
class SliceReport:
    metrics: PaperMetrics
    roc: Roc
    auc_interval: AucInterval | None

    @property
    def auc(self) -> float | None:
        return self.roc.auc

    def to_json(self) -> dict[str, Any]:
        interval = self.auc_interval.to_json() if self.auc_interval else None
        return {
            **self.metrics.to_json(),
            "auc": self.auc,
            "auc_interval": interval,
            "roc": self.roc.to_json(),
        }


def slice_report(scores: SliceScores, bootstrap: Bootstrap = DEFAULT_BOOTSTRAP) -> SliceReport:
    positive = scores.labels == COVID_CLASS
    interval = bootstrap_auc(
        positive,
        scores.covid_probability,
        resamples=bootstrap.resamples,
        seed=bootstrap.seed,
        level=bootstrap.level,
    )
    return SliceReport(
        PaperMetrics.from_labels(scores.labels, scores.predicted),
        roc_curve(positive, scores.covid_probability),
        interval,
    )


@dataclass(frozen=True)
class PatientOutcome:
    patient: str
    label: str
    outcome: str
    k: int
    n: int
    required: int


@dataclass(frozen=True)
class PatientReport:
    """Table 6 at one threshold t."""

    threshold: float
    metrics: PaperMetrics  # over the judged patients
    indeterminate: tuple[int, ...]  # per true class (CLASS_NAMES order)
    patients: tuple[PatientOutcome, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            **self.metrics.to_json(),
            "indeterminate": dict(zip(CLASS_NAMES, self.indeterminate, strict=True)),
            "patients": [asdict(p) for p in self.patients],
        }


def patient_report(patients: Sequence[PatientScore], threshold: float) -> PatientReport:
    verdicts = [judge(p, threshold) for p in patients]
    pairs = list(zip(patients, verdicts, strict=True))
    judged = [(p, v) for p, v in pairs if v.outcome != "indeterminate"]
    labels = np.array([p.label for p, _ in judged], dtype=int)
    predicted = np.array([CLASS_NAMES.index(v.outcome) for _, v in judged], dtype=int)
    indeterminate = tuple(
        sum(1 for p, v in pairs if p.label == c and v.outcome == "indeterminate")
        for c in range(len(CLASS_NAMES))
    )
    outcomes = tuple(
        PatientOutcome(p.patient, CLASS_NAMES[p.label], v.outcome, v.k, v.n, v.required)
        for p, v in pairs
    )
    return PatientReport(
        threshold, PaperMetrics.from_labels(labels, predicted), indeterminate, outcomes
    )


@dataclass(frozen=True)
class SweepPoint:
    threshold: float
    accuracy: float | None
    sensitivity: float | None
    specificity: float | None
    precision: float | None
    indeterminate: int


def sweep(
    patients: Sequence[PatientScore], thresholds: Sequence[float] = SWEEP
) -> list[SweepPoint]:
    points = []
    for t in thresholds:
        r = patient_report(patients, t)
        covid = r.metrics.covid
        points.append(
            SweepPoint(
                t,
                r.metrics.overall_accuracy,
                covid.sensitivity,
                covid.specificity,
                covid.precision,
                sum(r.indeterminate),
            )
        )
    return points


@dataclass(frozen=True)
class PatientLevel:
    reports: tuple[PatientReport, ...]  # one per reported threshold, in the order asked
    sweep: tuple[SweepPoint, ...]
    selection: SelectionRule | None = None  # the rule the series went through

    def to_json(self) -> dict[str, Any]:
        return {
            "thresholds": [r.to_json() for r in self.reports],
            "sweep": [asdict(p) for p in self.sweep],
            "selection": asdict(self.selection) if self.selection else None,
        }


def patient_level(
    patients: Sequence[PatientScore],
    thresholds: Sequence[float] = REPORTED_THRESHOLDS,
    selection: SelectionRule | None = None,
) -> PatientLevel:
    reports = tuple(patient_report(patients, t) for t in thresholds)
    return PatientLevel(reports, tuple(sweep(patients)), selection)


@dataclass(frozen=True)
class SelectorRecall:
    """How many of the radiologists' infected slices the open-lung rule lets through."""

    infected: int  # slices labelled infected (in series the service judges)
    infected_kept: int  # of those, the ones sent to the model
    slices: int  # every labelled slice of those series
    kept: int  # of those, the ones sent to the model

    @property
    def recall(self) -> float | None:
        return self.infected_kept / self.infected if self.infected else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "recall": self.recall}


def selector_recall(
    patients: Sequence[PatientScore], labels: dict[str, dict[str, int]]
) -> SelectorRecall:
    """`labels`: per patient, file name → 1 (infected) or 0, for the labelled patients."""
    infected = infected_kept = slices = kept = 0
    for patient in patients:
        by_file = labels.get(patient.patient)
        if by_file is None:
            continue
        for s in patient.series:
            for source, was_sent in zip(s.sources, s.sent, strict=True):
                if source not in by_file:
                    continue
                slices += 1
                kept += int(was_sent)
                if by_file[source]:
                    infected += 1
                    infected_kept += int(was_sent)
    return SelectorRecall(infected, infected_kept, slices, kept)


@dataclass(frozen=True)
class ExternalReport:
    """An external data set with radiologists' slice labels (COVID-CT-MD)."""

    dataset: str  # what was evaluated, in words (counts, no patient data)
    scored: str  # "selected" (as the service) or "every" slice of a judged series
    slice_level: SliceReport | None
    selector: SelectorRecall
    patient_level: PatientLevel
    unmatched_labels: int  # labelled files that gave no slice (skipped or duplicate)

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "slices_scored": self.scored,
            "slice_level": self.slice_level.to_json() if self.slice_level else None,
            "selector": self.selector.to_json(),
            "patient_level": self.patient_level.to_json(),
            "unmatched_labels": self.unmatched_labels,
        }


@dataclass(frozen=True)
class EvaluationReport:
    created_at: str
    model: dict[str, Any] | None = None  # the card's name, version, weights source, fold
    slice_level: SliceReport | None = None  # COVID-CTset fold CSV
    patient_level: PatientLevel | None = None  # COVID-CTset raw patient folders
    covid_ct_md: ExternalReport | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"created_at": self.created_at}
        if self.model is not None:
            out["model"] = self.model
        if self.slice_level is not None:
            out["slice_level"] = self.slice_level.to_json()
        if self.patient_level is not None:
            out["patient_level"] = self.patient_level.to_json()
        if self.covid_ct_md is not None:
            out["covid_ct_md"] = self.covid_ct_md.to_json()
        return out


# --- the terminal and the model card ------------------------------------------------------


def summary(report: EvaluationReport) -> str:
    """A few lines for the terminal."""
    lines = []
    if report.slice_level:
        lines.append("slices: " + _slice_line(report.slice_level))
    if report.patient_level:
        lines += [
            f"patients t={r.threshold:g}: " + _patient_line(r) for r in report.patient_level.reports
        ]
    if external := report.covid_ct_md:
        lines.append(f"covid-ct-md: {external.dataset}")
        if external.slice_level:
            lines.append(
                f"covid-ct-md slices ({external.scored}): " + _slice_line(external.slice_level)
            )
        s = external.selector
        lines.append(
            f"covid-ct-md selector: kept {s.infected_kept} of {s.infected} infected slices "
            f"(recall {_fmt(s.recall)}); {s.kept} of {s.slices} labelled slices"
        )
        lines += [
            f"covid-ct-md patients t={r.threshold:g}: " + _patient_line(r)
            for r in external.patient_level.reports
        ]
    return "\n".join(lines)


def _slice_line(s: SliceReport) -> str:
    c = s.metrics.covid
    interval = s.auc_interval
    ci = f" ({interval.level:.0%} CI {interval.low:.4f}-{interval.high:.4f})" if interval else ""
    return (
        f"n={s.metrics.n} positive={c.tp + c.fn} accuracy={_fmt(s.metrics.overall_accuracy)} "
        f"sensitivity={_fmt(c.sensitivity)} specificity={_fmt(c.specificity)} "
        f"precision={_fmt(c.precision)} auc={_fmt(s.auc)}{ci}"
    )


def _patient_line(r: PatientReport) -> str:
    c = r.metrics.covid
    return (
        f"n={r.metrics.n} accuracy={_fmt(r.metrics.overall_accuracy)} "
        f"sensitivity={_fmt(c.sensitivity)} specificity={_fmt(c.specificity)} "
        f"indeterminate={sum(r.indeterminate)}"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def card_metrics(report: EvaluationReport, *, split: str, fold: int) -> dict[str, Any]:
    """The headline numbers the model card keeps, by data set."""
    metrics: dict[str, Any] = {}
    if s := report.slice_level:
        metrics[f"{split}_slices"] = {
            "data": f"COVID-CTset fold {fold} {split}.csv",
            "fold": fold,
            **_slice_card(s),
        }
    if p := report.patient_level:
        metrics["patients"] = {
            "data": "COVID-CTset raw patient folders",
            "thresholds": _patients_card(p),
        }
    if e := report.covid_ct_md:
        metrics["covid_ct_md"] = {
            "data": f"COVID-CT-MD (Afshar et al. 2021): {e.dataset}",
            "slices_scored": e.scored,
            "slices": _slice_card(e.slice_level) if e.slice_level else None,
            "selector_recall": e.selector.recall,
            "thresholds": _patients_card(e.patient_level),
        }
    return metrics


def _slice_card(s: SliceReport) -> dict[str, Any]:
    c = s.metrics.covid
    interval = s.auc_interval
    return {
        "n": s.metrics.n,
        "overall_accuracy": s.metrics.overall_accuracy,
        "auc": s.auc,
        "auc_interval": [interval.low, interval.high] if interval else None,
        "sensitivity": c.sensitivity,
        "specificity": c.specificity,
        "precision": c.precision,
    }


def _patients_card(level: PatientLevel) -> list[dict[str, Any]]:
    return [
        {
            "threshold": r.threshold,
            "n": r.metrics.n,
            "overall_accuracy": r.metrics.overall_accuracy,
            "sensitivity": r.metrics.covid.sensitivity,
            "specificity": r.metrics.covid.specificity,
            "indeterminate": sum(r.indeterminate),
        }
        for r in level.reports
    ]

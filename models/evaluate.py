"""Evaluation of a served artefact: slice level on a fold's CSV, patient level on raw folders.

The model is the SavedModel directory the service serves, called the way the service
calls it (app.inference.SavedModelPredictor); tests inject any `Predict` instead.

Slice level (paper section 3.1): every slice of `<split><k>.csv` is COVID when its covid
probability > 0.5. Per class c (positive = c), with TP, FN, FP, TN counted for c:
accuracy (TP + TN) / all, sensitivity TP / (TP + FN), specificity TN / (TN + FP),
precision TP / (TP + FP); overall accuracy = correct / all. COVID is the positive class of
the headline numbers; the ROC curve and its AUC come from the covid probability.

Patient level (paper Table 6): every series of `<class>/<patient>/<series>/*.tif` goes
through the service's own open-lung rule (app.selection.select_with_settings, with the
service's settings) and only the selected slices are scored; each series is judged by
app.diagnosis.judge_series, the patient by judge_patient, at t = 0 (the paper's
"threshold 1"), t = 0.1 and a sweep of t. A patient the service would call
`indeterminate` (no open lung) is counted apart: the confusion matrix and its metrics
cover the judged patients, and `indeterminate` says how many were not.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.contract import CLASS_NAMES, COVID_CLASS, ModelCard
from app.diagnosis import SLICE_COVID_CUTOFF, judge_patient, judge_series, model_slices
from app.domain import Selection, Verdict
from app.pipeline import settings_rule
from app.selection import select_open_lung
from app.settings import Settings
from models import data as datasets
from models.data import LabeledSlice, PatientFolder

logger = logging.getLogger(__name__)

# float32 [B, 512, 512, 1] stored values → covid probability float32 [B]
Predict = Callable[[np.ndarray], np.ndarray]
REPORTED_THRESHOLDS = (0.0, 0.1)
SWEEP = tuple(round(t, 2) for t in np.arange(0.0, 1.0001, 0.01))


# --- metrics -------------------------------------------------------------------------------------


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """int [2, 2]: rows the true class, columns the predicted (order of CLASS_NAMES)."""
    k = len(CLASS_NAMES)
    return np.bincount(np.asarray(labels) * k + np.asarray(predicted), minlength=k * k).reshape(
        k, k
    )


def paper_metrics(cm: np.ndarray) -> dict[str, Any]:
    """The paper's metrics from a confusion matrix; a ratio with nothing to count is None."""
    total = int(cm.sum())
    report: dict[str, Any] = {
        "n": total,
        "overall_accuracy": _ratio(int(np.trace(cm)), total),
        "confusion": {
            "rows": "true",
            "columns": "predicted",
            "classes": list(CLASS_NAMES),
            "counts": cm.tolist(),
        },
    }
    for c, name in enumerate(CLASS_NAMES):
        tp = int(cm[c, c])
        fn, fp = int(cm[c].sum()) - tp, int(cm[:, c].sum()) - tp
        tn = total - tp - fn - fp
        report[name] = {
            "tp": tp,
            "fn": fn,
            "fp": fp,
            "tn": tn,
            "accuracy": _ratio(tp + tn, total),
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "precision": _ratio(tp, tp + fp),
        }
    return report


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """ROC of `scores` for the boolean `positive`: points from the strictest cut-off, and AUC.

    Tied scores form one step, so the AUC equals the Mann-Whitney probability that a
    positive outscores a negative (ties counted half).
    """
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not (n_pos and n_neg):
        return {"fpr": [], "tpr": [], "thresholds": [], "auc": None}
    order = np.argsort(-np.asarray(scores), kind="stable")
    s, pos = np.asarray(scores)[order], positive[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tpr = np.r_[0.0, np.cumsum(pos)[last_of_tie] / n_pos]
    fpr = np.r_[0.0, np.cumsum(~pos)[last_of_tie] / n_neg]
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return {
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "thresholds": s[last_of_tie].tolist(),
        "auc": auc,
    }


# --- slice level ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SliceScores:
    paths: tuple[str, ...]
    labels: np.ndarray  # int [N], index into CLASS_NAMES
    covid_probability: np.ndarray  # float32 [N]

    @property
    def predicted(self) -> np.ndarray:
        """COVID when the covid probability > 0.5, as the service judges a slice."""
        covid = self.covid_probability > SLICE_COVID_CUTOFF
        return np.where(covid, COVID_CLASS, 1 - COVID_CLASS)


def score_slices(
    samples: Sequence[LabeledSlice], predict: Predict, *, batch_size: int = 8
) -> SliceScores:
    started = time.perf_counter()
    images = (datasets.read_slice(s.path) for s in samples)
    scores = np.concatenate(
        [np.asarray(predict(b), np.float32) for b in datasets.as_batches(images, batch_size)]
    )
    logger.info("scored %d slices in %.0f s", len(samples), time.perf_counter() - started)
    labels = np.array([s.label for s in samples])
    return SliceScores(tuple(str(s.path) for s in samples), labels, scores)


def slice_report(scores: SliceScores) -> dict[str, Any]:
    report = paper_metrics(confusion_matrix(scores.labels, scores.predicted))
    report["roc"] = roc_curve(scores.labels == COVID_CLASS, scores.covid_probability)
    report["auc"] = report["roc"]["auc"]
    return report


# --- patient level -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesScore:
    name: str
    selection: Selection
    covid_probability: np.ndarray  # float32 [n selected]; empty when the series has no lung


@dataclass(frozen=True)
class PatientScore:
    patient: str
    label: int
    series: tuple[SeriesScore, ...]


def score_patients(
    patients: Sequence[PatientFolder],
    predict: Predict,
    settings: Settings,
    *,
    batch_size: int = 8,
) -> list[PatientScore]:
    """Select each series' open-lung slices with the service's rule and score those only."""
    scored = []
    for i, patient in enumerate(patients, start=1):
        started = time.perf_counter()
        series = tuple(_score_series(s, predict, settings, batch_size) for s in patient.series)
        scored.append(PatientScore(patient.patient, patient.label, series))
        logger.info(
            "patient %d/%d: %d series, %d of %d slices selected, %.0f s",
            i,
            len(patients),
            len(series),
            sum(s.selection.n_selected for s in series),
            sum(len(s.selection.counts) for s in series),
            time.perf_counter() - started,
        )
    return scored


def _score_series(
    folder: Path, predict: Predict, settings: Settings, batch_size: int
) -> SeriesScore:
    stack = datasets.read_series(folder)
    selection = select_open_lung(stack, settings_rule(settings))
    # As the service does: a series without open lung is not sent to the model.
    selected = stack[model_slices(selection)]
    batches = datasets.as_batches(selected, batch_size)
    scores = [np.asarray(predict(b), np.float32) for b in batches]
    probability = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    return SeriesScore(folder.name, selection, probability)


def judge(patient: PatientScore, threshold: float) -> Verdict:
    """The service's verdict for this patient at threshold t."""
    verdicts = [
        judge_series(s.selection, s.covid_probability, threshold=threshold)
        for s in patient.series
    ]
    return judge_patient(verdicts, threshold=threshold)[0]


def patient_report(patients: Sequence[PatientScore], threshold: float) -> dict[str, Any]:
    verdicts = [judge(p, threshold) for p in patients]
    judged = [
        (p, v) for p, v in zip(patients, verdicts, strict=True) if v.outcome != "indeterminate"
    ]
    labels = np.array([p.label for p, _ in judged], dtype=int)
    predicted = np.array([CLASS_NAMES.index(v.outcome) for _, v in judged], dtype=int)
    report = paper_metrics(confusion_matrix(labels, predicted))
    report["threshold"] = threshold
    report["indeterminate"] = {
        name: sum(
            1
            for p, v in zip(patients, verdicts, strict=True)
            if p.label == c and v.outcome == "indeterminate"
        )
        for c, name in enumerate(CLASS_NAMES)
    }
    report["patients"] = [
        {
            "patient": p.patient,
            "label": CLASS_NAMES[p.label],
            "outcome": v.outcome,
            "k": v.k,
            "n": v.n,
            "required": v.required,
        }
        for p, v in zip(patients, verdicts, strict=True)
    ]
    return report


def sweep(
    patients: Sequence[PatientScore], thresholds: Sequence[float] = SWEEP
) -> list[dict[str, Any]]:
    rows = []
    for t in thresholds:
        r = patient_report(patients, t)
        covid = r[CLASS_NAMES[COVID_CLASS]]
        rows.append(
            {
                "threshold": t,
                "accuracy": r["overall_accuracy"],
                "sensitivity": covid["sensitivity"],
                "specificity": covid["specificity"],
                "precision": covid["precision"],
                "indeterminate": sum(r["indeterminate"].values()),
            }
        )
    return rows


# --- the model ---------------------------------------------------------------------------------


def saved_model_predictor(
    model_dir: str | Path, *, mixed_precision: bool = False
) -> tuple[Predict, ModelCard]:
    """The SavedModel as the service loads and calls it (GPU where there is one).

    With `mixed_precision`, as the service runs with COVIDCT_MIXED_PRECISION=true (bf16 on
    a CPU, float16 on a GPU): evaluate that mode before turning it on in production.
    """
    from app.inference import SavedModelPredictor, configure_devices, enable_mixed_precision

    device = configure_devices("auto")
    if mixed_precision:
        logger.warning("evaluating in reduced precision (%s)", enable_mixed_precision(device))
    predictor = SavedModelPredictor(model_dir, device)
    return predictor, predictor.card


# --- the report ---------------------------------------------------------------------------------


SELECTION_SETTINGS = {"dark_value", "roi_rows", "roi_cols", "threshold_divisor", "min_lung_pixels"}


def write_report(
    out_dir: str | Path,
    *,
    card: ModelCard | None,
    slices: SliceScores | None = None,
    patients: Sequence[PatientScore] | None = None,
    thresholds: Sequence[float] = REPORTED_THRESHOLDS,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """metrics.json, CSVs and PNG plots in `out_dir`; returns what metrics.json holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if card is not None:
        report["model"] = card.model_dump(
            mode="json", include={"name", "version", "weights_source", "fold"}
        )
    if slices is not None:
        report["slice_level"] = _write_slice_level(out, slices)
    if patients is not None:
        report["patient_level"] = _write_patient_level(out, patients, thresholds)
        if settings is not None:
            selection = settings.model_dump(mode="json", include=SELECTION_SETTINGS)
            report["patient_level"]["selection"] = selection
    _plot_roc(out / "roc.png", report)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote the evaluation report to %s", out)
    return report


def _write_slice_level(out: Path, slices: SliceScores) -> dict[str, Any]:
    report = slice_report(slices)
    columns = (slices.paths, slices.labels, slices.covid_probability, slices.predicted)
    rows = [
        {"path": p, "label": CLASS_NAMES[y], "covid_probability": float(s),
         "predicted": CLASS_NAMES[q]}
        for p, y, s, q in zip(*columns, strict=True)
    ]  # fmt: skip
    _write_csv(out / "slices.csv", rows)
    _plot_confusion(out / "confusion_slices.png", report, "slices")
    return report


def _write_patient_level(
    out: Path, patients: Sequence[PatientScore], thresholds: Sequence[float]
) -> dict[str, Any]:
    levels = {f"t={t:g}": patient_report(patients, t) for t in thresholds}
    rows = sweep(patients)
    verdicts = [
        {"threshold": r["threshold"], **row} for r in levels.values() for row in r["patients"]
    ]
    _write_csv(out / "patients.csv", verdicts)
    _write_csv(out / "series.csv", _series_rows(patients))
    _write_csv(out / "sweep.csv", rows)
    for key, r in levels.items():
        name = f"confusion_patients_{key.replace('=', '')}.png"
        _plot_confusion(out / name, r, f"patients, {key}")
    _plot_sweep(out / "threshold_sweep.png", rows)
    return {**levels, "sweep": rows}


def _series_rows(patients: Sequence[PatientScore]) -> list[dict[str, Any]]:
    return [
        {
            "patient": p.patient,
            "label": CLASS_NAMES[p.label],
            "series": s.name,
            "slices": len(s.selection.counts),
            "selected": s.selection.n_selected,
            "has_lung": s.selection.has_lung,
            "covid_slices": int(np.count_nonzero(s.covid_probability > SLICE_COVID_CUTOFF)),
            "max_dark_pixels": int(s.selection.counts.max(initial=0)),
        }
        for p in patients
        for s in p.series
    ]


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_confusion(path: Path, report: dict[str, Any], title: str) -> None:
    plt = _pyplot()
    counts = np.array(report["confusion"]["counts"])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(counts, cmap="Blues")
    for (i, j), v in np.ndenumerate(counts):
        dark = v > counts.max() / 2
        ax.text(j, i, str(v), ha="center", va="center", color="white" if dark else "black")
    ax.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = report["overall_accuracy"]
    ax.set_title(f"{title}\naccuracy {accuracy:.4f}" if accuracy is not None else title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_roc(path: Path, report: dict[str, Any]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    roc = report.get("slice_level", {}).get("roc")
    if roc and roc["auc"] is not None:
        ax.plot(roc["fpr"], roc["tpr"], label=f"slices (AUC {roc['auc']:.4f})")
    rows = report.get("patient_level", {}).get("sweep", [])
    points = [
        (1 - r["specificity"], r["sensitivity"])
        for r in rows
        if r["specificity"] is not None and r["sensitivity"] is not None
    ]
    if points:
        x, y = zip(*points, strict=True)
        ax.plot(x, y, "o-", markersize=3, label="patients (rule, t swept)")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 − specificity (covid positive)")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweep(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    t = [r["threshold"] for r in rows]
    for key in ("accuracy", "sensitivity", "specificity"):
        ax.plot(t, [np.nan if r[key] is None else r[key] for r in rows], label=key)
    for mark in REPORTED_THRESHOLDS:
        ax.axvline(mark, color="grey", linestyle=":")
    ax.set_xlabel("patient threshold t (fraction of selected slices that must be COVID)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(
    *,
    out_dir: str | Path,
    predict: Predict,
    card: ModelCard | None = None,
    slice_samples: Sequence[LabeledSlice] | None = None,
    patient_folders: Sequence[PatientFolder] | None = None,
    settings: Settings | None = None,
    thresholds: Sequence[float] = REPORTED_THRESHOLDS,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Score what is given with `predict` and write the report."""
    settings = settings or Settings()
    slices = score_slices(slice_samples, predict, batch_size=batch_size) if slice_samples else None
    patients = (
        score_patients(patient_folders, predict, settings, batch_size=batch_size)
        if patient_folders
        else None
    )
    return write_report(
        out_dir,
        card=card,
        slices=slices,
        patients=patients,
        thresholds=thresholds,
        settings=settings,
    )


# --- command line -------------------------------------------------------------------------------


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a SavedModel: slice level on a fold CSV, patient level on raw folders",
        description="Evaluate the SavedModel the service would serve. Slice level: every "
        "slice of <csv-dir>/<split><fold>.csv (the paper's per-class accuracy, sensitivity, "
        "specificity, precision and overall accuracy; ROC). Patient level: "
        "<patients>/<class>/<patient>/<series>/*.tif through the service's open-lung rule "
        "and patient threshold, at each --threshold and a sweep of t. Writes metrics.json, "
        "CSVs and PNG plots to --out. The selection settings are the service's "
        "(COVIDCT_* environment variables apply).",
    )
    p.add_argument("model", type=Path, help="SavedModel directory (what COVIDCT_MODEL_DIR names)")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    p.add_argument("--csv-dir", type=Path, help="the dataset's CSV folder (test<k>.csv …)")
    p.add_argument("--images", type=Path, help="folder the CSV file names are relative to")
    p.add_argument("--fold", type=int, default=1, help="fold 1..5 (default 1)")
    p.add_argument("--split", default="test", choices=datasets.SPLITS, help="default test")
    p.add_argument("--patients", type=Path, help="raw folders: <class>/<patient>/<series>/*.tif")
    p.add_argument(
        "--patient-list",
        type=Path,
        help="text file of patient folder names, one per line: evaluate only those (the "
        "fold's test patients; the raw folders hold every patient, training ones included)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        action="append",
        dest="thresholds",
        help="patient threshold t to report (repeatable; default 0 and 0.1)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="slices per model call (default 8)")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="also write the headline metrics into the SavedModel's model card",
    )
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="run the model as COVIDCT_MIXED_PRECISION=true does (bf16 on CPU, fp16 on GPU), "
        "to compare with the default fp32 report before turning that mode on",
    )
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    if not (args.csv_dir or args.patients):
        logger.error("give --csv-dir and --images (slice level) and/or --patients")
        return 2
    if bool(args.csv_dir) != bool(args.images):
        logger.error("--csv-dir and --images go together")
        return 2
    if args.mixed_precision and args.update_card:
        logger.error("the card's metrics describe the default fp32 mode: no --update-card here")
        return 2
    try:
        slice_samples = None
        if args.csv_dir:
            csv_path = datasets.fold_csv(args.csv_dir, args.split, args.fold)
            slice_samples = datasets.read_fold_csv(csv_path, args.images)
        patient_folders = datasets.find_patients(args.patients) if args.patients else None
        if patient_folders and args.patient_list:
            names = args.patient_list.read_text().splitlines()
            patient_folders = datasets.keep_patients(patient_folders, names)
        predict, card = saved_model_predictor(args.model, mixed_precision=args.mixed_precision)
    except (ValueError, OSError) as e:  # bad layout, or no SavedModel with a card there
        logger.error("%s", e)
        return 1
    report = evaluate(
        out_dir=args.out,
        predict=predict,
        card=card,
        slice_samples=slice_samples,
        patient_folders=patient_folders,
        thresholds=tuple(args.thresholds or REPORTED_THRESHOLDS),
        batch_size=args.batch_size,
    )
    if args.update_card:
        _update_card(args.model, card, report, args)
    print(summary(report))
    return 0


def _update_card(model_dir: Path, card: ModelCard, report: dict[str, Any], args: Any) -> None:
    from app.contract import write_card

    metrics = dict(card.metrics or {})
    if "slice_level" in report:
        s = report["slice_level"]
        metrics[f"{args.split}_slices"] = {
            "fold": args.fold,
            "n": s["n"],
            "overall_accuracy": s["overall_accuracy"],
            "auc": s["auc"],
            **{k: s["covid"][k] for k in ("sensitivity", "specificity", "precision")},
        }
    if "patient_level" in report:
        metrics["patients"] = {
            key: {
                "n": r["n"],
                "overall_accuracy": r["overall_accuracy"],
                "sensitivity": r["covid"]["sensitivity"],
                "specificity": r["covid"]["specificity"],
                "indeterminate": sum(r["indeterminate"].values()),
            }
            for key, r in report["patient_level"].items()
            if key.startswith("t=")
        }
    write_card(model_dir, card.model_copy(update={"metrics": metrics}))
    logger.info("wrote the metrics into the model card of %s", model_dir)


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    if "slice_level" in report:
        s = report["slice_level"]
        c = s["covid"]
        lines.append(
            f"slices: n={s['n']} accuracy={_fmt(s['overall_accuracy'])} "
            f"sensitivity={_fmt(c['sensitivity'])} specificity={_fmt(c['specificity'])} "
            f"precision={_fmt(c['precision'])} auc={_fmt(s['auc'])}"
        )
    for key, r in report.get("patient_level", {}).items():
        if key.startswith("t="):
            c = r["covid"]
            lines.append(
                f"patients {key}: n={r['n']} accuracy={_fmt(r['overall_accuracy'])} "
                f"sensitivity={_fmt(c['sensitivity'])} specificity={_fmt(c['specificity'])} "
                f"indeterminate={sum(r['indeterminate'].values())}"
            )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"

"""An evaluation report on disk: metrics.json, CSVs and PNG plots.

Files, in the report directory:

    <out>/metrics.json        the whole report (models.reports.EvaluationReport.to_json)
    <out>/slices.csv          COVID-CTset slice level: one row per slice
    <out>/patients.csv        patient level: one row per patient and reported threshold
    <out>/series.csv          one row per series: slices, selected, COVID slices
    <out>/sweep.csv           patient metrics over t = 0, 0.01, …, 1
    <out>/*.png               confusion_slices, confusion_patients_t0, _t0.1, roc,
                              threshold_sweep
    <out>/covid-ct-md/        the same files for COVID-CT-MD (slices.csv adds `selected`)
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from app.contract import CLASS_NAMES
from app.diagnosis import SLICE_COVID_CUTOFF
from models import plots
from models.reports import EvaluationReport, PatientLevel, SliceReport
from models.scoring import PatientScore, SliceScores

logger = logging.getLogger(__name__)

COVID_CT_MD_DIR = "covid-ct-md"


def write_report(
    out_dir: str | Path,
    report: EvaluationReport,
    *,
    slices: SliceScores | None = None,
    patients: Sequence[PatientScore] = (),
    external_slices: SliceScores | None = None,
    external_patients: Sequence[PatientScore] = (),
) -> Path:
    """Write the report and the scores behind it; returns the path of metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_level(out, report.slice_level, slices, report.patient_level, patients, "")
    if external := report.covid_ct_md:
        folder = out / COVID_CT_MD_DIR
        folder.mkdir(exist_ok=True)
        _write_level(
            folder,
            external.slice_level,
            external_slices,
            external.patient_level,
            external_patients,
            "COVID-CT-MD ",
        )
    path = out / "metrics.json"
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    logger.info("wrote the evaluation report to %s", out)
    return path


def _write_level(
    out: Path,
    slice_report: SliceReport | None,
    slices: SliceScores | None,
    level: PatientLevel | None,
    patients: Sequence[PatientScore],
    title: str,
) -> None:
    if slice_report is not None and slices is not None:
        write_csv(out / "slices.csv", slice_rows(slices))
        plots.plot_confusion(out / "confusion_slices.png", slice_report.metrics, f"{title}slices")
    if level is not None:
        rows = [{"threshold": r.threshold, **asdict(p)} for r in level.reports for p in r.patients]
        write_csv(out / "patients.csv", rows)
        write_csv(out / "series.csv", series_rows(patients))
        write_csv(out / "sweep.csv", [asdict(p) for p in level.sweep])
        for r in level.reports:
            name = f"confusion_patients_t{r.threshold:g}.png"
            plots.plot_confusion(out / name, r.metrics, f"{title}patients, t={r.threshold:g}")
        plots.plot_sweep(out / "threshold_sweep.png", level.sweep)
    if slice_report is not None or level is not None:
        sweep = level.sweep if level else ()
        plots.plot_roc(out / "roc.png", slice_report, sweep, f"{title}slices")


def slice_rows(scores: SliceScores) -> list[dict[str, Any]]:
    columns = (scores.names, scores.labels, scores.covid_probability, scores.predicted)
    rows = [
        {
            "path": name,
            "label": CLASS_NAMES[y],
            "covid_probability": float(p),
            "predicted": CLASS_NAMES[q],
        }
        for name, y, p, q in zip(*columns, strict=True)
    ]
    if scores.selected is not None:
        for row, selected in zip(rows, scores.selected, strict=True):
            row["selected"] = bool(selected)
    return rows


def series_rows(patients: Sequence[PatientScore]) -> list[dict[str, Any]]:
    return [
        {
            "patient": p.patient,
            "label": CLASS_NAMES[p.label],
            "series": s.name,
            "slices": len(s.selection.counts),
            "selected": s.selection.n_selected,
            "has_lung": s.selection.has_lung,
            "set_aside": s.set_aside or "",
            "covid_slices": int(np.count_nonzero(s.judged_probability > SLICE_COVID_CUTOFF)),
            "max_dark_pixels": int(s.selection.counts.max(initial=0)),
        }
        for p in patients
        for s in p.series
    ]


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

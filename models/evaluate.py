"""`python -m models evaluate`: the served artefact on labelled data.

Three kinds of labelled data, any of them in one run:

- COVID-CTset, slice level: every slice of `<csv-dir>/<split><k>.csv` (models.data);
- COVID-CTset, patient level (paper Table 6): raw folders `<class>/<patient>/<series>/*.tif`;
- COVID-CT-MD, external validation: DICOM series per patient with the radiologists' slice
  labels (models.covid_ct_md), read through the service's ingest: slice level against
  those labels, the open-lung rule's recall of infected slices, and patient level.

The model is called as the service calls it, and every series is judged by the service's
own rules (models.scoring): the open-lung rule is `app.selection.select_open_lung` with the
SelectionRule the service builds from its Settings (`Settings.selection_rule()`; COVIDCT_*
variables apply), and DICOM goes through `app.ingest` with the service's limits. The
metrics are in models.metrics, the typed reports in models.reports, the files and plots in
models.report_files and models.plots.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from app.contract import ModelCard, write_card
from app.selection import SelectionRule
from app.settings import Settings
from models import covid_ct_md
from models import data as datasets
from models.covid_ct_md import LabelledPatient, ReadZip
from models.data import LabeledSlice, PatientFolder
from models.report_files import write_report
from models.reports import (
    DEFAULT_BOOTSTRAP,
    REPORTED_THRESHOLDS,
    Bootstrap,
    EvaluationReport,
    ExternalReport,
    card_metrics,
    patient_level,
    selector_recall,
    slice_report,
    summary,
)
from models.scoring import (
    PatientScore,
    Predict,
    SliceScores,
    saved_model_predictor,
    score_patients,
    score_slices,
)

logger = logging.getLogger(__name__)


def ingest_reader(settings: Settings) -> ReadZip:
    """The service's ingest with its limits (Settings.ingest_limits), libraries set up as
    the service sets them up at start."""
    from app.ingest import configure_libraries, ingest_zip

    configure_libraries()
    return partial(ingest_zip, limits=settings.ingest_limits())


def evaluate(
    *,
    out_dir: str | Path,
    predict: Predict,
    card: ModelCard | None = None,
    slice_samples: Sequence[LabeledSlice] | None = None,
    patient_folders: Sequence[PatientFolder] | None = None,
    covid_ct_md_patients: Sequence[LabelledPatient] | None = None,
    settings: Settings | None = None,
    thresholds: Sequence[float] = REPORTED_THRESHOLDS,
    batch_size: int = 8,
    every_slice: bool = False,
    bootstrap: Bootstrap = DEFAULT_BOOTSTRAP,
    sheet: bool = False,
) -> EvaluationReport:
    """Score what is given with `predict`, write the report to `out_dir` and return it.
    With `sheet`, also the confidence sheets (models.explain_offline)."""
    settings = settings or Settings()
    rule = settings.selection_rule()
    slices = score_slices(slice_samples, predict, batch_size=batch_size) if slice_samples else None
    patients = (
        score_patients(patient_folders, predict, rule, batch_size=batch_size)
        if patient_folders
        else []
    )
    external, external_slices, external_patients = None, None, []
    if covid_ct_md_patients:
        external_patients = covid_ct_md.score_patients(
            covid_ct_md_patients,
            predict,
            rule,
            ingest_reader(settings),
            batch_size=batch_size,
            every_slice=every_slice,
        )
        external, external_slices = _external_report(
            covid_ct_md_patients, external_patients, rule, thresholds, every_slice, bootstrap
        )
    model = None
    if card is not None:
        model = card.model_dump(mode="json", include={"name", "version", "weights_source", "fold"})
    report = EvaluationReport(
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        model=model,
        slice_level=slice_report(slices, bootstrap) if slices else None,
        patient_level=patient_level(patients, thresholds, rule) if patients else None,
        covid_ct_md=external,
    )
    write_report(
        out_dir,
        report,
        slices=slices,
        patients=patients,
        external_slices=external_slices,
        external_patients=external_patients,
    )
    if sheet:
        from models.explain_offline import write_confidence_sheets

        reader = ingest_reader(settings) if covid_ct_md_patients else None
        cohort = covid_ct_md_patients or ()
        write_confidence_sheets(out_dir, predict, slices, external_slices, cohort, reader)
    return report


def _external_report(
    cohort: Sequence[LabelledPatient],
    scored: Sequence[PatientScore],
    rule: SelectionRule,
    thresholds: Sequence[float],
    every_slice: bool,
    bootstrap: Bootstrap,
) -> tuple[ExternalReport, SliceScores]:
    labels = {
        p.patient: p.slice_labels
        for p in cohort
        if p.slice_labels is not None and p.label is not None
    }
    slices, unmatched = covid_ct_md.labelled_slices(scored, labels)
    report = ExternalReport(
        dataset=covid_ct_md.describe(cohort),
        scored="every" if every_slice else "selected",
        slice_level=slice_report(slices, bootstrap) if slices.names else None,
        selector=selector_recall(scored, labels),
        patient_level=patient_level(scored, thresholds, rule),
        unmatched_labels=unmatched,
    )
    return report, slices


# --- command line -------------------------------------------------------------------------------


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a SavedModel: COVID-CTset slices and patients, COVID-CT-MD (external)",
        description="Evaluate the SavedModel the service would serve. Slice level: every "
        "slice of <csv-dir>/<split><fold>.csv (the paper's per-class accuracy, sensitivity, "
        "specificity, precision and overall accuracy; ROC, AUC with a bootstrap interval). "
        "Patient level: <patients>/<class>/<patient>/<series>/*.tif through the service's "
        "open-lung rule and patient threshold, at each --threshold and a sweep of t. "
        "External validation: a COVID-CT-MD folder (--covid-ct-md), DICOM through the "
        "service's ingest, against the radiologists' slice labels. Writes metrics.json, "
        "CSVs and PNG plots to --out. The selection and ingest settings are the service's "
        "(COVIDCT_* environment variables apply).",
    )
    p.add_argument("model", type=Path, help="SavedModel directory (what COVIDCT_MODEL_DIR names)")
    p.add_argument("--out", type=Path, required=True, help="report directory")
    ctset = p.add_argument_group("COVID-CTset")
    ctset.add_argument("--csv-dir", type=Path, help="the dataset's CSV folder (test<k>.csv …)")
    ctset.add_argument("--images", type=Path, help="folder the CSV file names are relative to")
    ctset.add_argument("--fold", type=int, default=1, help="fold 1..5 (default 1)")
    ctset.add_argument("--split", default="test", choices=datasets.SPLITS, help="default test")
    ctset.add_argument(
        "--patients", type=Path, help="raw folders: <class>/<patient>/<series>/*.tif"
    )
    ctset.add_argument(
        "--patient-list",
        type=Path,
        help="text file of patient folder names, one per line: evaluate only those (the "
        "fold's test patients; the raw folders hold every patient, training ones included)",
    )
    md = p.add_argument_group("COVID-CT-MD (external validation)")
    md.add_argument(
        "--covid-ct-md",
        type=Path,
        help="the dataset folder: Index.csv, Slice-level-labels.npy and the patient folders "
        "of DICOM files (or <ID>/ folders with <ID>-slice-labels.csv beside them)",
    )
    md.add_argument(
        "--slice-labels", type=Path, help="the slice label array (default: found in the folder)"
    )
    md.add_argument(
        "--every-slice",
        action="store_true",
        help="score every slice for the slice level, not only those the open-lung rule "
        "keeps (slower; the patient verdicts still read only the selected slices)",
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
        "--bootstrap",
        type=int,
        default=Bootstrap.resamples,
        help=f"resamples of the AUC's 95%% interval (default {Bootstrap.resamples})",
    )
    p.add_argument("--seed", type=int, default=Bootstrap.seed, help="bootstrap seed (default 0)")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="also write the headline metrics into the SavedModel's model card",
    )
    p.add_argument(
        "--sheet",
        action="store_true",
        help="also write confidence-sheet.png: the most and least confident slices of each "
        "class, with the model's Grad-CAM overlays where it can explain",
    )
    p.add_argument(
        "--mixed-precision",
        action="store_true",
        help="run the model as COVIDCT_MIXED_PRECISION=true does (bf16 on CPU, fp16 on GPU), "
        "to compare with the default fp32 report before turning that mode on",
    )
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    if not (args.csv_dir or args.patients or args.covid_ct_md):
        logger.error("give --csv-dir and --images (slice level), --patients and/or --covid-ct-md")
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
        external = None
        if args.covid_ct_md:
            external = covid_ct_md.read_covid_ct_md(args.covid_ct_md, labels_file=args.slice_labels)
        predict, card = saved_model_predictor(args.model, mixed_precision=args.mixed_precision)
        report = evaluate(
            out_dir=args.out,
            predict=predict,
            card=card,
            slice_samples=slice_samples,
            patient_folders=patient_folders,
            covid_ct_md_patients=external,
            thresholds=tuple(args.thresholds or REPORTED_THRESHOLDS),
            batch_size=args.batch_size,
            every_slice=args.every_slice,
            bootstrap=Bootstrap(resamples=args.bootstrap, seed=args.seed),
            sheet=args.sheet,
        )
    except (ValueError, OSError) as e:  # bad layout, or no SavedModel with a card there
        logger.error("%s", e)
        return 1
    if args.update_card:
        metrics = {**(card.metrics or {}), **card_metrics(report, split=args.split, fold=args.fold)}
        write_card(args.model, card.model_copy(update={"metrics": metrics}))
        logger.info("wrote the metrics into the model card of %s", args.model)
    print(summary(report))
    return 0

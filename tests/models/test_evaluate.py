"""models.evaluate on COVID-CTset layouts: the paper's metrics on fixtures whose predictions
are known.

The predictions are written into the slices themselves (pixel [0, 0] = 1000 × covid
probability) and read back by an injected predictor, so every number below is computed
by hand. Also: the service never imports the offline package.
"""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app.settings import Settings
from models import data as datasets
from models.evaluate import evaluate
from models.report_files import write_report
from models.reports import EvaluationReport, patient_level, patient_report, sweep
from models.scoring import judge, score_patients

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(_env_file=None)  # the service's defaults: cut-off 300, ROI, floor 500
RULE = SETTINGS.selection_rule()


def marked_slice(probability: float, *, lung: bool) -> np.ndarray:
    """A uint16 slice whose ROI is open lung (value 100 < 300) or soft tissue (1000)."""
    image = np.full((512, 512), 1000, np.uint16)
    if lung:
        image[240:340, 120:370] = 100
    image[0, 0] = round(probability * 1000)
    return image


def marker_predict(batch: np.ndarray) -> np.ndarray:
    assert batch.dtype == np.float32 and batch.shape[1:] == (512, 512, 1)
    return batch[:, 0, 0, 0] / 1000


def write_series(folder: Path, lung: list[float], no_lung: list[float] = ()) -> None:
    """Open-lung slices first, then slices without lung (never selected), IM1 … IMn."""
    folder.mkdir(parents=True)
    slices = [marked_slice(p, lung=True) for p in lung]
    slices += [marked_slice(p, lung=False) for p in no_lung]
    for i, image in enumerate(slices, start=1):
        tifffile.imwrite(folder / f"IM{i}.tif", image)


# --- slice level ----------------------------------------------------------------------------------

COVID_SCORES = [0.9, 0.8, 0.6, 0.3]  # 3 TP, 1 FN
NORMAL_SCORES = [0.1, 0.2, 0.4, 0.5, 0.7, 0.55, 0.0]  # 0.5 is not > 0.5: 5 TN, 2 FP


@pytest.fixture(scope="module")
def fold_layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fold")
    images, csv_dir = root / "data", root / "CSV"
    (images / "nested").mkdir(parents=True)
    csv_dir.mkdir()
    rows = [("covid", p) for p in COVID_SCORES] + [("normal", p) for p in NORMAL_SCORES]
    with open(csv_dir / "test1.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "class"])
        for i, (label, p) in enumerate(rows):
            # Two files sit one folder deeper than the CSV says: found by base name.
            path = images / ("nested" if i in (2, 7) else "") / f"{label}{i}.tif"
            tifffile.imwrite(path, marked_slice(p, lung=True))
            writer.writerow([f"{label}{i}.tif", label.upper() if i == 0 else label])
    return csv_dir, images


def test_slice_metrics_equal_hand_computed_values(fold_layout, tmp_path):
    csv_dir, images = fold_layout
    samples = datasets.read_fold_csv(datasets.fold_csv(csv_dir, "test", 1), images)
    report = evaluate(
        out_dir=tmp_path,
        predict=marker_predict,
        slice_samples=samples,
        settings=SETTINGS,
        batch_size=3,
    ).slice_level
    assert report is not None

    metrics = report.metrics
    assert metrics.counts == ((3, 1), (2, 5))
    assert metrics.n == 11
    assert metrics.overall_accuracy == pytest.approx(8 / 11)
    covid, normal = metrics.of(0), metrics.of(1)
    assert (covid.tp, covid.fn, covid.fp, covid.tn) == (3, 1, 2, 5)
    assert covid.accuracy == pytest.approx(8 / 11)
    assert covid.sensitivity == pytest.approx(3 / 4)
    assert covid.specificity == pytest.approx(5 / 7)
    assert covid.precision == pytest.approx(3 / 5)
    assert normal.accuracy == pytest.approx(8 / 11)
    assert normal.sensitivity == pytest.approx(5 / 7)
    assert normal.specificity == pytest.approx(3 / 4)
    assert normal.precision == pytest.approx(5 / 6)
    # covid outscores normal in 7 + 7 + 6 + 3 of the 4 × 7 pairs
    assert report.auc == pytest.approx(23 / 28)
    assert report.auc_interval is not None
    assert report.auc_interval.low <= 23 / 28 <= report.auc_interval.high

    written = json.loads((tmp_path / "metrics.json").read_text())["slice_level"]
    assert written["confusion"]["counts"] == [[3, 1], [2, 5]]
    assert written["covid"]["sensitivity"] == pytest.approx(3 / 4)
    assert written["auc"] == pytest.approx(23 / 28)
    with open(tmp_path / "slices.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["covid_probability"]) for r in rows] == pytest.approx(
        COVID_SCORES + NORMAL_SCORES
    )
    for name in ("confusion_slices.png", "roc.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- patient level --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patients_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("patients")
    # covid/P1: 1 of 10 selected slices COVID; 5 unselected slices at 0.99 must not count.
    write_series(root / "COVID" / "P1" / "SR_2", [0.9] + [0.1] * 9, no_lung=[0.99] * 5)
    # covid/P2: 1 of 20 → COVID at t = 0, normal at t = 0.1 (needs 2).
    write_series(root / "COVID" / "P2" / "SR_2", [0.8] + [0.2] * 19)
    # covid/P3: SR_2 has none, SR_3 has 3 of 10: any COVID series makes the patient COVID.
    write_series(root / "COVID" / "P3" / "SR_2", [0.3] * 10)
    write_series(root / "COVID" / "P3" / "SR_3", [0.7] * 3 + [0.2] * 7)
    # normal/N1: nothing COVID (0.5 is not > 0.5).
    write_series(root / "normal" / "N1" / "SR_2", [0.5] + [0.2] * 9)
    # normal/N2: 1 of 20 → a false positive at t = 0 only.
    write_series(root / "normal" / "N2" / "SR_2", [0.6] + [0.4] * 19)
    # normal/N3: no open lung anywhere → indeterminate, whatever the scores.
    write_series(root / "normal" / "N3" / "SR_2", [], no_lung=[0.9] * 10)
    (root / "notes").mkdir()  # not a class folder: skipped
    return root


@pytest.fixture(scope="module")
def scored(patients_root: Path):
    folders = datasets.find_patients(patients_root)
    return score_patients(folders, marker_predict, RULE, batch_size=4)


def test_only_the_open_lung_slices_are_scored(scored):
    by_name = {p.patient: p for p in scored}
    assert list(by_name) == [
        "COVID/P1",
        "COVID/P2",
        "COVID/P3",
        "normal/N1",
        "normal/N2",
        "normal/N3",
    ]
    p1 = by_name["COVID/P1"].series[0]
    assert p1.selection.mask.tolist() == [True] * 10 + [False] * 5
    assert p1.judged_probability == pytest.approx([0.9] + [0.1] * 9)
    # The slices the rule drops never reach the model: no score at all.
    assert np.isnan(p1.covid_probability[10:]).all()
    n3 = by_name["normal/N3"].series[0]
    assert not n3.selection.has_lung and n3.judged_probability.size == 0
    assert np.isnan(n3.covid_probability).all()
    assert [s.name for s in by_name["COVID/P3"].series] == ["SR_2", "SR_3"]


@pytest.mark.parametrize(
    ("threshold", "outcomes", "counts"),
    [
        (0.0, ["covid", "covid", "covid", "normal", "covid", "indeterminate"], ((3, 0), (1, 1))),
        (0.1, ["covid", "normal", "covid", "normal", "normal", "indeterminate"], ((2, 1), (0, 2))),
    ],
)
def test_patient_metrics_equal_hand_computed_values(scored, threshold, outcomes, counts):
    report = patient_report(scored, threshold)
    assert [p.outcome for p in report.patients] == outcomes
    assert report.metrics.counts == counts
    assert report.indeterminate == (0, 1)  # (covid, normal)
    assert report.metrics.n == 5
    assert report.metrics.overall_accuracy == pytest.approx(4 / 5)
    covid = report.metrics.covid
    if threshold == 0.0:
        expected = {"sensitivity": 1.0, "specificity": 1 / 2, "precision": 3 / 4}
    else:
        expected = {"sensitivity": 2 / 3, "specificity": 1.0, "precision": 1.0}
    assert {k: getattr(covid, k) for k in expected} == pytest.approx(expected)


def test_patient_verdicts_are_the_services(scored):
    p3 = next(p for p in scored if p.patient == "COVID/P3")
    verdict = judge(p3, 0.1)
    assert (verdict.outcome, verdict.k, verdict.n, verdict.required) == ("covid", 3, 10, 1)
    p2 = next(p for p in scored if p.patient == "COVID/P2")
    assert (judge(p2, 0.1).k, judge(p2, 0.1).required) == (1, 2)


def test_sweep_and_report_files(scored, tmp_path):
    points = {p.threshold: p for p in sweep(scored)}
    assert points[0.0].sensitivity == 1.0 and points[0.1].sensitivity == pytest.approx(2 / 3)
    # t = 0.2: P1 needs 2 of 10 (has 1), P3's SR_3 needs 2 (has 3).
    assert points[0.2].sensitivity == pytest.approx(1 / 3)
    assert all(p.indeterminate == 1 for p in points.values())

    level = patient_level(scored, (0.0, 0.1), RULE)
    report = EvaluationReport("2026-01-01T00:00:00Z", patient_level=level)
    write_report(tmp_path, report, patients=scored)
    written = json.loads((tmp_path / "metrics.json").read_text())["patient_level"]
    assert [r["threshold"] for r in written["thresholds"]] == [0.0, 0.1]
    assert written["thresholds"][1]["covid"]["sensitivity"] == pytest.approx(2 / 3)
    assert written["selection"]["dark_value"] == 300 and len(written["sweep"]) == 101
    for name in (
        "metrics.json",
        "patients.csv",
        "series.csv",
        "sweep.csv",
        "confusion_patients_t0.png",
        "confusion_patients_t0.1.png",
        "threshold_sweep.png",
        "roc.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "series.csv") as f:
        series = {(r["patient"], r["series"]): r for r in csv.DictReader(f)}
    assert series[("COVID/P1", "SR_2")]["selected"] == "10"
    assert series[("COVID/P1", "SR_2")]["covid_slices"] == "1"  # not the unselected 0.99s
    assert series[("normal/N3", "SR_2")]["has_lung"] == "False"
    with open(tmp_path / "patients.csv") as f:
        rows = [(r["threshold"], r["patient"], r["outcome"]) for r in csv.DictReader(f)]
    assert ("0.1", "COVID/P2", "normal") in rows and ("0.0", "COVID/P2", "covid") in rows


def test_the_selection_rule_comes_from_the_settings(patients_root, tmp_path):
    """COVIDCT_* settings reach the rule: a floor above every count makes every series
    indeterminate, where the defaults judge all but N3."""
    strict = Settings(_env_file=None, min_lung_pixels=25_001)  # the ROI holds 25,000 pixels
    folders = datasets.find_patients(patients_root)
    report = evaluate(
        out_dir=tmp_path, predict=marker_predict, patient_folders=folders, settings=strict
    ).patient_level
    assert report is not None
    assert [r.indeterminate for r in report.reports] == [(3, 3), (3, 3)]
    assert report.selection is not None and report.selection.min_lung_pixels == 25_001


# --- the boundary ---------------------------------------------------------------------------------


def test_the_service_never_imports_the_offline_package():
    offenders = []
    for path in (ROOT / "app").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "models"]
    assert offenders == []

    code = (
        "import sys, app.main; print(sorted(m for m in sys.modules if m.split('.')[0] == 'models'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_reduced_precision_metrics_never_go_into_the_card(tmp_path, caplog):
    """The card's metrics describe the default fp32 mode: refused before anything loads."""
    from models.__main__ import main

    args = ["evaluate", str(tmp_path / "no-model"), "--out", str(tmp_path / "report")]
    args += ["--patients", str(tmp_path), "--mixed-precision", "--update-card"]
    assert main(args) == 2
    assert "no --update-card here" in caplog.text
    assert not (tmp_path / "report").exists()


def test_evaluate_needs_some_data(tmp_path, caplog):
    from models.__main__ import main

    assert main(["evaluate", str(tmp_path), "--out", str(tmp_path / "report")]) == 2
    assert "--covid-ct-md" in caplog.text

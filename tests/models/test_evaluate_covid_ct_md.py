"""models evaluate --covid-ct-md: external validation on P002 and normal002.

Every expected figure is computed here from other sources: the radiologists' labels from
the shared CSV, the pixels read by pydicom alone, the open-lung rule written out, the AUC
as a pairwise count, the verdicts as k ≥ max(1, ⌈t·n⌉) by hand (tests/models/reference.py).

The first test scores slices with a fixed function of the pixels, so that it runs in
seconds and every number is exact; the second runs the real SavedModel (slow).
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.settings import Settings
from covid_ct_md_layout import build_published_layout, p002_labels
from models import covid_ct_md
from models.evaluate import evaluate
from reference import open_lung_mask, pairwise_auc, stored_values
from shared_data import NORMAL002, P002, needs_data

pytestmark = needs_data  # every test here reads the shared series

THRESHOLDS = (0.0, 0.1)


def roi_predict(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: 3 × the share of ROI pixels in [300, 1000), capped at 1."""
    roi = batch[:, 240:340, 120:370, 0]
    share = ((roi >= 300) & (roi < 1000)).mean(axis=(1, 2))
    return np.minimum(share * 3, 1).astype(np.float32)


class Expected:
    """Per file (e.g. 'P002/IM0001.dcm'): label (1 infected), selected, pixels."""

    def __init__(self) -> None:
        self.labels, self.selected, self.images = {}, {}, {}
        truth = {"P002": p002_labels(), "normal002": None}
        for folder in (P002, NORMAL002):
            files = sorted(folder.glob("*.dcm"))
            images = [stored_values(f) for f in files]
            mask = open_lung_mask(images)
            for f, image, kept in zip(files, images, mask, strict=True):
                key = f"{folder.name}/{f.name}"
                labels = truth[folder.name]
                self.labels[key] = labels[f.name] if labels else 0
                self.selected[key] = bool(kept)
                self.images[key] = image

    def slices(self, *, selected_only: bool = True) -> list[str]:
        return [k for k in self.labels if self.selected[k] or not selected_only]

    def recall(self) -> tuple[int, int]:
        infected = [k for k, v in self.labels.items() if v]
        return sum(self.selected[k] for k in infected), len(infected)


@pytest.fixture(scope="module")
def expected() -> Expected:
    return Expected()


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_published_layout(tmp_path_factory.mktemp("md") / "COVID-CT-MD")


def verdict(scores: list[float], t: float) -> tuple[str, int, int, int]:
    k, n = sum(s > 0.5 for s in scores), len(scores)
    required = max(1, math.ceil(t * n))
    return ("covid" if k >= required else "normal"), k, n, required


def check_slice_level(report: dict, keys: list[str], scores: dict[str, float], labels) -> None:
    y = np.array([labels[k] for k in keys], dtype=bool)
    s = np.array([scores[k] for k in keys])
    tp, fn = int(np.sum(y & (s > 0.5))), int(np.sum(y & (s <= 0.5)))
    fp, tn = int(np.sum(~y & (s > 0.5))), int(np.sum(~y & (s <= 0.5)))
    assert report["n"] == len(keys)
    assert report["confusion"]["counts"] == [[tp, fn], [fp, tn]]
    assert report["covid"]["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert report["covid"]["specificity"] == pytest.approx(tn / (tn + fp))
    assert report["auc"] == pytest.approx(pairwise_auc(y, s), abs=1e-12)
    interval = report["auc_interval"]
    assert interval["low"] <= report["auc"] <= interval["high"]
    assert (interval["resamples"], interval["seed"]) == (2000, 0)


def check_patient_level(report: dict, selected: list[str], scores: dict[str, float]) -> None:
    """Each patient's verdict at each t from the scores of its selected slices."""
    assert [r["threshold"] for r in report["thresholds"]] == list(THRESHOLDS)
    for level in report["thresholds"]:
        for outcome in level["patients"]:
            mine = [scores[k] for k in selected if k.startswith(outcome["patient"] + "/")]
            got = (outcome["outcome"], outcome["k"], outcome["n"], outcome["required"])
            assert got == verdict(mine, level["threshold"]), (level["threshold"], got)


def read_slices_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {row["path"]: row for row in csv.DictReader(f)}


def test_the_figures_equal_an_independent_computation(layout, expected, tmp_path):
    """--every-slice here (every labelled slice scored, the verdicts from the selected
    ones); the slow test below runs the default, selected slices only."""
    patients = covid_ct_md.read_covid_ct_md(layout)
    report = evaluate(
        out_dir=tmp_path,
        predict=roi_predict,
        covid_ct_md_patients=patients,
        settings=Settings(_env_file=None),
        batch_size=16,
        every_slice=True,
    )
    scores = {
        k: float(roi_predict(image.astype(np.float32)[None, ..., None])[0])
        for k, image in expected.images.items()
    }
    external = json.loads((tmp_path / "metrics.json").read_text())["covid_ct_md"]
    assert external["dataset"] == (
        "2 patients (1 covid, 1 normal); 1 COVID-19 with radiologists' slice labels; 0 CAP left out"
    )
    keys = expected.slices(selected_only=False)
    check_slice_level(external["slice_level"], keys, scores, expected.labels)
    assert external["unmatched_labels"] == 0

    kept, infected = expected.recall()
    assert (kept, infected) == (
        external["selector"]["infected_kept"],
        external["selector"]["infected"],
    )
    assert infected == 68 and external["selector"]["recall"] == pytest.approx(kept / infected)
    assert external["selector"]["kept"] == sum(expected.selected.values())

    rows = read_slices_csv(tmp_path / "covid-ct-md" / "slices.csv")
    assert sorted(rows) == sorted(keys)
    for key, row in rows.items():
        assert float(row["covid_probability"]) == pytest.approx(scores[key], abs=1e-6), key
        assert row["selected"] == str(expected.selected[key])

    check_patient_level(external["patient_level"], expected.slices(), scores)
    assert report.covid_ct_md is not None and report.covid_ct_md.scored == "every"
    for name in ("roc.png", "confusion_slices.png", "confusion_patients_t0.1.png"):
        assert (tmp_path / "covid-ct-md" / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.slow
def test_the_command_evaluates_a_saved_model(layout, expected, test_model_dir, tmp_path, capsys):
    import tensorflow as tf

    from app import contract
    from models.__main__ import main

    model_dir = tmp_path / "model"  # --update-card writes into it: not the shared fixture
    shutil.copytree(test_model_dir, model_dir)
    out = tmp_path / "report"
    argv = ["evaluate", str(model_dir), "--out", str(out), "--covid-ct-md", str(layout)]
    assert main([*argv, "--update-card"]) == 0
    printed = capsys.readouterr().out

    rows = read_slices_csv(out / "covid-ct-md" / "slices.csv")
    scores = {k: float(r["covid_probability"]) for k, r in rows.items()}
    # The seeded model's scores spread over 0.02-0.99 here (measured); a constant model would
    # make every check below trivially true.
    assert np.ptp(list(scores.values())) > 0.1
    keys = expected.slices()
    assert sorted(rows) == sorted(keys)

    # Each score belongs to its file: the model called directly on pydicom's pixels.
    # Measured over all 163 slices in batches of 4 against the run's batches of 8: up to
    # 1.9e-5 (oneDNN picks other kernels per batch size).
    picked = [k for k in keys if k.startswith("P002") and expected.labels[k]][:2]
    picked += [k for k in keys if k.startswith("normal002")][:2]
    batch = np.stack([expected.images[k] for k in picked]).astype(np.float32)[..., None]
    loaded = tf.saved_model.load(str(model_dir))
    direct = loaded.signatures[contract.SIGNATURE_KEY](slices=tf.constant(batch))
    np.testing.assert_allclose(
        direct[contract.OUTPUT_COVID].numpy(), [scores[k] for k in picked], atol=1e-4
    )

    external = json.loads((out / "metrics.json").read_text())["covid_ct_md"]
    check_slice_level(external["slice_level"], keys, scores, expected.labels)
    kept, infected = expected.recall()
    assert external["selector"]["recall"] == pytest.approx(kept / infected)
    check_patient_level(external["patient_level"], keys, scores)

    card = contract.read_card(model_dir).metrics["covid_ct_md"]
    assert card["slices"]["auc"] == external["slice_level"]["auc"]
    assert card["selector_recall"] == external["selector"]["recall"]
    assert [r["threshold"] for r in card["thresholds"]] == list(THRESHOLDS)
    assert f"covid-ct-md selector: kept {kept} of {infected} infected slices" in printed
    assert "covid-ct-md patients t=0.1: n=2" in printed

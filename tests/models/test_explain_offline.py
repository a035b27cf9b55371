"""`python -m models explain` and the confidence sheet of `models evaluate --sheet`
(models/explain_offline.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tifffile
from PIL import Image

from app import contract
from app.settings import Settings
from models import data as datasets
from models.__main__ import main, make_parser
from models.evaluate import evaluate
from models.explain_offline import SHEET_FILE, THUMBNAIL, most_and_least_confident
from shared_data import P002, needs_data, zip_files
from support import paper_rule, stored_values

SLICES = (30, 40, 70, 85, 100, 110)


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        size: tuple[int, int] = image.size
        return size


@needs_data
def test_explain_command_writes_overlays_sheet_and_summary(
    test_model_dir: Path, tmp_path: Path
) -> None:
    study = tmp_path / "study.zip"
    study.write_bytes(zip_files((f"P002/IM{i:04d}.dcm", P002 / f"IM{i:04d}.dcm") for i in SLICES))
    out = tmp_path / "out"
    assert (
        main(["explain", "--model", str(test_model_dir), "--study", str(study), "--out", str(out)])
        == 0
    )

    # Expected, computed here: the paper's rule on stored values read with pydicom, and the
    # SavedModel's serving signature called directly on the selected slices.
    stack = np.stack([stored_values(P002 / f"IM{i:04d}.dcm") for i in SLICES])
    _, mask = paper_rule(stack)
    loaded = tf.saved_model.load(str(test_model_dir))
    served = loaded.signatures[contract.SIGNATURE_KEY](
        **{contract.INPUT_NAME: tf.constant(stack[mask, ..., None], tf.float32)}
    )
    p = served[contract.OUTPUT_COVID].numpy()
    covid = np.flatnonzero(mask)[p > 0.5]
    assert 0 < len(covid) < len(SLICES), p  # something to explain, something not

    summary: dict[str, Any] = json.loads((out / "explain.json").read_text())
    assert summary["untrained"] is True
    (series,) = summary["series"]
    assert series["verdict"]["k"] == len(covid) and series["verdict"]["n"] == mask.sum()
    explained = series["explained"]
    assert sorted(e["index"] for e in explained) == covid.tolist()
    scores = [e["covid_probability"] for e in explained]
    assert scores == sorted(scores, reverse=True)  # highest first
    for e in explained:
        assert png_size((out / e["overlay"]).read_bytes()) == (512, 512)
        row, col = e["heatmap_peak"]
        assert 0 <= row < 512 and 0 <= col < 512
    # Six tiles in three columns, two rows, under the title line.
    width, height = png_size((out / series["sheet"]).read_bytes())
    assert width == 3 * THUMBNAIL and height > 2 * THUMBNAIL
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["explain.json", series["sheet"], *(e["overlay"] for e in explained)]
    )


def test_explain_command_fails_cleanly_without_a_model(tmp_path: Path) -> None:
    study = tmp_path / "study.zip"
    study.write_bytes(b"not a zip")
    args = ["explain", "--model", str(tmp_path / "none"), "--study", str(study)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 1


def test_most_and_least_confident_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])  # covid, covid, covid, normal, normal, normal
    p = np.array([0.9, 0.2, 0.6, 0.1, 0.7, 0.4], np.float32)
    # covid confidence p: 0.9, 0.2, 0.6; normal confidence 1 - p: 0.9, 0.3, 0.6
    assert most_and_least_confident(labels, p, 2) == [
        ("covid: most confident", [0, 2]),
        ("covid: least confident", [1, 2]),
        ("normal: most confident", [3, 5]),
        ("normal: least confident", [4, 5]),
    ]


def test_evaluate_writes_a_confidence_sheet(tmp_path: Path) -> None:
    """COVID-CTset slice level with a marker predictor (pixel [0, 0] = 1000 × probability):
    no explain signature, so the sheet shows the slices alone."""
    images, csv_dir = tmp_path / "data", tmp_path / "CSV"
    images.mkdir()
    csv_dir.mkdir()
    rows = [("covid", 0.9), ("covid", 0.3), ("normal", 0.2), ("normal", 0.8), ("normal", 0.1)]
    with open(csv_dir / "test1.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "class"])
        for i, (label, prob) in enumerate(rows):
            image = np.full((512, 512), 1000, np.uint16)
            image[0, 0] = round(prob * 1000)
            tifffile.imwrite(images / f"{label}{i}.tif", image)
            writer.writerow([f"{label}{i}.tif", label])

    def predict(batch: np.ndarray) -> np.ndarray:
        return batch[:, 0, 0, 0] / 1000

    samples = datasets.read_fold_csv(csv_dir / "test1.csv", images)
    out = tmp_path / "report"
    evaluate(
        out_dir=out,
        predict=predict,
        slice_samples=samples,
        settings=Settings(_env_file=None),  # type: ignore[call-arg]
        sheet=True,
    )
    width, height = png_size((out / SHEET_FILE).read_bytes())
    assert width == 4 * THUMBNAIL and height > 4 * THUMBNAIL  # four groups, four columns


def test_evaluate_takes_the_sheet_option() -> None:
    parse = make_parser().parse_args
    assert parse(["evaluate", "model", "--out", "report", "--sheet"]).sheet is True
    assert parse(["evaluate", "model", "--out", "report"]).sheet is False

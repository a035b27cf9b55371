"""`python -m models explain`: Grad-CAM overlays of a study, offline, as the service makes them.

    python -m models explain --model DIR --study ZIP --out DIR [--max-slices N] [--threshold t]

The zip goes through the service's ingest (`app.ingest`, default IngestLimits, libraries set
up by `configure_libraries()` as at the service's start); each series through the open-lung
rule (`app.selection`, the paper's rule) and the service's judging (`app.diagnosis`:
`model_slices`, `judge_series`); the model is the SavedModel the service would load
(`app.inference.SavedModelPredictor`), its maps from the `explain` signature
(`app.explain.saved_model_explain`), drawn by `app.overlay`. Written to OUT:

    series<k>-slice<iiii>.png   an overlay per slice judged COVID (highest scores first,
                                at most --max-slices per series; all by default)
    series<k>-sheet.png         contact sheet: every slice of the series, its score,
                                the explained ones with their overlay
    explain.json                the model, each series' verdict, each overlay's slice,
                                score and peak

Also here: the confidence sheet of `models evaluate --sheet`, the most and least
confident slices of each class.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.contract import CLASS_NAMES, COVID_CLASS, ModelCard
from app.diagnosis import SLICE_COVID_CUTOFF, PatientRule, judge_series, model_slices
from app.domain import Series
from app.explain_queue import ExplainFn, saved_model_explain
from app.overlay import blend, encode_png, heatmap_peak, lung_window
from app.selection import PAPER_RULE, select_open_lung
from models import data as datasets
from models.covid_ct_md import LabelledPatient, ReadZip
from models.report_files import COVID_CT_MD_DIR
from models.scoring import SliceScores

logger = logging.getLogger(__name__)

THUMBNAIL = 128  # pixels a side on the sheets
_LABEL_PX = 14
_SELECTED, _COVID, _OTHER = (200, 200, 200), (255, 140, 0), (60, 60, 60)  # thumbnail frames


@dataclass(frozen=True)
class SliceImage:
    """One tile of a sheet: the slice's stored values, its map where explained, a caption."""

    stored: np.ndarray  # [512, 512]
    heatmap: np.ndarray | None  # [512, 512] in [0, 1]
    caption: str
    frame: tuple[int, int, int] = _OTHER


def explain_batches(explain: ExplainFn, stack: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """heatmap float32 [n, 512, 512] of stored values [n, 512, 512], in batches."""
    maps = [
        explain(stack[a : a + batch_size].astype(np.float32)[..., None])[0]
        for a in range(0, len(stack), batch_size)
    ]
    return np.concatenate(maps) if maps else np.zeros((0, *stack.shape[1:]), np.float32)


def sheet(tiles: Sequence[SliceImage], *, columns: int, title: str) -> bytes:
    """A PNG grid of thumbnails, each framed and captioned, under a title line."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=_LABEL_PX)
    cell_h = THUMBNAIL + _LABEL_PX + 6
    rows = max(1, math.ceil(len(tiles) / columns))
    top = 2 * _LABEL_PX + 8
    canvas = Image.new("RGB", (columns * THUMBNAIL, top + rows * cell_h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), title, fill=(255, 255, 0), font=font)
    for k, tile in enumerate(tiles):
        x, y = (k % columns) * THUMBNAIL, top + (k // columns) * cell_h
        rgb = (
            blend(tile.stored, tile.heatmap)
            if tile.heatmap is not None
            else np.repeat(lung_window(tile.stored)[..., None], 3, axis=2)
        )
        thumb = Image.fromarray(rgb, "RGB").resize((THUMBNAIL - 4, THUMBNAIL - 4), Image.BILINEAR)
        draw.rectangle((x, y, x + THUMBNAIL - 1, y + THUMBNAIL - 1), outline=tile.frame, width=2)
        canvas.paste(thumb, (x + 2, y + 2))
        draw.text((x + 3, y + THUMBNAIL + 2), tile.caption, fill=(255, 255, 255), font=font)
    return encode_png(np.asarray(canvas))


def _caption(index: int, probability: float) -> str:
    return f"{index}: " + ("-" if math.isnan(probability) else f"{probability:.3f}")


def _frame(selected: bool, probability: float) -> tuple[int, int, int]:
    if probability > SLICE_COVID_CUTOFF:
        return _COVID
    return _SELECTED if selected else _OTHER


def explain_series(
    series: Series,
    predict: Callable[[np.ndarray], np.ndarray],
    explain: ExplainFn,
    out: Path,
    *,
    threshold: float,
    max_slices: int | None,
    batch_size: int = 8,
    warning: str = "",
) -> dict[str, Any]:
    """Select, score, judge and explain one series; write its overlays and sheet."""
    selection = select_open_lung(series.pixels, PAPER_RULE)
    idx = model_slices(selection, set_aside=series.set_aside)
    stack = series.pixels[idx].astype(np.float32)
    scored = [predict(stack[a : a + batch_size, ..., None]) for a in range(0, len(idx), batch_size)]
    judged = np.concatenate(scored) if scored else np.zeros(0, np.float32)
    verdict = judge_series(selection, judged, threshold=threshold, set_aside=series.set_aside)
    probability = np.full(len(series.slices), np.nan, np.float32)
    probability[idx] = judged
    covid = [int(i) for i in idx if probability[i] > SLICE_COVID_CUTOFF]
    chosen = sorted(covid, key=lambda i: (-probability[i], i))[:max_slices]
    maps = explain_batches(explain, series.pixels[chosen], batch_size)
    explained = []
    for i, heat in zip(chosen, maps, strict=True):
        name = f"series{series.index}-slice{i:04d}.png"
        (out / name).write_bytes(encode_png(blend(series.pixels[i], heat)))
        peak = heatmap_peak(heat)
        explained.append(
            {"index": i, "covid_probability": float(probability[i]), "overlay": name,
             "heatmap_peak": list(peak) if peak else None}
        )  # fmt: skip
    heat_of = dict(zip(chosen, maps, strict=True))
    tiles = [
        SliceImage(
            series.pixels[i],
            heat_of.get(i),
            _caption(i, float(probability[i])),
            _frame(bool(selection.mask[i]), float(probability[i])),
        )
        for i in range(len(series.slices))
    ]
    title = f"series {series.index}: {verdict.outcome} ({verdict.reason}) {warning}".strip()
    columns = max(1, min(12, math.ceil(math.sqrt(len(tiles)))))
    sheet_name = f"series{series.index}-sheet.png"
    (out / sheet_name).write_bytes(sheet(tiles, columns=columns, title=title))
    return {
        "series": series.index,
        "slices": len(series.slices),
        "set_aside": series.set_aside,
        "verdict": {"outcome": verdict.outcome, "k": verdict.k, "n": verdict.n,
                    "required": verdict.required, "reason": verdict.reason},
        "covid_slices": len(covid),
        "explained": explained,
        "sheet": sheet_name,
    }  # fmt: skip


def explain_study(
    model_dir: str | Path,
    archive: str | Path,
    out_dir: str | Path,
    *,
    threshold: float = PatientRule().threshold,
    max_slices: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """The whole command: returns what explain.json holds."""
    from app.inference import SavedModelPredictor, configure_devices
    from app.ingest import IngestLimits, configure_libraries, ingest_zip

    configure_libraries()
    study = ingest_zip(Path(archive).read_bytes(), IngestLimits())
    predictor = SavedModelPredictor(model_dir, configure_devices("auto"))
    explain = saved_model_explain(predictor)
    if explain is None:
        raise ValueError(
            f"the SavedModel has no usable explain signature; export it again. "
            f"Received: {model_dir}"
        )
    card: ModelCard = predictor.card
    warning = "- UNTRAINED WEIGHTS: meaningless" if card.untrained else ""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = [
        explain_series(
            s, predictor, explain, out, threshold=threshold, max_slices=max_slices,
            batch_size=batch_size, warning=warning,
        )
        for s in study.series
    ]  # fmt: skip
    summary = {
        "model": card.model_dump(mode="json", include={"name", "version", "weights_source"}),
        "untrained": card.untrained,
        "threshold": threshold,
        "series": series,
        "skipped_members": len(study.skipped),
    }
    (out / "explain.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --- the confidence sheet of `models evaluate --sheet` ----------------------------------------


def most_and_least_confident(
    labels: np.ndarray, covid_probability: np.ndarray, per_group: int
) -> list[tuple[str, list[int]]]:
    """For each class, the indices of its `per_group` most and least confident slices:
    confidence = the probability given to the slice's true class. Groups in the order
    (covid most, covid least, normal most, normal least); ties by index."""
    groups = []
    for c, name in enumerate(CLASS_NAMES):
        members = np.flatnonzero(labels == c)
        p = covid_probability[members]
        confidence = p if c == COVID_CLASS else 1 - p
        order = members[np.lexsort((members, -confidence))]  # most confident first
        groups.append((f"{name}: most confident", order[:per_group].tolist()))
        groups.append((f"{name}: least confident", order[::-1][:per_group].tolist()))
    return groups


def confidence_sheet(
    names: Sequence[str],
    labels: np.ndarray,
    covid_probability: np.ndarray,
    read: Callable[[str], np.ndarray],
    explain: ExplainFn | None,
    *,
    per_group: int = 4,
    title: str = "",
) -> bytes:
    """A sheet, one row per group of `most_and_least_confident`, each slice with its
    overlay (where `explain` is given), name and covid probability."""
    tiles: list[SliceImage] = []
    for group, members in most_and_least_confident(labels, covid_probability, per_group):
        stack = np.stack([read(names[i]) for i in members]) if members else None
        maps = explain_batches(explain, stack) if explain and stack is not None else None
        for k in range(per_group):
            if k >= len(members) or stack is None:
                blank = np.zeros((512, 512), np.float32)
                tiles.append(SliceImage(blank, None, f"{group}: none"))
                continue
            i = members[k]
            caption = f"{Path(names[i]).name[:12]} {covid_probability[i]:.2f}"
            frame = _COVID if labels[i] == COVID_CLASS else _SELECTED
            tiles.append(SliceImage(stack[k], None if maps is None else maps[k], caption, frame))
    heading = "rows: covid most/least confident, normal most/least confident. " + title
    return sheet(tiles, columns=per_group, title=heading.strip())


SHEET_FILE = "confidence-sheet.png"


def write_confidence_sheets(
    out_dir: str | Path,
    predict: object,
    slices: SliceScores | None,
    external: SliceScores | None = None,
    cohort: Sequence[LabelledPatient] = (),
    read_zip: ReadZip | None = None,
    *,
    per_group: int = 4,
) -> list[Path]:
    """`models evaluate --sheet`: the confidence sheet of the COVID-CTset slices (their
    names are TIFF paths) in OUT, and of the COVID-CT-MD slices ("<patient>/<file>", read
    through `read_zip`: the service's ingest) in OUT/covid-ct-md. With overlays where
    `predict` is a SavedModelPredictor whose model can explain."""
    explain = saved_model_explain(predict)
    note = "" if explain else "(the model cannot explain: slices without maps)"
    written = []
    out = Path(out_dir)
    if slices is not None and slices.names:
        path = out / SHEET_FILE
        png = confidence_sheet(
            slices.names, slices.labels, slices.covid_probability, datasets.read_slice,
            explain, per_group=per_group, title=f"COVID-CTset {note}",
        )  # fmt: skip
        path.write_bytes(png)
        written.append(path)
    if external is not None and external.names and read_zip is not None:
        folders = {p.patient: p.folder for p in cohort}

        def read(name: str) -> np.ndarray:
            patient, file = name.split("/", 1)
            study = read_zip(zip_files([(file, folders[patient] / file)]))
            pixels: np.ndarray = study.series[0].pixels[0]
            return pixels

        path = out / COVID_CT_MD_DIR / SHEET_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        png = confidence_sheet(
            external.names, external.labels, external.covid_probability, read, explain,
            per_group=per_group, title=f"COVID-CT-MD {note}",
        )  # fmt: skip
        path.write_bytes(png)
        written.append(path)
    return written


def zip_files(files: Sequence[tuple[str, Path]]) -> bytes:
    """(name in the archive, file) pairs as a stored zip in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, path in files:
            zf.write(path, name)
    return buf.getvalue()


# --- command line ---------------------------------------------------------------------------------


def add_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain",
        help="Grad-CAM overlays of a zipped study and a contact sheet of each series",
        description="Read the zip through the service's ingest, judge each series by the "
        "service's rules with the SavedModel, and draw the model's Grad-CAM map (its explain "
        "signature) over every slice judged COVID. Writes series<k>-slice<iiii>.png, "
        "series<k>-sheet.png and explain.json to --out.",
    )
    p.add_argument("--model", type=Path, required=True, help="SavedModel directory")
    p.add_argument("--study", type=Path, required=True, help="zip of DICOM and/or TIFF slices")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument(
        "--max-slices", type=int, default=None, help="overlays per series (default: all COVID)"
    )
    p.add_argument(
        "--threshold", type=float, default=PatientRule().threshold, help="patient threshold t"
    )
    p.add_argument("--batch-size", type=int, default=8, help="slices per model call")
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    from app.errors import CovidCTError

    try:
        summary = explain_study(
            args.model,
            args.study,
            args.out,
            threshold=args.threshold,
            max_slices=args.max_slices,
            batch_size=args.batch_size,
        )
    except (ValueError, OSError, CovidCTError) as e:
        logger.error("%s", e)
        return 1
    for s in summary["series"]:
        v = s["verdict"]
        print(
            f"series {s['series']}: {v['outcome']} ({v['reason']}); "
            f"{len(s['explained'])} overlays, sheet {args.out / s['sheet']}"
        )
    if summary["untrained"]:
        print("WARNING: the model's weights are UNTRAINED: its scores and maps are meaningless")
    return 0

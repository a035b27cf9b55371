"""Scoring with the served artefact, and judging with the service's own rules.

The model is the SavedModel directory the service serves, called the way the service calls
it (app.inference.SavedModelPredictor); tests inject any `Predict` instead. A series goes
through the service's open-lung rule (`app.selection.select_open_lung`) and only the slices
`app.diagnosis.model_slices` names are judged, by `judge_series` and `judge_patient`: the
same functions the service's pipeline calls.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.contract import COVID_CLASS, ModelCard
from app.diagnosis import SLICE_COVID_CUTOFF, judge_patient, judge_series, model_slices
from app.domain import Selection, Verdict
from app.selection import SelectionRule, select_open_lung
from models import data as datasets
from models.data import LabeledSlice, PatientFolder

logger = logging.getLogger(__name__)

# float32 [B, 512, 512, 1] stored values → covid probability float32 [B]
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SliceScores:
    """Labelled slices and their covid probability."""

    names: tuple[str, ...]  # a path or "<patient>/<file>": what the CSV lists
    labels: np.ndarray  # int [N], index into CLASS_NAMES
    covid_probability: np.ndarray  # float32 [N]
    selected: np.ndarray | None = None  # bool [N]: kept by the open-lung rule, where known

    @property
    def predicted(self) -> np.ndarray:
        """COVID when the covid probability > 0.5, as the service judges a slice."""
        covid = self.covid_probability > SLICE_COVID_CUTOFF
        return np.where(covid, COVID_CLASS, 1 - COVID_CLASS)


@dataclass(frozen=True)
class SeriesScore:
    name: str
    selection: Selection
    covid_probability: np.ndarray  # float32 [N], NaN where the slice was not scored
    set_aside: str | None = None  # why the service would not judge this series
    sources: tuple[str, ...] = ()  # each slice's file name, in series order (DICOM)

    @property
    def sent(self) -> np.ndarray:
        """bool [N]: the slices the service sends to the model (`model_slices`)."""
        mask = np.zeros(len(self.covid_probability), dtype=bool)
        mask[model_slices(self.selection, set_aside=self.set_aside)] = True
        return mask

    @property
    def judged_probability(self) -> np.ndarray:
        """The scores of the slices the service sends to the model, in series order."""
        return self.covid_probability[model_slices(self.selection, set_aside=self.set_aside)]


@dataclass(frozen=True)
class PatientScore:
    patient: str
    label: int  # index into CLASS_NAMES
    series: tuple[SeriesScore, ...]


def predict_all(images: Iterable[np.ndarray], predict: Predict, batch_size: int) -> np.ndarray:
    """[512, 512] stored-value images → covid probability float32 [N], in batches."""
    scores = [np.asarray(predict(b), np.float32) for b in datasets.as_batches(images, batch_size)]
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def score_slices(
    samples: Sequence[LabeledSlice], predict: Predict, *, batch_size: int = 8
) -> SliceScores:
    started = time.perf_counter()
    images = (datasets.read_slice(s.path) for s in samples)
    scores = predict_all(images, predict, batch_size)
    logger.info("scored %d slices in %.0f s", len(samples), time.perf_counter() - started)
    labels = np.array([s.label for s in samples])
    return SliceScores(tuple(str(s.path) for s in samples), labels, scores)


def score_series(
    name: str,
    stack: np.ndarray,
    predict: Predict,
    rule: SelectionRule,
    *,
    batch_size: int = 8,
    set_aside: str | None = None,
    sources: tuple[str, ...] = (),
    every_slice: bool = False,
) -> SeriesScore:
    """Select with the service's rule and score the slices it would score; with
    `every_slice`, every slice of a series that is not set aside (for slice-level metrics
    over all labelled slices; the verdict still reads only the selected ones)."""
    selection = select_open_lung(stack, rule)
    judged = model_slices(selection, set_aside=set_aside)
    scored = np.arange(len(stack)) if every_slice and set_aside is None else judged
    probability = np.full(len(stack), np.nan, np.float32)
    probability[scored] = predict_all(stack[scored], predict, batch_size)
    return SeriesScore(name, selection, probability, set_aside, sources)


def score_patients(
    patients: Sequence[PatientFolder],
    predict: Predict,
    rule: SelectionRule,
    *,
    batch_size: int = 8,
) -> list[PatientScore]:
    """COVID-CTset's raw TIFF folders: each series through the open-lung rule, scored."""
    scored = []
    for i, patient in enumerate(patients, start=1):
        started = time.perf_counter()
        series = tuple(
            score_series(s.name, datasets.read_series(s), predict, rule, batch_size=batch_size)
            for s in patient.series
        )
        scored.append(PatientScore(patient.patient, patient.label, series))
        log_patient(i, len(patients), series, started)
    return scored


def log_patient(i: int, total: int, series: Sequence[SeriesScore], started: float) -> None:
    logger.info(
        "patient %d/%d: %d series, %d of %d slices selected, %.0f s",
        i,
        total,
        len(series),
        sum(s.selection.n_selected for s in series),
        sum(len(s.selection.counts) for s in series),
        time.perf_counter() - started,
    )


def judge(patient: PatientScore, threshold: float) -> Verdict:
    """The service's verdict for this patient at threshold t."""
    verdicts = [
        judge_series(s.selection, s.judged_probability, threshold=threshold, set_aside=s.set_aside)
        for s in patient.series
    ]
    return judge_patient(verdicts, threshold=threshold)[0]


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

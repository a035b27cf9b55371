"""One request through the stages: ingest → select → infer → diagnose.

The route only calls `diagnose_upload`; the benchmark calls it in process too. Each stage
gets its own config (`PipelineConfig`), built once at start-up (app/settings.py).

`diagnose_upload` first reads every header and checks every limit (`open_study`: a study
that will be refused is refused before anything reaches the model), then decodes one
series at a time. Where the model runs on an accelerator, each series goes to the model as
soon as it is decoded and selected, while the next one decodes. Where it runs on this
host's CPU, the whole study is decoded first: decoding and the model would share the same
cores, so overlapping them hides nothing, and measured slower (docs/benchmarks.md). The
model reads the selected slices straight from the series (`InferenceEngine.submit` takes
indices): no series is copied between ingest and the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.diagnosis import PatientRule, judge_patient, judge_series, model_slices
from app.domain import PatientResult, Selection, Series, SeriesResult, Study
from app.inference import InferenceEngine
from app.ingest import DecodePool, IngestLimits, open_study
from app.selection import PAPER_RULE, SelectionRule, select_open_lung


@dataclass(frozen=True)
class PipelineConfig:
    """What each stage of a request applies: ingest's limits, the open-lung rule and the
    patient rule (whose threshold a request may replace)."""

    ingest: IngestLimits = field(default_factory=IngestLimits)
    selection: SelectionRule = PAPER_RULE
    patient: PatientRule = field(default_factory=PatientRule)


@dataclass
class _Scoring:
    """One series on its way through the model."""

    series: Series
    selection: Selection
    indices: np.ndarray  # the slices the model scores (model_slices)
    probabilities: asyncio.Future[np.ndarray]


async def diagnose_study(
    study: Study,
    engine: InferenceEngine,
    rule: SelectionRule,
    *,
    threshold: float,
) -> PatientResult:
    """Select, infer and judge every series of a study already ingested (all at once)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    selections = await run_in_threadpool(
        lambda: [select_open_lung(s.pixels, rule) for s in study.series]
    )
    timings["select"] = _observe("select", t0)
    t0 = time.perf_counter()
    scoring: list[_Scoring] = []
    try:
        for series, selection in zip(study.series, selections, strict=True):
            scoring.append(_submit(engine, series, selection))
        await asyncio.gather(*(s.probabilities for s in scoring))
    finally:
        _cancel(scoring)
    timings["infer"] = _observe("infer", t0)
    return _judge(scoring, threshold, timings)


async def diagnose_upload(
    archive: bytes | BinaryIO,
    engine: InferenceEngine,
    config: PipelineConfig,
    *,
    threshold: float | None = None,
    decode_pool: DecodePool | None = None,
    overlap: bool | None = None,
) -> tuple[Study, PatientResult]:
    """The whole pipeline for one uploaded zip; `threshold` None: the patient rule's.

    Ingest runs in worker threads, its pixel decoding in `decode_pool`'s processes when
    there is one. With `overlap` (None: when the model does not compute on this host's
    CPU), each series goes to the model once decoded and selected, while the next decodes;
    without, once the whole study is decoded. Timings: `ingest` and `select` add up the
    time those stages worked on this request; `infer` runs from the first series handed to
    the model to the last score, so with overlap it covers the later series' ingest."""
    t = config.patient.threshold if threshold is None else threshold
    overlap = not engine.uses_host_cpu if overlap is None else overlap
    t0 = time.perf_counter()
    ingest = await run_in_threadpool(open_study, archive, config.ingest, decode_pool)
    worked = {"ingest": time.perf_counter() - t0, "select": 0.0}
    series = ingest.series()
    scoring: list[_Scoring] = []
    waiting: list[tuple[Series, Selection]] = []  # without overlap: until all are decoded
    infer_t0 = None
    try:
        while item := await run_in_threadpool(_next_selected, series, config.selection, worked):
            if overlap:
                infer_t0 = infer_t0 or time.perf_counter()
                scoring.append(_submit(engine, *item))
            else:
                waiting.append(item)
        study = ingest.study()  # raises when no series could be built (nothing was scored)
        if waiting:
            infer_t0 = time.perf_counter()
        for item in waiting:  # one by one: a refusal cancels those already queued
            scoring.append(_submit(engine, *item))
        await asyncio.gather(*(s.probabilities for s in scoring))
    finally:
        _cancel(scoring)  # a failure (or a client gone) drops what is still queued
    timings = {stage: _record(stage, seconds) for stage, seconds in worked.items()}
    timings["infer"] = _observe("infer", infer_t0 or time.perf_counter())
    result = _judge(scoring, t, timings)
    return study, result


def _next_selected(
    series: Iterator[Series], rule: SelectionRule, worked: dict[str, float]
) -> tuple[Series, Selection] | None:
    """The next series, decoded and selected (in a worker thread), or None."""
    t0 = time.perf_counter()
    item = next(series, None)
    t1 = time.perf_counter()
    worked["ingest"] += t1 - t0
    if item is None:
        return None
    selection = select_open_lung(item.pixels, rule)
    worked["select"] += time.perf_counter() - t1
    return item, selection


def _submit(engine: InferenceEngine, series: Series, selection: Selection) -> _Scoring:
    """Queue the series' slices to score, by index. A series without open lung, or set
    aside, is not sent to the model: its verdict is indeterminate."""
    indices = model_slices(selection, set_aside=series.set_aside)
    return _Scoring(series, selection, indices, engine.submit(series.pixels, indices))


def _cancel(scoring: Sequence[_Scoring]) -> None:
    for s in scoring:
        if not s.probabilities.done():
            s.probabilities.cancel()


def _judge(
    scoring: Sequence[_Scoring], threshold: float, timings: dict[str, float]
) -> PatientResult:
    t0 = time.perf_counter()
    results = []
    for s in scoring:
        p = s.probabilities.result()
        full = np.full(len(s.series.slices), np.nan, dtype=np.float32)
        full[s.indices] = p
        verdict = judge_series(s.selection, p, threshold=threshold, set_aside=s.series.set_aside)
        results.append(SeriesResult(s.series, s.selection, full, verdict))
    verdict, best = judge_patient([r.verdict for r in results], threshold=threshold)
    timings["diagnose"] = _observe("diagnose", t0)

    metrics.SLICES_PROCESSED.inc(sum(len(s.series.slices) for s in scoring))
    metrics.SLICES_SELECTED.inc(sum(len(s.indices) for s in scoring))
    metrics.DIAGNOSES.labels(verdict.outcome).inc()
    deciding = results[best].series.index if best is not None else None
    return PatientResult(verdict, tuple(results), deciding, timings)


def _observe(stage: str, t0: float) -> float:
    return _record(stage, time.perf_counter() - t0)


def _record(stage: str, seconds: float) -> float:
    metrics.STAGE_DURATION.labels(stage).observe(seconds)
    return round(seconds * 1000, 2)

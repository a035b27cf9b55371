"""One request through the stages: ingest → select → infer → diagnose.

The route only calls `diagnose_upload`; the benchmark calls it in process too.
"""

from __future__ import annotations

import asyncio
import time
from typing import BinaryIO

import numpy as np
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.decode_pool import DecodePool
from app.diagnosis import judge_patient, judge_series, model_slices
from app.domain import PatientResult, SeriesResult, Study
from app.inference import InferenceEngine
from app.ingest import ingest_zip
from app.selection import SelectionRule, select_open_lung
from app.settings import Settings


async def diagnose_study(
    study: Study, engine: InferenceEngine, settings: Settings, *, threshold: float
) -> PatientResult:
    """Select, infer and judge every series of an ingested study."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rule = settings_rule(settings)
    selections = await run_in_threadpool(
        lambda: [select_open_lung(s.pixels, rule) for s in study.series]
    )
    timings["select"] = _observe("select", t0)

    t0 = time.perf_counter()
    # Series without open lung are not sent to the model: their verdict is indeterminate.
    indices = [
        model_slices(sel, set_aside=s.set_aside)
        for s, sel in zip(study.series, selections, strict=True)
    ]
    stacks = [s.pixels[i] for s, i in zip(study.series, indices, strict=True)]
    probs = await asyncio.gather(*(engine.predict(stack) for stack in stacks))
    timings["infer"] = _observe("infer", t0)

    t0 = time.perf_counter()
    results = []
    for series, sel, idx, p in zip(study.series, selections, indices, probs, strict=True):
        full = np.full(len(series.slices), np.nan, dtype=np.float32)
        full[idx] = p
        verdict = judge_series(sel, p, threshold=threshold, set_aside=series.set_aside)
        results.append(SeriesResult(series, sel, full, verdict))
    verdict, best = judge_patient([r.verdict for r in results], threshold=threshold)
    timings["diagnose"] = _observe("diagnose", t0)

    metrics.SLICES_PROCESSED.inc(sum(len(s.slices) for s in study.series))
    metrics.SLICES_SELECTED.inc(sum(len(p) for p in probs))
    metrics.DIAGNOSES.labels(verdict.outcome).inc()
    deciding = results[best].series.index if best is not None else None
    return PatientResult(verdict, tuple(results), deciding, timings)


async def diagnose_upload(
    archive: bytes | BinaryIO,
    engine: InferenceEngine,
    settings: Settings,
    *,
    threshold: float,
    decode_pool: DecodePool | None = None,
) -> tuple[Study, PatientResult]:
    """The whole pipeline for one uploaded zip; decoding runs in a worker thread, and its
    pixel decoding in `decode_pool`'s processes when there is one."""
    t0 = time.perf_counter()
    study = await run_in_threadpool(ingest_zip, archive, settings, decode_pool)
    decode_ms = _observe("decode", t0)
    result = await diagnose_study(study, engine, settings, threshold=threshold)
    result.timings_ms["decode"] = decode_ms
    return study, result


def _observe(stage: str, t0: float) -> float:
    seconds = time.perf_counter() - t0
    metrics.STAGE_DURATION.labels(stage).observe(seconds)
    return round(seconds * 1000, 2)


def settings_rule(settings: Settings) -> SelectionRule:  # temporary: issue 9 moves this
    return SelectionRule(
        dark_value=settings.dark_value,
        roi_rows=settings.roi_rows,
        roi_cols=settings.roi_cols,
        divisor=settings.threshold_divisor,
        min_lung_pixels=settings.min_lung_pixels,
    )

"""One request through the stages: ingest → select → infer → diagnose.

The route only calls `diagnose_upload`; the benchmark calls it in process too. Each stage
gets its own config (`PipelineConfig`), built once at start-up (app/settings.py).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.diagnosis import PatientRule, judge_patient, judge_series, model_slices
from app.domain import PatientResult, SeriesResult, Study
from app.inference import InferenceEngine
from app.ingest import DecodePool, IngestLimits, ingest_zip
from app.selection import PAPER_RULE, SelectionRule, select_open_lung


@dataclass(frozen=True)
class PipelineConfig:
    """What each stage of a request applies: ingest's limits, the open-lung rule and the
    patient rule (whose threshold a request may replace)."""

    ingest: IngestLimits = field(default_factory=IngestLimits)
    selection: SelectionRule = PAPER_RULE
    patient: PatientRule = field(default_factory=PatientRule)


async def diagnose_study(
    study: Study,
    engine: InferenceEngine,
    rule: SelectionRule,
    *,
    threshold: float,
) -> PatientResult:
    """Select, infer and judge every series of an ingested study."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
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
    config: PipelineConfig,
    *,
    threshold: float | None = None,
    decode_pool: DecodePool | None = None,
) -> tuple[Study, PatientResult]:
    """The whole pipeline for one uploaded zip; `threshold` None: the patient rule's.

    Ingest runs in a worker thread, its pixel decoding in `decode_pool`'s processes when
    there is one."""
    t = config.patient.threshold if threshold is None else threshold
    t0 = time.perf_counter()
    study = await run_in_threadpool(ingest_zip, archive, config.ingest, decode_pool)
    ingest_ms = _observe("ingest", t0)
    result = await diagnose_study(study, engine, config.selection, threshold=t)
    result.timings_ms["ingest"] = ingest_ms
    return study, result


def _observe(stage: str, t0: float) -> float:
    seconds = time.perf_counter() - t0
    metrics.STAGE_DURATION.labels(stage).observe(seconds)
    return round(seconds * 1000, 2)

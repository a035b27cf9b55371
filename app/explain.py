"""Explaining a diagnosis: Grad-CAM overlays of the slices judged COVID (docs/explain.md).

With `explain=true`, after the diagnosis, the slices judged COVID (covid probability
> 0.5), the highest scores first and at most `ExplainConfig.max_slices` per request, go
through the SavedModel's `explain` signature (app/contract.py; the map is computed in the
model, so every served model explains itself the same way) in the explain queue
(app/explain_queue.py), and come back as overlays (app/overlay.py) and the map's peak.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from app import metrics
from app.diagnosis import SLICE_COVID_CUTOFF
from app.domain import PatientResult
from app.explain_queue import ExplainQueue
from app.overlay import COLOUR_MAP, HEAT_OPACITY, LUNG_WINDOW_HU, heatmap_peak, overlay_png
from app.schemas import DiagnosisOut, ExplanationOut


@dataclass(frozen=True)
class SliceExplanation:
    """One explained slice: where it is, its score, its overlay and its map's peak."""

    series: int  # position in PatientResult.series
    index: int  # the slice's index in its series
    covid_probability: float
    overlay_png: bytes
    peak: tuple[int, int] | None  # (row, column); None: the map is zero everywhere


@dataclass(frozen=True)
class Explanations:
    slices: tuple[SliceExplanation, ...]
    covid_slices: int  # slices judged COVID over all series (explained or not)
    max_slices: int

    @property
    def empty_maps(self) -> int:
        return sum(s.peak is None for s in self.slices)


def slices_to_explain(result: PatientResult, max_slices: int) -> list[tuple[int, int]]:
    """(series position, slice index) of the slices judged COVID, highest covid probability
    first (ties: series, then slice order), at most `max_slices`."""
    judged = [
        (float(p), s, i)
        for s, r in enumerate(result.series)
        for i, p in enumerate(r.covid_probability)
        if p > SLICE_COVID_CUTOFF  # NaN (not scored) is never above
    ]
    judged.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [(s, i) for _, s, i in judged[:max_slices]]


def count_covid_slices(result: PatientResult) -> int:
    return sum(
        int(np.count_nonzero(r.covid_probability > SLICE_COVID_CUTOFF)) for r in result.series
    )


async def explain_result(queue: ExplainQueue, result: PatientResult) -> Explanations:
    """Explain a diagnosed request's COVID slices; records the stage's time in
    `result.timings_ms["explain"]` and the stage metric."""
    t0 = time.perf_counter()
    chosen = slices_to_explain(result, queue.config.max_slices)
    slices: Sequence[SliceExplanation] = ()
    if chosen:
        stack = np.stack([result.series[s].series.pixels[i] for s, i in chosen])
        heatmap, _ = await queue.explain(stack)
        slices = await run_in_threadpool(_render, result, chosen, stack, heatmap)
    seconds = time.perf_counter() - t0
    metrics.STAGE_DURATION.labels("explain").observe(seconds)
    result.timings_ms["explain"] = round(seconds * 1000, 2)
    return Explanations(tuple(slices), count_covid_slices(result), queue.config.max_slices)


def _render(
    result: PatientResult,
    chosen: Sequence[tuple[int, int]],
    stack: np.ndarray,
    heatmap: np.ndarray,
) -> list[SliceExplanation]:
    return [
        SliceExplanation(
            series=s,
            index=i,
            covid_probability=float(result.series[s].covid_probability[i]),
            overlay_png=overlay_png(stack[k], heatmap[k]),
            peak=heatmap_peak(heatmap[k]),
        )
        for k, (s, i) in enumerate(chosen)
    ]


RENDERING = (
    f"Grad-CAM of the covid class's pre-softmax score, computed by the model's explain "
    f"signature; drawn over the slice in the lung window ({LUNG_WINDOW_HU[0]}…"
    f"{LUNG_WINDOW_HU[1]} HU) in the {COLOUR_MAP} colour map, opacity {HEAT_OPACITY} × "
    "the map's value (0 where the map is 0); 512 × 512, as the series is displayed"
)


def attach(out: DiagnosisOut, explanations: Explanations) -> None:
    """Put the overlays and peaks on the answer's slices, and say what was explained."""
    for e in explanations.slices:
        target = out.series[e.series].slices[e.index]
        if target.index != e.index:  # diagnosis_out lists every slice in series order
            raise RuntimeError(f"slice {e.index} of series {e.series} is out of place")
        target.overlay_png = base64.b64encode(e.overlay_png).decode("ascii")
        target.heatmap_peak = list(e.peak) if e.peak is not None else None
    out.explanation = ExplanationOut(
        method=RENDERING,
        covid_slices=explanations.covid_slices,
        explained=len(explanations.slices),
        max_slices=explanations.max_slices,
        empty_maps=explanations.empty_maps,
    )


# The form field's description in the OpenAPI document, with the answer's measured size:
# the 70 overlays of P002's COVID slices (the untrained default model) were palette PNGs of
# 46…77 KB (median 64; app/overlay.py), 61…103 KB in base64.
EXPLAIN_FIELD = (
    "true: the slices judged COVID (the highest scores first, at most "
    "COVIDCT_EXPLAIN_MAX_SLICES, default 16) carry `overlay_png` (base64 PNG, 512 x 512: the "
    "slice in the lung window with the model's Grad-CAM map of the covid class) and "
    "`heatmap_peak`. Each overlay adds about 60-105 KB to the answer (measured on real "
    "chest CT), so up to about 1.7 MB at the default cap. Explaining runs after the "
    "diagnosis in a queue of its own; 422 explain-unsupported when the served model "
    "cannot explain"
)

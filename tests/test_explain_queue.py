"""app/explain_queue.py and app/explain.py without a model: the explain queue (batches,
bound, yielding to the diagnosis queue, failures, stop, warm-up), which slices are
explained, and the answer's fields."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from app import explain as ex
from app import explain_queue as eq
from app.contract import ModelCard
from app.domain import PatientResult, Selection, Series, SeriesResult, SliceInfo, Study, Verdict
from app.errors import QueueFullError, ShuttingDownError
from app.explain import slices_to_explain
from app.explain_queue import ExplainConfig, ExplainQueue
from app.schemas import diagnosis_out


class FakeExplain:
    """heatmap = the slice / 1000, empty where the slice is all 0; records each batch."""

    def __init__(self, fail_first: bool = False) -> None:
        self.batches: list[int] = []
        self.fail_first = fail_first
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            self.batches.append(len(batch))
            if self.fail_first and len(self.batches) == 1:
                raise RuntimeError("explain failed")
        assert batch.dtype == np.float32 and batch.shape[1:] == (8, 8, 1)
        return batch[..., 0] / 1000, batch.max(axis=(1, 2, 3)) == 0


def stacks(*sizes: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 1000, (n, 8, 8)).astype(np.uint16) for n in sizes]


def run_queue(queue: ExplainQueue, work: Callable[[], Any]) -> Any:
    queue.start()
    try:
        return asyncio.run(work())
    finally:
        queue.stop()


def test_requests_share_batches_and_get_their_own_maps() -> None:
    fake = FakeExplain()
    queue = ExplainQueue(fake, ExplainConfig(max_batch_size=3))
    a, b = stacks(4, 2)

    async def work() -> Any:
        return await asyncio.gather(queue.explain(a), queue.explain(b))

    (heat_a, empty_a), (heat_b, empty_b) = run_queue(queue, work)
    np.testing.assert_allclose(heat_a, a / 1000, rtol=1e-6)
    np.testing.assert_allclose(heat_b, b / 1000, rtol=1e-6)
    assert not empty_a.any() and not empty_b.any()
    assert sum(fake.batches) == 6 and max(fake.batches) <= 3
    assert queue.queued_slices == 0


def test_a_full_queue_refuses_at_once_and_stop_fails_what_waits() -> None:
    queue = ExplainQueue(FakeExplain(), ExplainConfig(max_queue_slices=4, retry_after_s=7))
    first, second = stacks(3, 2)  # the worker is not started: the first waits

    async def work() -> None:
        waiting = queue.submit(first)
        with pytest.raises(QueueFullError) as full:
            await queue.explain(second)
        assert full.value.retry_after_s == 7 and queue.queued_slices == 3
        queue.stop()
        with pytest.raises(ShuttingDownError):
            await waiting
        with pytest.raises(ShuttingDownError):
            await queue.explain(second)

    asyncio.run(work())


def test_a_request_larger_than_the_bound_runs_alone() -> None:
    queue = ExplainQueue(FakeExplain(), ExplainConfig(max_queue_slices=2))
    (big,) = stacks(5)
    heat, _ = run_queue(queue, lambda: queue.explain(big))
    assert heat.shape == (5, 8, 8)


def test_it_waits_while_the_diagnosis_queue_holds_slices() -> None:
    events: list[str] = []
    busy_answers = iter([3, 2, 1])  # then 0: the diagnosis queue has emptied

    def busy() -> int:
        value = next(busy_answers, 0)
        events.append(f"busy {value}")
        return value

    def explain(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        events.append("explain")
        return batch[..., 0], np.zeros(len(batch), bool)

    queue = ExplainQueue(explain, ExplainConfig(max_yield_ms=600_000), busy)
    (stack,) = stacks(2)
    run_queue(queue, lambda: queue.explain(stack))
    assert events == ["busy 3", "busy 2", "busy 1", "busy 0", "explain"]


def test_a_busy_diagnosis_queue_cannot_starve_it() -> None:
    queue = ExplainQueue(FakeExplain(), ExplainConfig(max_yield_ms=0), busy=lambda: 100)
    (stack,) = stacks(2)
    heat, _ = run_queue(queue, lambda: queue.explain(stack))
    assert heat.shape == (2, 8, 8)


def test_a_failing_batch_fails_its_request_only() -> None:
    queue = ExplainQueue(FakeExplain(fail_first=True), ExplainConfig())
    a, b = stacks(2, 2)

    async def work() -> Any:
        with pytest.raises(RuntimeError, match="explain failed"):
            await queue.explain(a)
        return await queue.explain(b)

    heat, _ = run_queue(queue, work)
    np.testing.assert_allclose(heat, b / 1000, rtol=1e-6)


def test_warm_up_explains_a_blank_slice_before_the_first_request() -> None:
    shapes: list[tuple[int, ...]] = []

    def explain(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shapes.append(batch.shape)
        return batch[..., 0], np.zeros(len(batch), bool)

    queue = ExplainQueue(explain, ExplainConfig(), warm_up=True)
    (stack,) = stacks(2)
    run_queue(queue, lambda: queue.explain(stack))
    assert shapes == [(1, 512, 512, 1), (2, 8, 8, 1)]


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="Received: 0, 8, 64"):
        ExplainConfig(max_slices=0)
    with pytest.raises(ValueError, match="max_yield_ms"):
        ExplainConfig(max_yield_ms=-1)


def test_no_explain_signature_no_queue() -> None:
    class Plain:
        device = "/CPU:0"

    assert eq.saved_model_explain(Plain()) is None
    assert eq.start_explain_queue(Plain(), ExplainConfig()) is None


def test_an_explain_signature_off_contract_is_not_used() -> None:
    tf = pytest.importorskip("tensorflow")
    spec = tf.TensorSpec([None, 512, 512, 1], tf.float32, name="slices")
    fn = tf.function(lambda slices: {"heatmap": slices[..., 0]}).get_concrete_function(spec)

    class Broken:
        explain_fn = fn

    assert eq.saved_model_explain(Broken()) is None


# --- which slices, and the answer ---------------------------------------------------------------


def series_result(index: int, probabilities: list[float]) -> SeriesResult:
    n = len(probabilities)
    pixels = np.arange(n * 64, dtype=np.uint16).reshape(n, 8, 8)
    series = Series(
        index, "tiff", f"S{index}", tuple(SliceInfo(f"S{index}/{i}.tif") for i in range(n)),
        pixels, "file name",
    )  # fmt: skip
    p = np.array(probabilities, np.float32)
    scored = ~np.isnan(p)
    selection = Selection(np.zeros(n, np.int64), 0.0, scored, True)
    k = int((p[scored] > 0.5).sum())
    verdict = Verdict("covid" if k else "normal", k, int(scored.sum()), 1, 0.1)
    return SeriesResult(series, selection, p, verdict)


def patient(*series: SeriesResult) -> PatientResult:
    return PatientResult(series[0].verdict, tuple(series), series[0].series.index)


NAN = float("nan")


def test_slices_judged_covid_highest_first_capped() -> None:
    result = patient(
        series_result(1, [0.7, NAN, 0.95, 0.5, 0.2]),  # 0.5 is not above 0.5
        series_result(2, [0.95, 0.6, NAN]),  # a tie with series 1: series order
    )
    assert slices_to_explain(result, 16) == [(0, 2), (1, 0), (0, 0), (1, 1)]
    assert slices_to_explain(result, 2) == [(0, 2), (1, 0)]
    assert ex.count_covid_slices(result) == 4
    assert slices_to_explain(patient(series_result(1, [NAN, 0.1])), 16) == []


class Heat:
    """An explain queue stand-in: a map with its peak at (row 2, column 3) of every slice,
    and an empty map for slices whose pixels are all even (none here)."""

    config = ExplainConfig(max_slices=2)

    async def explain(self, stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        heat = np.zeros(stack.shape, np.float32)
        heat[:, 2, 3] = 1.0
        return heat, np.zeros(len(stack), bool)


def test_explanations_go_onto_the_right_slices() -> None:
    result = patient(series_result(1, [0.7, 0.9]), series_result(2, [0.8, 0.1]))
    explanations = asyncio.run(ex.explain_result(Heat(), result))  # type: ignore[arg-type]
    assert [(e.series, e.index) for e in explanations.slices] == [(0, 1), (1, 0)]
    assert "explain" in result.timings_ms
    card = ModelCard(version="t", weights_source="untrained", created_at="2026-01-01")
    study = Study(tuple(r.series for r in result.series))
    out = diagnosis_out(request_id="r", patient_id="p", study=study, result=result, card=card)
    ex.attach(out, explanations)
    peaks = {(s.index, sl.index): sl.heatmap_peak for s in out.series for sl in s.slices}
    assert peaks == {(1, 0): None, (1, 1): [2, 3], (2, 0): [2, 3], (2, 1): None}
    assert out.series[0].slices[1].overlay_png and out.series[0].slices[0].overlay_png is None
    assert out.explanation is not None
    assert (out.explanation.covid_slices, out.explanation.explained) == (3, 2)
    assert out.explanation.max_slices == 2 and out.explanation.empty_maps == 0
    assert out.timings_ms["explain"] >= 0

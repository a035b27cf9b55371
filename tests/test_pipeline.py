"""The pipeline (app/pipeline.py): with the model on an accelerator, a study's series go to
the model one by one while the next decodes; on a CPU, once the whole study is decoded;
either way with the answers of each series scored on its own. A study that will be refused
reaches neither the decoder nor the model; no series is copied on its way to the model."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import app.ingest.study
from app.domain import Series, SliceInfo, Study
from app.errors import MixedSliceSizesError, QueueFullError, TooManySlicesError
from app.inference import BatchingConfig, InferenceEngine, SavedModelPredictor
from app.ingest import IngestLimits
from app.pipeline import PipelineConfig, diagnose_study, diagnose_upload
from app.selection import PAPER_RULE
from dicom_factory import synthetic_ct
from shared_data import zip_files
from support import BATCH_ATOL, ct_like_slices, paper_rule

TRANSPOSED = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # axial, rows and columns swapped


def series_files(uid: str, stack: np.ndarray, **kwargs: Any) -> list[tuple[str, bytes]]:
    """One DICOM file per slice, head → feet in stack order (z falls 2 mm a slice)."""
    return [
        (f"{uid}/{i:03d}.dcm", synthetic_ct(image, uid=uid, z=-2.0 * i, instance=i + 1, **kwargs))
        for i, image in enumerate(stack)
    ]


def fake_model(batch: np.ndarray) -> np.ndarray:
    """The slice mean, scaled into [0, 1]: a stand-in where only the engine's logic counts."""
    return (batch.reshape(len(batch), -1).mean(axis=1) / 4096).astype(np.float32)


class Recorder:
    """A predictor that records each model call's slice means, and signals the first;
    `device` as a SavedModelPredictor's ('/CPU:0', '/GPU:0')."""

    def __init__(self, inner: Any = fake_model, device: str = "/CPU:0") -> None:
        self.inner = inner
        self.device = device
        self.called = threading.Event()
        self.calls: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(batch.mean(axis=(1, 2, 3)))
        self.called.set()
        return np.asarray(self.inner(batch))


def run(coro: Any, engine: InferenceEngine) -> Any:
    engine.start()
    try:
        return asyncio.run(coro)
    finally:
        engine.stop()


# Three series of CT-like slices, stored values as they are (intercept -1024).
STACKS = [ct_like_slices(6, seed=seed)[..., 0].astype(np.uint16) for seed in (1, 2, 3)]
UIDS = ["1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.12",
        "1.2.826.0.1.3680043.8.498.13"]  # fmt: skip


def three_series_zip() -> bytes:
    return zip_files(
        f for uid, stack in zip(UIDS, STACKS, strict=True) for f in series_files(uid, stack)
    )


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "sequential"])
def test_a_multi_series_study_scores_as_each_series_alone(
    test_model_dir: Path, overlap: bool
) -> None:
    predictor = SavedModelPredictor(test_model_dir)
    engine = InferenceEngine(predictor, BatchingConfig(max_batch_size=4, max_queue_delay_ms=0))
    upload = diagnose_upload(
        three_series_zip(), engine, PipelineConfig(), threshold=0.1, overlap=overlap
    )
    study, result = run(upload, engine)
    assert [s.index for s in study.series] == [1, 2, 3]
    for stack, series_result in zip(STACKS, result.series, strict=True):
        np.testing.assert_array_equal(series_result.series.pixels, stack)
        _, mask = paper_rule(stack)  # the rule written out independently
        np.testing.assert_array_equal(series_result.selection.mask, mask)
        alone = predictor(stack[mask].astype(np.float32)[..., None])  # this series, one call
        assert np.ptp(alone) > 100 * BATCH_ATOL, "the test model must give varying scores"
        got = series_result.covid_probability
        assert np.isnan(got[~mask]).all()
        # Batches of 4 mixing series against one call per series: other kernels (BATCH_ATOL).
        np.testing.assert_allclose(got[mask], alone, atol=BATCH_ATOL)


def recording_engine(
    monkeypatch: pytest.MonkeyPatch, device: str, *, later_wait_for_model: bool
) -> tuple[InferenceEngine, Recorder, list[bool]]:
    """An engine (batches of 2) around a Recorder on `device`, and series decoding patched
    to record, as each series starts to decode, whether the model has been called yet. With
    `later_wait_for_model`, every series after the first waits (60 s at most) for the
    model's first call before it records and decodes."""
    recorder = Recorder(device=device)
    engine = InferenceEngine(recorder, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
    real = app.ingest.study.decode_series
    model_busy_before: list[bool] = []

    def decode_series(plan: Any, pool: Any) -> Any:
        if later_wait_for_model and plan.key[2] != UIDS[0]:
            model_busy_before.append(recorder.called.wait(60))
        else:
            model_busy_before.append(recorder.called.is_set())
        return real(plan, pool)

    monkeypatch.setattr(app.ingest.study, "decode_series", decode_series)
    return engine, recorder, model_busy_before


def test_on_an_accelerator_a_series_reaches_the_model_while_the_next_one_decodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Series 2 and 3 decode only once series 1 is in the model: a pipeline that decoded the
    # whole study first would wait there in vain (and record False).
    engine, _, model_busy_before = recording_engine(
        monkeypatch, "/GPU:0", later_wait_for_model=True
    )
    _, result = run(diagnose_upload(three_series_zip(), engine, PipelineConfig()), engine)
    assert model_busy_before == [False, True, True]
    assert result.timings_ms.keys() == {"ingest", "select", "infer", "diagnose"}
    for stack, series_result in zip(STACKS, result.series, strict=True):
        _, mask = paper_rule(stack)
        expected = stack[mask].mean(axis=(1, 2)) / 4096
        np.testing.assert_allclose(series_result.covid_probability[mask], expected, rtol=1e-5)


def test_on_a_cpu_the_whole_study_is_decoded_before_the_model_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine, recorder, model_busy_before = recording_engine(
        monkeypatch, "/CPU:0", later_wait_for_model=False
    )
    assert engine.uses_host_cpu
    _, result = run(diagnose_upload(three_series_zip(), engine, PipelineConfig()), engine)
    assert model_busy_before == [False, False, False] and recorder.called.is_set()
    assert [s.series.index for s in result.series] == [1, 2, 3]


def mixed_display_sizes() -> list[tuple[str, bytes]]:
    """Stored 64×32 alike, but one slice transposed: 64×32 and 32×64 once displayed."""
    image = np.full((64, 32), 1000, np.uint16)
    uid = "1.2.826.0.1.3680043.8.498.99"
    return [
        ("b/1.dcm", synthetic_ct(image, uid=uid, z=0.0, instance=1)),
        ("b/2.dcm", synthetic_ct(image, uid=uid, z=-2.0, instance=2, orientation=TRANSPOSED)),
    ]


@pytest.mark.parametrize(
    ("second", "limits", "error"),
    [
        (lambda: series_files("1.2.826.0.1.3680043.8.498.99", STACKS[1][:5]),
         {"max_slices_per_series": 4}, TooManySlicesError),
        (mixed_display_sizes, {}, MixedSliceSizesError),
    ],
    ids=["series-too-long", "mixed-display-sizes"],
)  # fmt: skip
def test_a_study_that_will_be_refused_reaches_neither_decoder_nor_model(
    monkeypatch: pytest.MonkeyPatch, second: Any, limits: dict[str, int], error: type
) -> None:
    decoded: list[object] = []
    real = app.ingest.study.decode_series
    monkeypatch.setattr(
        app.ingest.study,
        "decode_series",
        lambda plan, pool: decoded.append(plan) or real(plan, pool),
    )
    recorder = Recorder()
    engine = InferenceEngine(recorder, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
    # The first series (by SeriesInstanceUID) is fine; the second makes the study refused.
    archive = zip_files(series_files(UIDS[0], STACKS[0][:4]) + second())
    config = PipelineConfig(ingest=IngestLimits(**limits))
    with pytest.raises(error):
        run(diagnose_upload(archive, engine, config), engine)
    assert decoded == [] and recorder.calls == []


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "sequential"])
def test_a_later_series_refused_by_the_queue_withdraws_the_earlier_ones(overlap: bool) -> None:
    gate = threading.Event()

    def gated(batch: np.ndarray) -> np.ndarray:
        assert gate.wait(60), "the test never opened the gate"
        return fake_model(batch)

    recorder = Recorder(gated)
    # Room for series 1's selected slices, not for series 2's on top of them.
    first = int(paper_rule(STACKS[0])[1].sum())
    assert first >= 3
    config = BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_slices=first)
    engine = InferenceEngine(recorder, config)

    async def go() -> None:
        with pytest.raises(QueueFullError):
            await diagnose_upload(three_series_zip(), engine, PipelineConfig(), overlap=overlap)
        gate.set()
        assert len(await engine.predict(STACKS[2][:1])) == 1  # after what was withdrawn
        assert engine.queued_slices == 0

    try:
        run(go(), engine)
    finally:
        gate.set()
    # At most series 1's slice already in the model when series 2 was refused, then the
    # probe: the rest of series 1 was dropped, not scored.
    assert len(recorder.calls) <= 2


def test_the_series_is_not_copied_on_its_way_to_the_model() -> None:
    # 120 slices whose dark ROI pixels rise from 0 to all 25,000: the slices over
    # (max - min) / 1.5 are selected, a third of them (20 MB of the 63 MB series).
    n = 120
    stack = np.full((n, 512, 512), 1040, np.uint16)
    for i in range(n):
        stack[i, 240 : 240 + round(100 * i / (n - 1)), 120:370] = 100
    slices = tuple(SliceInfo(f"{i}.dcm") for i in range(n))
    series = Series(1, "dicom", "uid", slices, stack, order="test")
    selected = paper_rule(stack)[1].sum()
    assert 35 <= selected <= 45
    engine = InferenceEngine(fake_model, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))

    async def go() -> Any:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            result = await diagnose_study(Study((series,)), engine, PAPER_RULE, threshold=0.1)
            return result, tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()

    result, peak = run(go(), engine)
    assert result.series[0].verdict.n == selected
    # Besides the series: the batch buffer (2 slices, float32: 2 MB), the ROI comparison
    # (120 × 100 × 250 bools: 3 MB) and small arrays; measured 3.1 MB. A copy of the
    # selected slices alone would add their 20 MB (uint16), as float32 40 MB.
    assert peak < selected * 512 * 512 * 2 / 2, f"{peak / 1e6:.1f} MB allocated"

"""The resident SavedModel and the dynamic batcher: shared batches, order, bounds, cancellation."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from app.errors import QueueFullError, ShuttingDownError
from app.inference import BatchingConfig, InferenceEngine, SavedModelPredictor
from support import BATCH_ATOL, ct_like_slices

ROOT = Path(__file__).resolve().parents[1]
# A fresh process that serves as the service does (load_engine turns on oneDNN's frozen-
# weights cache) and prints its probabilities for the same slices, alone and batched.
SERVING_PROCESS = """
import json, sys, numpy as np
from pathlib import Path
from app.inference import BatchingConfig, ModelConfig, load_engine
engine = load_engine(ModelConfig(Path(sys.argv[1]), batching=BatchingConfig(max_batch_size=4)))
x = np.load(sys.argv[2]).astype(np.float32)[..., None]
alone = np.concatenate([engine.predictor(x[i : i + 1]) for i in range(len(x))])
print(json.dumps({"alone": alone.tolist(), "batched": engine.predictor(x).tolist()}))
"""


class RecordingPredictor:
    """Wraps a predictor and records the batch size of every model call. With a gate,
    each call first sets `called` and then waits for the gate to open."""

    def __init__(self, inner, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.card = getattr(inner, "card", None)
        self.batches: list[int] = []
        self.gate = gate
        self.called = threading.Event()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.called.set()
        if self.gate is not None:
            assert self.gate.wait(60), "the test never opened the gate"
        self.batches.append(len(batch))
        return self.inner(batch)

    async def until_called(self) -> None:
        """Return once the engine's worker is inside a model call."""
        assert await asyncio.to_thread(self.called.wait, 60), "no model call in 60 s"


def fake_model(batch: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for engine-logic tests: the slice mean, scaled into [0, 1]."""
    return (batch.reshape(len(batch), -1).mean(axis=1) / 4096).astype(np.float32)


@pytest.fixture(scope="module")
def predictor(test_model_dir: Path) -> SavedModelPredictor:
    return SavedModelPredictor(test_model_dir)


@pytest.fixture(scope="module")
def slices() -> np.ndarray:
    return ct_like_slices(6)[..., 0].astype(np.uint16)


def run_engine(engine: InferenceEngine, *stacks: np.ndarray) -> list[np.ndarray]:
    """Queue every stack, then start the engine: its worker finds all of them waiting."""

    async def go() -> list[np.ndarray]:
        requests = [asyncio.ensure_future(engine.predict(s)) for s in stacks]
        await asyncio.sleep(0)  # each request queues its slices before its first await
        assert engine.queued_slices == sum(len(s) for s in stacks)
        engine.start()
        return list(await asyncio.gather(*requests))

    try:
        return asyncio.run(go())
    finally:
        engine.stop()


def test_concurrent_requests_share_batches_and_keep_their_order(
    predictor: SavedModelPredictor, slices: np.ndarray
) -> None:
    direct = predictor(slices.astype(np.float32)[..., None])
    assert direct.std() > 0.01, "test model must give varying scores"
    recording = RecordingPredictor(predictor)
    engine = InferenceEngine(recording, BatchingConfig(max_batch_size=4, max_queue_delay_ms=0))
    a, b, c = run_engine(engine, slices[:3], slices[3:5], slices[5:])
    # Model calls of 4 and 2 slices against one of 6: other oneDNN kernels (BATCH_ATOL).
    np.testing.assert_allclose(np.concatenate([a, b, c]), direct, atol=BATCH_ATOL)
    # 6 slices from 3 requests in 2 model calls: the first batch mixes requests.
    assert recording.batches == [4, 2]


@pytest.mark.parametrize("size", [2, 3, 4, 6])
def test_single_slice_equals_batched(
    predictor: SavedModelPredictor, slices: np.ndarray, size: int
) -> None:
    x = slices.astype(np.float32)[..., None]
    alone = np.concatenate([predictor(x[i : i + 1]) for i in range(len(x))])
    batched = np.concatenate([predictor(x[a : a + size]) for a in range(0, len(x), size)])
    assert np.ptp(alone) > 100 * BATCH_ATOL, "the test model must give varying scores"
    np.testing.assert_allclose(batched, alone, atol=BATCH_ATOL)


def test_frozen_weights_mode_of_the_service_gives_the_same_probabilities(
    predictor: SavedModelPredictor, slices: np.ndarray, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", slices[:4])
    expected = predictor(slices[:4, ..., None].astype(np.float32))
    assert np.ptp(expected) > 0.05, expected
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}  # no frozen-weights setting
    out = subprocess.run(
        [sys.executable, "-c", SERVING_PROCESS, str(predictor.model_dir), str(tmp_path / "x.npy")],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=True,
    )  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(got["alone"], expected, atol=BATCH_ATOL)
    np.testing.assert_allclose(got["batched"], expected, atol=BATCH_ATOL)


def test_a_partial_batch_waits_for_more_slices(slices: np.ndarray) -> None:
    recording = RecordingPredictor(fake_model)
    # A minute's wait for a partial batch: the test ends as soon as the batch is full.
    engine = InferenceEngine(recording, BatchingConfig(max_batch_size=4, max_queue_delay_ms=60_000))

    async def go() -> None:
        first = asyncio.ensure_future(engine.predict(slices[:1]))
        await asyncio.sleep(0)  # queued: the worker now waits for 3 more slices
        assert engine.queued_slices == 1
        rest = await engine.predict(slices[1:4])
        np.testing.assert_allclose(await first, fake_model(slices[:1].astype(np.float32)))
        np.testing.assert_allclose(rest, fake_model(slices[1:4].astype(np.float32)))

    engine.start()
    try:
        asyncio.run(go())
    finally:
        engine.stop()
    assert recording.batches == [4]


def test_full_queue_refuses_with_retry_after(slices: np.ndarray) -> None:
    gate = threading.Event()
    recording = RecordingPredictor(fake_model, gate)
    config = BatchingConfig(max_batch_size=2, max_queue_slices=4, retry_after_s=7)
    engine = InferenceEngine(recording, config)

    async def go() -> None:
        first = asyncio.ensure_future(engine.predict(slices[:4]))
        await recording.until_called()  # its 4 slices fill the queue until the gate opens
        with pytest.raises(QueueFullError) as err:
            await engine.predict(slices[:1])
        assert err.value.retry_after_s == 7
        gate.set()
        assert len(await first) == 4
        assert len(await engine.predict(slices[:1])) == 1  # room again once drained

    engine.start()
    try:
        asyncio.run(go())
    finally:
        engine.stop()


def test_cancelled_request_frees_its_queue_slots(slices: np.ndarray) -> None:
    gate = threading.Event()
    recording = RecordingPredictor(fake_model, gate)
    engine = InferenceEngine(recording, BatchingConfig(max_batch_size=1, max_queue_slices=100))

    async def go() -> None:
        task = asyncio.ensure_future(engine.predict(slices))
        await recording.until_called()  # its first slice is in the model
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.set()
        result = await engine.predict(slices[:2])
        np.testing.assert_allclose(result, fake_model(slices[:2].astype(np.float32)))
        assert engine.queued_slices == 0

    engine.start()
    try:
        asyncio.run(go())
    finally:
        engine.stop()
    # At most the batch in flight when the client left was computed, not all 6 slices.
    assert sum(recording.batches) <= 1 + 2


def test_model_failure_fails_only_that_request(slices: np.ndarray) -> None:
    def flaky(batch: np.ndarray) -> np.ndarray:
        if batch.max() > 60000:
            raise RuntimeError("boom")
        return fake_model(batch)

    engine = InferenceEngine(flaky, BatchingConfig(max_batch_size=8, max_queue_delay_ms=0))
    bad = np.full((1, 512, 512), 65000, np.uint16)

    async def go() -> None:
        with pytest.raises(RuntimeError):
            await engine.predict(bad)
        assert len(await engine.predict(slices[:2])) == 2

    engine.start()
    try:
        asyncio.run(go())
    finally:
        engine.stop()


def test_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="Received"):
        BatchingConfig(max_batch_size=0)


def test_warmup_sizes_default_to_every_batch_size() -> None:
    assert BatchingConfig(max_batch_size=3).warmup_sizes == (1, 2, 3)
    assert BatchingConfig(max_batch_size=4, warmup_sizes=(8, 2, 2, 1)).warmup_sizes == (1, 2)


def test_stopping_fails_what_is_queued_with_503(slices: np.ndarray) -> None:
    gate = threading.Event()
    recording = RecordingPredictor(fake_model, gate)
    engine = InferenceEngine(recording, BatchingConfig(max_batch_size=1))

    async def go() -> None:
        queued = asyncio.ensure_future(engine.predict(slices[:3]))
        await recording.until_called()  # slice 0 in the model, slices 1 and 2 queued
        engine.stop(timeout=0)  # not waiting for the model call in progress
        with pytest.raises(ShuttingDownError):
            await queued
        with pytest.raises(ShuttingDownError):  # and no new work
            await engine.predict(slices[:1])
        assert engine.queued_slices == 0

    engine.start()
    try:
        asyncio.run(go())
    finally:
        gate.set()
        engine.stop()
    assert recording.batches == [1]  # the worker took nothing after the stop


@pytest.mark.parametrize(
    "stated", ["divided by each slice's maximum", None], ids=["disagrees", "unstated"]
)
def test_loader_refuses_a_card_that_disagrees_with_the_graph_on_preprocessing(
    test_model_dir: Path, tmp_path: Path, stated: str | None
) -> None:
    """The served graph takes raw values; a card that says otherwise, or an old card that
    says nothing (exports made when the graph divided by the slice maximum), is refused."""
    import shutil

    from app.contract import ContractError, card_path

    copy = tmp_path / "model"
    shutil.copytree(test_model_dir, copy)
    card = json.loads(card_path(copy).read_text())
    assert card["preprocessing"].startswith("none")
    if stated is None:
        del card["preprocessing"]
    else:
        card["preprocessing"] = stated
    card_path(copy).write_text(json.dumps(card))
    with pytest.raises(ContractError, match="preprocessing"):
        SavedModelPredictor(copy)


def test_slices_are_taken_by_index_in_the_order_given(slices: np.ndarray) -> None:
    engine = InferenceEngine(fake_model, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
    order = np.array([4, 0, 2])

    async def go() -> tuple[np.ndarray, np.ndarray]:
        picked = await engine.predict(slices, order)
        with pytest.raises(ValueError, match="indices"):
            await engine.predict(slices, np.array([0, 6]))
        return picked, await engine.predict(slices, np.zeros(0, np.int64))

    engine.start()
    try:
        picked, none = asyncio.run(go())
    finally:
        engine.stop()
    np.testing.assert_allclose(picked, fake_model(slices[order].astype(np.float32)))
    assert none.shape == (0,)


def test_every_batch_is_written_into_one_reused_float32_buffer(slices: np.ndarray) -> None:
    seen: list[tuple[int, str, tuple[int, ...]]] = []

    def pointer(batch: np.ndarray) -> np.ndarray:
        seen.append((batch.__array_interface__["data"][0], batch.dtype.name, batch.shape))
        return fake_model(batch)

    engine = InferenceEngine(pointer, BatchingConfig(max_batch_size=2, max_queue_delay_ms=0))
    a, b = run_engine(engine, slices[:3], slices[3:])
    np.testing.assert_allclose(np.concatenate([a, b]), fake_model(slices.astype(np.float32)))
    assert [s[2] for s in seen] == [(2, 512, 512, 1)] * 3
    assert {s[:2] for s in seen} == {(seen[0][0], "float32")}  # one buffer, every call


@pytest.mark.parametrize(
    ("device", "on_cpu"),
    [("/CPU:0", True), ("/GPU:0", False), ("/job:localhost/device:GPU:1", False), (None, True)],
)
def test_the_engine_says_whether_the_model_shares_this_hosts_cpu(
    device: str | None, on_cpu: bool
) -> None:
    predictor = RecordingPredictor(fake_model)
    if device is not None:
        predictor.device = device
    assert InferenceEngine(predictor).uses_host_cpu is on_cpu

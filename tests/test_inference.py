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

from app.errors import QueueFullError
from app.inference import InferenceEngine, SavedModelPredictor
from support import ct_like_slices

ROOT = Path(__file__).resolve().parents[1]
# A fresh process that serves as the service does (load_engine turns on oneDNN's frozen-
# weights cache) and prints its probabilities for the same slices, alone and batched.
SERVING_PROCESS = """
import json, sys, numpy as np
from app.inference import load_engine
from app.settings import Settings
engine = load_engine(Settings(_env_file=None, model_dir=sys.argv[1], max_batch_size=4))
x = np.load(sys.argv[2]).astype(np.float32)[..., None]
alone = np.concatenate([engine.predictor(x[i : i + 1]) for i in range(len(x))])
print(json.dumps({"alone": alone.tolist(), "batched": engine.predictor(x).tolist()}))
"""


class RecordingPredictor:
    """Wraps a predictor and records the batch size of every model call."""

    def __init__(self, inner, gate: threading.Event | None = None) -> None:
        self.inner = inner
        self.card = getattr(inner, "card", None)
        self.batches: list[int] = []
        self.gate = gate

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(30)
        self.batches.append(len(batch))
        return self.inner(batch)


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
    async def go() -> list[np.ndarray]:
        return list(await asyncio.gather(*(engine.predict(s) for s in stacks)))

    engine.start()
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
    engine = InferenceEngine(recording, max_batch_size=4, max_queue_delay_ms=200)
    a, b, c = run_engine(engine, slices[:3], slices[3:5], slices[5:])
    np.testing.assert_allclose(np.concatenate([a, b, c]), direct, atol=1e-5)
    # 6 slices from 3 requests in 2 model calls: the first batch mixes requests.
    assert recording.batches == [4, 2]


def test_single_slice_equals_batched(predictor: SavedModelPredictor, slices: np.ndarray) -> None:
    one = [predictor(slices[i : i + 1].astype(np.float32)[..., None])[0] for i in range(3)]
    batched = predictor(slices[:3].astype(np.float32)[..., None])
    np.testing.assert_allclose(batched, one, atol=1e-5)


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
    np.testing.assert_allclose(got["alone"], expected, atol=1e-5)
    np.testing.assert_allclose(got["batched"], expected, atol=1e-5)


def test_full_queue_refuses_with_retry_after(slices: np.ndarray) -> None:
    gate = threading.Event()
    engine = InferenceEngine(
        RecordingPredictor(fake_model, gate), max_batch_size=2, max_queue_slices=4, retry_after_s=7
    )

    async def go() -> None:
        first = asyncio.ensure_future(engine.predict(slices[:4]))
        await asyncio.sleep(0.05)
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
    engine = InferenceEngine(recording, max_batch_size=1, max_queue_slices=100)

    async def go() -> None:
        task = asyncio.ensure_future(engine.predict(slices))
        await asyncio.sleep(0.05)
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

    engine = InferenceEngine(flaky, max_batch_size=8, max_queue_delay_ms=0)
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
        InferenceEngine(fake_model, max_batch_size=0)

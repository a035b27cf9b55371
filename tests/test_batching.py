"""app/batching.py with a stand-in policy (a slice's result is ten times its value): how
requests are cut into batches and answered, the bound, cancellation, failures, stop.

Expected values are written out by hand from the requests' values; the worker is held
with threading.Event gates, never with sleeps."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram

from app.batching import BatchPolicy, Meters, Part, SliceBatcher, Wording
from app.errors import QueueFullError, ShuttingDownError

WAIT_S = 60  # an upper bound for a gate the test opens itself, never reached when it passes

Answer = np.ndarray


@dataclass(frozen=True)
class Limits:
    max_batch_size: int = 3
    max_queue_slices: int = 100
    retry_after_s: int = 5


def fresh_meters() -> Meters:
    registry = CollectorRegistry()
    return Meters(
        depth=Gauge("t_depth", "d", registry=registry),
        queue_time=Histogram("t_queue", "q", registry=registry),
        compute_time=Histogram("t_compute", "c", registry=registry),
        batch_size=Histogram("t_batch", "b", registry=registry),
    )


class Tenfold(BatchPolicy[np.ndarray, Answer]):
    """A request hands in integers [n]; each one's result is 10 × it. Records the values
    of every batch; with `gate`, the first call sets `called` and waits for the gate.
    A batch holding a negative value fails; `returns`, where given, makes the outputs."""

    name = "test-batcher"
    wording = Wording(
        stopped="stopped",
        shut_down="shut down",
        full="{queued} waiting, {adding} more, at most {limit}",
        failed="batch failed",
    )

    def __init__(
        self,
        *,
        gate: threading.Event | None = None,
        fill_wait_s: float = 0.0,
        busy: Callable[[], int] = lambda: 0,
        max_yield_s: float = 0.0,
        returns: Callable[[np.ndarray], tuple[np.ndarray, ...]] | None = None,
    ) -> None:
        self.meters = fresh_meters()
        self.batches: list[list[int]] = []
        self.called = threading.Event()
        self.gate = gate
        self.fill_wait_s = fill_wait_s
        self.max_yield_s = max_yield_s
        self._busy = busy
        self.returns = returns

    def outputs(self, payload: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
        return (np.full(size, -1, np.int64),)

    def assemble(self, parts: Sequence[Part[np.ndarray, Answer]]) -> np.ndarray:
        return np.concatenate([job.payload[a:b] for job, a, b in parts])

    def compute(self, batch: np.ndarray) -> tuple[np.ndarray, ...]:
        self.batches.append(batch.tolist())
        self.called.set()
        if self.gate is not None and len(self.batches) == 1:
            assert self.gate.wait(WAIT_S), "the test never opened the gate"
        if (batch < 0).any():
            raise RuntimeError("a negative slice")
        return self.returns(batch) if self.returns else (batch * 10,)

    def answer(self, outputs: tuple[np.ndarray, ...]) -> Answer:
        return outputs[0]

    def busy(self) -> int:
        return self._busy()

    async def until_called(self) -> None:
        assert await asyncio.to_thread(self.called.wait, WAIT_S), "no batch computed"


def values(*rows: list[int]) -> list[np.ndarray]:
    return [np.array(r, np.int64) for r in rows]


async def ask(batcher: SliceBatcher[np.ndarray, Answer], x: np.ndarray) -> Answer:
    return await asyncio.wait_for(batcher.submit(x, len(x)), WAIT_S)


def serve(
    batcher: SliceBatcher[Any, Any],
    work: Callable[[], Any],
    *,
    start: bool = True,
    release: threading.Event | None = None,
) -> Any:
    """Run `work` on an event loop, the worker started first (or by `work` itself); then
    open `release`, a gate the worker may still wait on, and stop the worker."""
    if start:
        batcher.start()
    try:
        return asyncio.run(work())
    finally:
        if release is not None:
            release.set()
        batcher.stop()


def metric(collector: Gauge | Histogram | None, suffix: str = "") -> float:
    assert collector is not None
    (family,) = collector.collect()
    (value,) = [s.value for s in family.samples if s.name == family.name + suffix]
    return value


def test_interleaved_requests_share_batches_and_get_their_own_results_in_order() -> None:
    policy = Tenfold()
    batcher = SliceBatcher(policy, Limits(max_batch_size=3))
    a, b, c = values([1, 2, 3, 4], [11, 12], [21, 22, 23, 24, 25])

    async def work() -> list[np.ndarray]:
        futures = [batcher.submit(x, len(x)) for x in (a, b, c)]  # all queued, then started
        assert batcher.queued_slices == 11
        batcher.start()
        return list(await asyncio.gather(*futures))

    got = serve(batcher, work, start=False)
    assert [r.tolist() for r in got] == [[10, 20, 30, 40], [110, 120], [210, 220, 230, 240, 250]]
    assert policy.batches == [[1, 2, 3], [4, 11, 12], [21, 22, 23], [24, 25]]
    assert batcher.queued_slices == 0
    assert metric(policy.meters.depth) == 0
    assert metric(policy.meters.batch_size, "_count") == 4
    assert metric(policy.meters.batch_size, "_sum") == 11
    assert metric(policy.meters.queue_time, "_count") == 3  # once per request
    assert metric(policy.meters.compute_time, "_count") == 4


def test_an_empty_request_is_answered_at_once() -> None:
    batcher = SliceBatcher(Tenfold(), Limits())

    async def work() -> np.ndarray:
        return await batcher.submit(np.zeros(0, np.int64), 0)

    assert serve(batcher, work).shape == (0,)


def test_a_request_that_does_not_fit_is_refused_unless_the_queue_is_empty() -> None:
    batcher = SliceBatcher(Tenfold(), Limits(max_queue_slices=4, retry_after_s=7))
    first, second, third = values([1, 2, 3], [4, 5], [6])
    big = np.arange(1, 10)

    async def work() -> None:  # the worker is not started: what is queued stays
        alone = batcher.submit(big, len(big))  # larger than the bound, but the queue is empty
        with pytest.raises(QueueFullError) as full:
            batcher.submit(first, 3)
        assert full.value.retry_after_s == 7
        assert "9 waiting, 3 more, at most 4" in str(full.value)
        alone.cancel()  # withdrawn: its slices make room at once
        waiting = batcher.submit(first, 3)
        with pytest.raises(QueueFullError):
            batcher.submit(second, 2)  # 3 + 2 > 4
        assert batcher.queued_slices == 3
        fits = batcher.submit(third, 1)  # 3 + 1 = 4
        assert batcher.queued_slices == 4
        batcher.start()
        assert (await waiting).tolist() == [10, 20, 30]
        assert (await fits).tolist() == [60]

    serve(batcher, work, start=False)


def test_a_cancelled_request_drops_its_queued_slices() -> None:
    gate = threading.Event()
    policy = Tenfold(gate=gate)
    batcher = SliceBatcher(policy, Limits(max_batch_size=2))
    a, b = values([1, 2, 3, 4, 5, 6], [7, 8])

    async def work() -> np.ndarray:
        leaving = batcher.submit(a, len(a))
        await policy.until_called()  # slices 1 and 2 are in the model, 3 to 6 queued
        staying = batcher.submit(b, len(b))
        leaving.cancel()
        gate.set()
        result = await staying
        assert batcher.queued_slices == 0
        return result

    assert serve(batcher, work).tolist() == [70, 80]
    assert policy.batches == [[1, 2], [7, 8]]  # slices 3 to 6 never computed


def test_a_request_withdrawn_while_its_batch_waits_does_not_stop_the_worker(
    caplog: Any,
) -> None:
    entered, proceed = threading.Event(), threading.Event()
    calls: list[int] = []

    def busy() -> int:  # the first time, hold the batch until the test withdraws the request
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            assert proceed.wait(WAIT_S)
        return 0

    policy = Tenfold(busy=busy, max_yield_s=WAIT_S)
    batcher = SliceBatcher(policy, Limits())
    a, b = values([1, 2], [3])

    async def work() -> np.ndarray:
        leaving = batcher.submit(a, len(a))
        assert await asyncio.to_thread(entered.wait, WAIT_S)
        leaving.cancel()
        proceed.set()  # the batch now finds no request left
        return await batcher.submit(b, len(b))

    with caplog.at_level(logging.ERROR, logger="app.batching"):
        assert serve(batcher, work).tolist() == [30]
    assert policy.batches == [[3]]
    assert caplog.records == []  # no empty batch was assembled, nothing failed


def test_a_failing_batch_fails_only_the_requests_in_it() -> None:
    policy = Tenfold()
    batcher = SliceBatcher(policy, Limits(max_batch_size=2))
    # Batches: [1, 2] then [3, -4] (fails: the first request and the second) then [5, 6].
    first, second, third = values([1, 2, 3], [-4], [5, 6])

    async def work() -> None:
        futures = [batcher.submit(x, len(x)) for x in (first, second, third)]
        batcher.start()
        done = await asyncio.gather(*futures, return_exceptions=True)
        assert [type(d) for d in done[:2]] == [RuntimeError, RuntimeError]
        assert isinstance(done[2], np.ndarray) and done[2].tolist() == [50, 60]
        assert batcher.queued_slices == 0
        assert (await batcher.submit(first[:1], 1)).tolist() == [10]  # the worker goes on

    serve(batcher, work, start=False)
    assert policy.batches == [[1, 2], [3, -4], [5, 6], [1]]


def test_outputs_without_one_row_per_slice_fail_the_batch(caplog: Any) -> None:
    policy = Tenfold(returns=lambda batch: (batch[:1] * 10,))  # one row, whatever the batch
    batcher = SliceBatcher(policy, Limits())
    (a,) = values([1, 2])

    async def work() -> None:
        with pytest.raises(ValueError, match=r"one row per slice of the batch \(2\)"):
            await batcher.submit(a, len(a))

    with caplog.at_level(logging.ERROR, logger="app.batching"):
        serve(batcher, work)
    assert [r.getMessage() for r in caplog.records] == ["batch failed"]


def test_outputs_a_request_cannot_hold_fail_that_request() -> None:
    policy = Tenfold(returns=lambda batch: (np.zeros((len(batch), 3)),))  # [n, 3], not [n]
    batcher = SliceBatcher(policy, Limits())
    (a,) = values([1, 2])

    async def work() -> None:
        with pytest.raises(ValueError):
            await batcher.submit(a, len(a))
        assert batcher.queued_slices == 0

    serve(batcher, work)


def test_stop_fails_what_is_queued_and_refuses_new_requests() -> None:
    gate = threading.Event()
    policy = Tenfold(gate=gate)
    batcher = SliceBatcher(policy, Limits(max_batch_size=1))
    a, b = values([1, 2], [3])

    async def work() -> None:
        first = batcher.submit(a, len(a))
        await policy.until_called()  # slice 1 in the model; slice 2 and the second queued
        second = batcher.submit(b, len(b))
        batcher.stop(timeout=0)  # not waiting for the batch in progress
        for future in (first, second):
            with pytest.raises(ShuttingDownError, match="shut down"):
                await asyncio.wait_for(future, WAIT_S)
        with pytest.raises(ShuttingDownError, match="stopped"):
            batcher.submit(b, len(b))
        assert batcher.queued_slices == 0

    serve(batcher, work, release=gate)
    assert policy.batches == [[1]]  # the batch in progress ran to its end, nothing after


def test_a_partial_batch_waits_for_more_slices_until_stop() -> None:
    policy = Tenfold(fill_wait_s=WAIT_S)  # the test ends long before the wait would
    batcher = SliceBatcher(policy, Limits(max_batch_size=4))
    a, b, c = values([1], [2, 3, 4], [5])

    async def work() -> None:
        first = batcher.submit(a, 1)  # the worker waits for 3 more
        assert (await batcher.submit(b, 3)).tolist() == [20, 30, 40]
        assert (await first).tolist() == [10]
        waiting = batcher.submit(c, 1)  # a partial batch again
        await asyncio.to_thread(batcher.stop)
        with pytest.raises(ShuttingDownError):
            await asyncio.wait_for(waiting, WAIT_S)

    serve(batcher, work)
    assert policy.batches == [[1, 2, 3, 4]]  # the waiting batch was never started


def test_a_batch_yields_while_busy_and_up_to_max_yield() -> None:
    answers = iter([2, 1])  # then 0
    seen: list[int] = []

    def busy() -> int:
        seen.append(next(answers, 0))
        return seen[-1]

    policy = Tenfold(busy=busy, max_yield_s=WAIT_S)
    batcher = SliceBatcher(policy, Limits())
    (a,) = values([1])
    assert serve(batcher, lambda: ask(batcher, a)).tolist() == [10]
    assert seen == [2, 1, 0]

    starved = Tenfold(busy=lambda: 5, max_yield_s=0)  # always busy: it goes anyway
    batcher = SliceBatcher(starved, Limits())
    assert serve(batcher, lambda: ask(batcher, a)).tolist() == [10]


def test_a_failing_prepare_is_logged_and_requests_are_still_served(caplog: Any) -> None:
    class Broken(Tenfold):
        def prepare(self) -> None:
            raise RuntimeError("no warm-up")

    batcher = SliceBatcher(Broken(), Limits())
    (a,) = values([1, 2])
    with caplog.at_level(logging.ERROR, logger="app.batching"):
        assert serve(batcher, lambda: ask(batcher, a)).tolist() == [10, 20]
    assert [r.getMessage() for r in caplog.records] == ["preparing the worker failed"]

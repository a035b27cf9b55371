"""Worker processes that decode DICOM pixel data for ingest (stage 1), past the GIL.

pylibjpeg holds the GIL while it decodes (~11 ms per 512×512 JPEG Lossless slice), so
threads decode one slice at a time however many requests are in progress. Processes
decode in parallel. They are spawned (never forked: the parent runs TensorFlow's threads)
on first use, and import ingest but never TensorFlow.

A worker that dies (a decoder crashing on hostile data) breaks the whole pool: every
request then waiting on it gets `None` from `decode`, decodes its own frames in its own
thread instead, and the next call starts a fresh pool. No request fails for another's.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

logger = logging.getLogger(__name__)


class DecodePool:
    """A lazily started, self-healing process pool for per-frame decode tasks."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker. Received: {workers}")
        self.workers = workers
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def decode(
        self, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]
    ) -> list[Any | BaseException] | None:
        """fn(*task) for every task, in order; a task's exception stands in its place.

        None when the pool broke meanwhile: the caller decodes in its own thread instead.
        """
        executor = self._running()
        try:
            futures = [executor.submit(fn, *task) for task in tasks]
            return [_outcome(f) for f in futures]
        except BrokenProcessPool:
            logger.error("a decode worker died; this request decodes in its own thread")
            self._discard(executor)
            return None

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _running(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn")
                )
            return self._executor

    def _discard(self, executor: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is executor:
                self._executor = None
        executor.shutdown(wait=False, cancel_futures=True)


def _outcome(future: Future[Any]) -> Any | BaseException:
    try:
        return future.result()
    except BrokenProcessPool:
        raise
    except Exception as e:  # the task's own failure (corrupt data): the caller skips it
        return e

"""Worker processes that decode DICOM pixel data for ingest, past the GIL.

pylibjpeg holds the GIL while it decodes (~11 ms per 512×512 JPEG Lossless slice), so
threads decode one slice at a time however many requests are in progress. Processes
decode in parallel. They are spawned (never forked: the parent runs TensorFlow's threads)
on first use, configure the libraries (`configure_libraries`) and import ingest, never
TensorFlow.

A worker that dies (a decoder crashing on hostile data) breaks the whole pool: every
request then waiting on it gets DecodePoolBroken, decodes its remaining frames in its own
thread instead, and the next call starts a fresh pool. No request fails for another's.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from app.ingest.libraries import configure_libraries

logger = logging.getLogger(__name__)


class DecodePoolBroken(RuntimeError):
    """A decode worker died: decode the rest in this thread."""


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
    ) -> Iterator[Any | BaseException]:
        """fn(*task) for every task, yielded in order as each is ready; a task's exception
        stands in its place. Raises DecodePoolBroken when the pool broke meanwhile.

        Results are handed over one by one, so a caller that stores each and drops it
        holds one decoded slice at a time, not the whole series twice.
        """
        executor = self._running()
        futures: list[Future[Any]] = []
        try:
            futures = [executor.submit(fn, *task) for task in reversed(tasks)]
            while futures:
                yield _outcome(futures.pop())
        except BrokenProcessPool:
            logger.error("a decode worker died; the requests waiting on it decode in-thread")
            self._discard(executor)
            raise DecodePoolBroken from None
        finally:  # a caller that stops early leaves nothing queued behind it
            for future in futures:
                future.cancel()

    def shutdown(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _running(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.workers,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=configure_libraries,
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

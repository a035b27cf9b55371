"""Worker processes that decode DICOM pixel data for ingest, past the GIL.

pylibjpeg holds the GIL while it decodes (~9 ms per 512×512 JPEG Lossless slice), so
threads decode one slice at a time however many requests are in progress. Processes
decode in parallel. They are spawned (never forked: the parent runs TensorFlow's threads)
on first use, configure the libraries (`configure_libraries`) and import ingest, never
TensorFlow.

By default the pool has one worker per core this process may use (`usable_cores`: its CPU
affinity and its cgroup's CPU quota, not the host's core count), at most
`MAX_AUTO_WORKERS`. Each call keeps at most two tasks per worker submitted ahead of what
its caller has taken, in order: results reach the caller as soon as they are ready, a
caller holds a handful of decoded slices beside its series, not a second copy of it, and
concurrent requests take turns instead of queueing behind each other's whole series.

A worker that dies (a decoder crashing on hostile data) breaks the whole pool: every
request then waiting on it gets DecodePoolBroken, decodes its remaining frames in its own
thread instead, and the next call starts a fresh pool. No request fails for another's.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Any

from app.ingest.libraries import configure_libraries

logger = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 64  # the default pool's size never exceeds this (COVIDCT_DECODE_WORKERS may)
TASKS_AHEAD_PER_WORKER = 2  # tasks one call keeps submitted ahead of its caller, per worker
_PROC_SELF = Path("/proc/self")


def cpu_quota(proc_self: Path = _PROC_SELF) -> float | None:
    """CPUs this process's cgroup may use by its CFS quota (cgroup v2 `cpu.max`, v1
    `cpu.cfs_quota_us` / `cpu.cfs_period_us`), the smallest along the cgroup's path up to
    its hierarchy's root; None when no quota is set or none can be read.

    The cgroup's folder is found from `proc_self`/cgroup and `proc_self`/mountinfo, so a
    container with or without its own cgroup namespace reads its own limit.
    """
    try:
        cgroups = (proc_self / "cgroup").read_text(encoding="utf-8")
        mounts = (proc_self / "mountinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    quotas: list[float] = []
    for line in cgroups.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and not controllers:  # the cgroup v2 unified hierarchy
            quotas += _quotas_along(_mount(mounts, "cgroup2", None), path, _v2_quota)
        elif "cpu" in controllers.split(","):  # the cgroup v1 hierarchy holding "cpu"
            quotas += _quotas_along(_mount(mounts, "cgroup", "cpu"), path, _v1_quota)
    return min(quotas, default=None)


def usable_cores(proc_self: Path = _PROC_SELF, affinity: int | None = None) -> int:
    """Cores this process may use: its CPU affinity (`affinity` when given, for tests),
    capped by its cgroup's CPU quota rounded up (1.5 CPUs → 2); at least 1.

    Not `os.cpu_count()`: a container on a 64-core host limited to 4 CPUs would otherwise
    start 64 decode workers that the quota throttles."""
    if affinity is None:
        try:
            affinity = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            affinity = os.cpu_count() or 1
    cores = affinity
    quota = cpu_quota(proc_self)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def default_decode_workers() -> int:
    """The decode pool's default size: one worker per usable core, at most MAX_AUTO_WORKERS."""
    return min(usable_cores(), MAX_AUTO_WORKERS)


def decode_workers_or_auto(value: object) -> object:
    """A setting's value, with unset, '' and 'auto' meaning `default_decode_workers()`
    (the settings validate the result)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return default_decode_workers()
    return value


class DecodePoolBroken(RuntimeError):
    """A decode worker died: decode the rest in this thread."""


class DecodePool:
    """A lazily started, self-healing process pool for per-frame decode tasks.
    `workers` None: `default_decode_workers()`."""

    def __init__(self, workers: int | None = None) -> None:
        workers = default_decode_workers() if workers is None else workers
        if workers < 1:
            raise ValueError(f"a decode pool needs at least one worker. Received: {workers}")
        self.workers = workers
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None

    def decode(
        self, fn: Callable[..., Any], tasks: Iterable[tuple[Any, ...]]
    ) -> Iterator[Any | BaseException]:
        """fn(*task) for every task, yielded in order as each is ready; a task's exception
        stands in its place. Raises DecodePoolBroken when the pool broke meanwhile.

        At most TASKS_AHEAD_PER_WORKER × workers tasks are submitted ahead of the one the
        caller waits for, and `tasks` is read only as they are submitted: a caller that
        stores each result and drops it holds a few decoded slices at a time, never its
        whole series twice, and may let go of each task's input once it has its result.
        """
        executor = self._running()
        todo = iter(tasks)
        pending: deque[Future[Any]] = deque()
        try:
            for task in islice(todo, TASKS_AHEAD_PER_WORKER * self.workers):
                pending.append(executor.submit(fn, *task))
            while pending:
                outcome = _outcome(pending.popleft())
                for task in islice(todo, 1):  # keep the workers busy while the caller stores it
                    pending.append(executor.submit(fn, *task))
                yield outcome
        except BrokenProcessPool:
            logger.error("a decode worker died; the requests waiting on it decode in-thread")
            self._discard(executor)
            raise DecodePoolBroken from None
        finally:  # a caller that stops early leaves nothing queued behind it
            for future in pending:
                future.cancel()

    @property
    def started(self) -> bool:
        """Whether its worker processes are running (or starting) now."""
        return self._executor is not None

    def start(self) -> None:
        """Start every worker now (they otherwise start with the first tasks)."""
        for outcome in self.decode(int, [(0,)] * 2 * self.workers):
            if isinstance(outcome, BaseException):
                raise outcome

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


# --- cgroups ---------------------------------------------------------------------------


def _mount(mountinfo: str, fstype: str, option: str | None) -> tuple[str, Path] | None:
    """(root inside the hierarchy, mount point) of the first cgroup mount of this type
    (v1: whose options name `option`), from /proc/self/mountinfo."""
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 4 or sep < 5 or fields[sep + 1] != fstype:
            continue
        if option is not None and option not in fields[sep + 3].split(","):
            continue
        return _unescape(fields[3]), Path(_unescape(fields[4]))
    return None


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def _quotas_along(
    mount: tuple[str, Path] | None, path: str, read: Callable[[Path], float | None]
) -> list[float]:
    """The quotas set on the cgroup at `path` and on its ancestors within the mount."""
    if mount is None:
        return []
    root, point = mount
    relative = os.path.relpath(path, root) if path.startswith(root) else "."
    folder = point if relative == "." or relative.startswith("..") else point / relative
    quotas = []
    while True:
        quota = read(folder)
        if quota is not None:
            quotas.append(quota)
        if folder == point or point not in folder.parents:
            return quotas
        folder = folder.parent


def _v2_quota(folder: Path) -> float | None:
    """cpu.max: '<quota> <period>' in µs, or 'max <period>' without a limit."""
    try:
        quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
        return None if quota == "max" else _ratio(float(quota), float(period))
    except (OSError, ValueError):
        return None


def _v1_quota(folder: Path) -> float | None:
    """cpu.cfs_quota_us (-1: no limit) over cpu.cfs_period_us."""
    try:
        quota = float((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = float((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return None if quota < 0 else _ratio(quota, period)


def _ratio(quota: float, period: float) -> float | None:
    return quota / period if quota > 0 and period > 0 else None

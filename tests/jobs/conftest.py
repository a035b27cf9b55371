"""Fixtures for the job layer: a real redis-server, both stores, a settable clock, and
child worker processes that can be SIGKILLed."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from loopback import free_port, wait_ready
from processes import stop

from app.jobs import JobsConfig, JobStore
from app.jobs.redis_store import RedisJobStore
from app.jobs.sqlite import SqliteJobStore

IN_CI = os.environ.get("CI", "").lower() == "true"
CHILD = Path(__file__).with_name("job_child.py")
DEADLINE_S = 60.0  # bound of every wait on another process; never reached when all is well


class FakeClock:
    """A clock the test moves: leases and expiry without waiting."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, no persistence, stopped at the end."""
    binary = shutil.which("redis-server")
    if binary is None:
        message = "redis-server not found (Debian package redis-server)"
        if IN_CI:
            pytest.fail(f"{message}: CI must install it")
        pytest.skip(f"{message}; these tests run in CI")
    import redis

    workdir = tmp_path_factory.mktemp("redis")
    port = free_port()
    config = workdir / "redis.conf"
    config.write_text(
        f'bind 127.0.0.1\nport {port}\ndir {workdir}\nsave ""\nappendonly no\n'
        f"daemonize no\nlogfile {workdir / 'redis.log'}\n"
    )
    server = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    log = workdir / "redis.log"
    try:
        wait_ready(
            server,
            lambda: bool(client.ping()),
            transient=redis.exceptions.ConnectionError,
            timeout_s=DEADLINE_S,
            poll_s=0.05,
            what="redis-server",
            tail=lambda: log.read_text(errors="replace")[-2000:],
        )
        client.close()
        yield url
    finally:
        stop(server, timeout_s=DEADLINE_S)


def jobs_config(data_dir: Path, **overrides: Any) -> JobsConfig:
    values: dict[str, Any] = {"data_dir": data_dir, "lease_s": 30.0, "poll_interval_s": 0.05}
    values.update(overrides)
    return JobsConfig(**values)


@dataclass
class StoreKit:
    """One store backend for a test: every `make()` is another process's (or replica's)
    view of the same jobs."""

    kind: str
    tmp_path: Path
    redis_url: str | None
    prefix: str
    opened: list[JobStore] = field(default_factory=list)

    @property
    def sqlite_path(self) -> Path:
        return self.tmp_path / "data" / "jobs.sqlite3"

    @property
    def data_dir(self) -> Path:
        return self.tmp_path / "data"

    def config(self, **overrides: Any) -> JobsConfig:
        if self.kind == "redis":
            overrides.setdefault("store_url", self.redis_url)
        return jobs_config(self.data_dir, **overrides)

    def make(
        self, config: JobsConfig | None = None, clock: Callable[[], float] = time.time
    ) -> JobStore:
        config = config or self.config()
        store: JobStore
        if self.kind == "redis":
            assert self.redis_url is not None
            store = RedisJobStore.from_url(self.redis_url, config, clock, prefix=self.prefix)
        else:
            store = SqliteJobStore(self.sqlite_path, config, clock)
        self.opened.append(store)
        return store

    def child_args(self, config: JobsConfig) -> list[str]:
        """How a child process opens this same store (see job_child.py)."""
        return [
            "--kind", self.kind,
            "--data-dir", str(self.data_dir),
            "--sqlite", str(self.sqlite_path),
            "--redis", self.redis_url or "",
            "--prefix", self.prefix,
            "--lease-s", str(config.lease_s),
        ]  # fmt: skip


@pytest.fixture(params=["sqlite", "redis"])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreKit]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    store_kit = StoreKit(request.param, tmp_path, url, f"test:{{{uuid.uuid4().hex}}}:")
    yield store_kit
    for store in store_kit.opened:
        store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Child:
    """A child process (tests/jobs/job_child.py) whose stdout lines are read with a
    deadline, and which can be SIGKILLed."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, prefix: str) -> str:
        """The next stdout line, which must start with `prefix` (its remainder)."""
        try:
            line = self._lines.get(timeout=DEADLINE_S)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"child said nothing within {DEADLINE_S} s") from None
        if line is None:
            self.proc.wait()
            assert self.proc.stderr is not None
            raise AssertionError(
                f"child exited ({self.proc.returncode}) before {prefix!r}: "
                f"{self.proc.stderr.read()[-3000:]}"
            )
        assert line.startswith(prefix), line
        return line[len(prefix) :].strip()

    def expect_json(self, prefix: str) -> Any:
        return json.loads(self.expect(prefix))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no clean-up of any kind runs in the child
        self.proc.wait(timeout=DEADLINE_S)

    def finish(self) -> int:
        return self.proc.wait(timeout=DEADLINE_S)


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    children: list[Child] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(args, env)
        children.append(child)
        return child

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait()
        for stream in (child.proc.stdin, child.proc.stdout, child.proc.stderr):
            if stream is not None:
                stream.close()

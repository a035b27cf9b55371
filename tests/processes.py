"""Starting a server process for the tests (and stopping it): a free loopback port, the
wait until it answers, and the stop that ends it however it hangs. One place for the
Orthanc, redis-server and uvicorn fixtures. Not a test module."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    """A loopback TCP port nothing listens on now (the server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(
    process: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    transient: type[Exception] | tuple[type[Exception], ...],
    deadline_s: float,
    poll_s: float,
    what: str,
    tail: Callable[[], str],
) -> None:
    """Poll `ready()` until it is true; a `transient` error (not listening yet) is one more
    poll. Between polls wait `poll_s` on the process, which notices an early exit. Raises
    AssertionError, with the end of the server's log (`tail()`), when the process exits or
    is not ready after `deadline_s`; any other error of `ready()` goes to the caller."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            if ready():
                return
        except transient:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} was not ready after {deadline_s} s: {tail()}")
        try:
            process.wait(timeout=poll_s)  # the pause between polls; notices an exit
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"{what} exited ({process.returncode}): {tail()}")


def stop(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM (the server's graceful stop), SIGKILL if it has not ended after `timeout_s`."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

"""Stopping a server process the tests started, however it hangs: one place for the
Orthanc, redis-server and uvicorn fixtures, which take a free port and wait until the
server answers with scripts/loopback.py's `free_port` and `wait_ready` (shared with the
driver scripts). Not a test module."""

from __future__ import annotations

import subprocess


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

"""Small helpers for the real processes tests start: a free port, a bounded wait for a
process to come up, a bounded stop, and a bounded wait for any condition."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Literal


def free_port() -> int:
    """A port nobody listens on right now.

    For servers that cannot be told "port 0 and report it" (llama-server, redis-server,
    prometheus), and for URLs where nothing may answer. Another process could take the port
    before it is used; the window is tiny, and the server's start-up then fails loudly."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_started(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], timeout: float, interval: float
) -> Literal["ready", "exited", "timeout"]:
    """Poll `ready()` until it is true, the process exits, or `timeout` seconds pass
    (blocking; the caller raises its own error, with its own log, for the other two)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        if ready():
            return "ready"
        time.sleep(interval)
    return "timeout"


def stop_process(proc: subprocess.Popen[bytes], timeout: float, kill_timeout: float) -> None:
    """SIGTERM and wait up to `timeout`; then SIGKILL and wait up to `kill_timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=kill_timeout)


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float, interval: float = 0.02
) -> float:
    """Wait until `predicate()` is true; the seconds that took. Raises AssertionError
    naming `what` after `timeout` seconds."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - started

"""A real `redis-server` for tests: 127.0.0.1, a free port, a temporary dir, no persistence.

    async with RedisServer() as server:
        client = redis.asyncio.Redis.from_url(server.url)

Missing `redis-server` is an error, not a skip: CI installs it (`apt-get install
redis-server`), so a test that silently skipped would hide a broken pipeline.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from tests.support.procs import free_port, stop_process, wait_started

STARTUP_TIMEOUT_S = 10.0


def real_clock_env() -> dict[str, str]:
    """The environment without libfaketime, which redis-server cannot start under.

    scripts/test reruns the suite under `faketime` to catch tests that mix a fixed instant
    with a real clock. Debian's redis-server (static jemalloc) recurses into
    clock_gettime while libfaketime initialises and never answers, so Redis keeps the
    real clock: the two clocks then disagree by the whole shift, a harsher check of the
    ledger's rule that Redis is only ever sent durations.
    """
    env = dict(os.environ)
    preload = [p for p in env.get("LD_PRELOAD", "").split() if "faketime" not in p]
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    for name in ("FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC", "FAKETIME_NO_CACHE"):
        env.pop(name, None)
    return env


class RedisServerError(RuntimeError):
    pass


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, executable: str | None = None) -> None:
        found = executable or shutil.which("redis-server")
        if found is None:
            raise RedisServerError(
                "redis-server is not installed (apt-get install redis-server); "
                "the Redis ledger tests need a real server"
            )
        self.executable = found
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start on `port`, or on a free one (redis-server cannot report a port it picked)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="tollgate-redis-")
        self.port = free_port() if port is None else port
        self.process = subprocess.Popen(
            [
                self.executable, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", self._tmp.name, "--save", "", "--appendonly", "no",
                "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning",
                "--logfile", str(Path(self._tmp.name) / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=real_clock_env(),
        )
        started = wait_started(self.process, lambda: _ping(self.port), STARTUP_TIMEOUT_S, interval=0.02)
        if started == "ready":
            return
        if started == "exited":
            err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
            self.stop()
            raise RedisServerError(f"redis-server exited at start: {err.strip()}")
        self.stop()
        raise RedisServerError(f"redis-server did not answer PING within {STARTUP_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 5, 5)
            if self.process.stderr is not None:
                self.process.stderr.close()
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def __aenter__(self) -> RedisServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.stop)

"""`tollgate serve` as a real subprocess, and a fake upstream on its own thread.

The proxies under test are separate processes, so the fake upstream they call must not
share the test's event loop with the hundreds of client requests the test makes: it runs
on a thread with its own loop, and the test talks to it only through thread-safe calls.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp

from tests.support.fake_upstream import FakeUpstream, ReplySource

ROOT = Path(__file__).resolve().parents[2]
_READY = re.compile(r"tollgate ready on http://127\.0\.0\.1:(\d+)/v1")


@dataclass
class Tollgate:
    proc: subprocess.Popen[bytes]
    log: Path  # stderr: the server's own log lines
    port: int
    stdout: Path | None = None  # the access log, when it was kept

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def kill(self) -> None:
        """SIGKILL: no drain, no settlement, no clean close of the ledger."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait: in-flight requests drain and settle."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


async def start_tollgate(
    config: Path,
    log: Path,
    *,
    workers: int = 1,
    stdout: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Tollgate:
    """Start `python -m proxy serve`, wait for its ready line and for /readyz to say ready.

    stderr is appended to `log`; stdout (the access log) to `stdout`, or dropped; `env` is
    added to the test's environment, less its OTEL_* and PROMETHEUS_MULTIPROC* variables."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_MULTIPROC"))}
    args = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    if workers > 1:
        args += ["--workers", str(workers)]
    # The log may hold earlier runs' lines: only what this process writes counts.
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as err, open(stdout if stdout is not None else os.devnull, "ab") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env={**base_env, **(env or {})}, stdout=out, stderr=err)
    deadline = time.monotonic() + timeout
    port: int | None = None
    try:
        while port is None:
            if proc.poll() is not None:
                raise AssertionError(f"tollgate exited with {proc.returncode}:\n{log.read_text()}")
            m = _READY.search(log.read_bytes()[offset:].decode(errors="replace"))
            if m:
                port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"tollgate did not start:\n{log.read_text()}")
            await asyncio.sleep(0.05)
        # Ready means tokenizers loaded too; with workers, each must be: ask several times.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            ready_in_a_row = 0
            while ready_in_a_row < 2 * workers:
                if time.monotonic() > deadline:
                    raise AssertionError(f"tollgate never became ready:\n{log.read_text()}")
                try:
                    async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                        ready_in_a_row = ready_in_a_row + 1 if r.status == 200 else 0
                except aiohttp.ClientError:
                    ready_in_a_row = 0
                if ready_in_a_row == 0:
                    await asyncio.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return Tollgate(proc, log, port, stdout)


class UpstreamThread:
    """A FakeUpstream serving from its own thread and event loop."""

    def __init__(self) -> None:
        self.fake: FakeUpstream | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                async with FakeUpstream() as fake:
                    self.fake = fake
                    self._started.set_result(None)
                    await self._stop.wait()
            except BaseException as exc:
                if not self._started.done():
                    self._started.set_exception(exc)
                raise

        asyncio.run(main())

    def __enter__(self) -> UpstreamThread:
        self._thread.start()
        self._started.result(timeout=10)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def api_base(self) -> str:
        assert self.fake is not None
        return self.fake.api_base

    @property
    def received(self) -> int:
        """Requests received so far (a list's len is safe to read from another thread)."""
        assert self.fake is not None
        return len(self.fake.requests)

    def _call(self, fn: Callable[[], object]) -> None:
        assert self._loop is not None
        done: Future[None] = Future()

        def run() -> None:
            try:
                fn()
                done.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        done.result(timeout=5)

    def route(self, method: str, path: str, reply: ReplySource) -> None:
        assert self.fake is not None
        fake = self.fake
        self._call(lambda: fake.route(method, path, reply))

    def hold(self) -> None:
        """From now on every request waits at the gate until `release`."""
        assert self.fake is not None
        fake = self.fake
        self._call(lambda: setattr(fake, "hold", asyncio.Event()))

    def release(self) -> None:
        fake = self.fake
        if fake is None or self._loop is None or self._loop.is_closed():
            return

        def open_gate() -> None:
            if fake.hold is not None:
                fake.hold.set()

        self._loop.call_soon_threadsafe(open_gate)

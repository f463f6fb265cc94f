"""What every fault test checks at its end: the outcome was recorded, and nothing leaked.

Shared by test_faults_*.py. A fault "survived" means: the client got an OpenAI-shaped error
or a correctly closed stream, the exchange was finished once (Recorder), its line is in the
access log, its spend row is in the ledger, and no request-scoped task is still running.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from proxy.state import Runtime
from tests.integration.conftest import Proxy, proxy_yaml
from tests.support.tollgate_process import Tollgate, start_tollgate

# Tasks that live as long as the app does, by the name of their coroutine.
_LONG_LIVED = frozenset({"chores", "housekeeping_rounds", "retry_outbox"})


async def drained(rt: Runtime, timeout: float = 5.0) -> None:
    """Wait until every settlement and other background task of the runtime is done."""
    deadline = time.monotonic() + timeout
    while rt.background:
        if time.monotonic() > deadline:
            raise AssertionError(f"background work still running: {rt.background}")
        await asyncio.sleep(0.01)


def _coro_name(task: asyncio.Task[Any]) -> tuple[str, str]:
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None) or getattr(coro, "gi_code", None)
    frame = getattr(coro, "cr_frame", None)
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return module, code.co_name if code is not None else repr(coro)


async def leaked_tasks(rt: Runtime, timeout: float = 5.0) -> list[str]:
    """Request-scoped tasks still pending once the runtime's background set is empty: the
    proxy's own coroutines (bar the app-lifetime chores), and aiohttp request handlers."""
    await drained(rt, timeout)
    deadline = time.monotonic() + timeout
    while True:
        current = asyncio.current_task()
        leaked = []
        for task in asyncio.all_tasks():
            if task is current or task.done():
                continue
            module, name = _coro_name(task)
            if module.startswith("proxy.") and name not in _LONG_LIVED or module == "aiohttp.web_protocol" and name == "_handle_request":
                leaked.append(f"{module}.{name}")
        if not leaked or time.monotonic() > deadline:
            return leaked
        await asyncio.sleep(0.02)


def ledger_path(proxy: Proxy) -> Path:
    return Path(proxy.runtime.settings.ledger.path)


def spend_rows(path: Path) -> list[dict[str, Any]]:
    """Every spend-log row of a SQLite ledger (read with a connection of our own)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM spend_log ORDER BY time")]
    finally:
        conn.close()


def integrity_ok(path: Path) -> bool:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return bool(conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok")
    finally:
        conn.close()


def log_records(proxy: Proxy) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in proxy.log_lines()]


async def recorded(proxy: Proxy, request_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The access-log record and the spend-log row of one request, once settled; and the
    check that nothing it started is still running."""
    rt = proxy.runtime
    leaked = await leaked_tasks(rt)
    assert leaked == [], leaked
    lines = [r for r in log_records(proxy) if r["request_id"] == request_id]
    assert len(lines) == 1, lines
    rows = [r for r in spend_rows(ledger_path(proxy)) if r["request_id"] == request_id]
    assert len(rows) == 1, rows
    return lines[0], rows[0]


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    value = proxy.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


@dataclass
class ServerProcess(Tollgate):
    """`tollgate serve` as a subprocess, its stdout (the access log) kept in a file, with
    what the fault tests observe of it from outside."""

    def access_log(self) -> list[dict[str, Any]]:
        assert self.stdout is not None
        return [orjson.loads(line) for line in self.stdout.read_bytes().splitlines() if line.strip()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def metrics_url(self) -> str:
        m = re.search(r"\(metrics: (http://\S+)\)", self.log_text())
        assert m is not None, self.log_text()
        return m.group(1)

    async def metric(self, name: str, **labels: str) -> float:
        """One sample from the metrics port (0 when absent)."""
        async with aiohttp.ClientSession() as s:
            async with s.get(self.metrics_url) as r:
                text = await r.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    async def wait_log(self, needle: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged:\n{self.log_text()}")
            await asyncio.sleep(0.05)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self, timeout: float = 30.0) -> int:
        # The fault tests stop servers that may still be draining streams: a wider bound.
        return super().stop(timeout)


async def start_server_process(
    config: Path, workdir: Path, *, env: dict[str, str] | None = None, timeout: float = 30.0
) -> ServerProcess:
    """Start the server (`tollgate serve`, which reloads its config on SIGHUP), wait for its
    ready line and for /readyz; its log and access log go to files in `workdir`."""
    started = await start_tollgate(
        config, workdir / "tollgate.log", stdout=workdir / "access.log", env=env, timeout=timeout
    )
    return ServerProcess(started.proc, started.log, started.port, started.stdout)


def server_yaml(upstream_base: str, ledger: Path, extra: str = "", *, idle: float = 5.0) -> str:
    """The in-process tests' config (`proxy_yaml`) with the ledger in `ledger`."""
    return proxy_yaml(upstream_base, idle=idle, extra=f"ledger:\n  path: {ledger}\n{extra}")


async def leave_mid_stream(base_url: str, body: dict[str, Any], events: int = 5) -> None:
    """Ask for a stream and hang up once `events` SSE events have arrived."""
    async with aiohttp.ClientSession() as s:
        resp = await s.post(base_url + "/chat/completions", data=orjson.dumps({**body, "stream": True}))
        got = b""
        while got.count(b"\n\n") < events:
            got += await resp.content.readany()
        resp.close()

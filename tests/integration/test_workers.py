"""`tollgate serve --workers N`: a real parent process, real workers, one aggregated scrape."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.config_file import parse_settings
from proxy.serve import pin_ports
from tests.integration.conftest import proxy_yaml
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import wait_until
from tests.support.tollgate_process import ROOT, start_tollgate

READY = re.compile(r"ready on http://127\.0\.0\.1:(\d+)/v1 with (\d+) workers .*\(metrics: (\S+)\)")
WAIT_S = 20.0


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    metrics_url: str

    @property
    def chat_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/chat/completions"


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out.extend(int(x) for x in (task / "children").read_text().split())
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@asynccontextmanager
async def start_workers(tmp_path: Path, extra_yaml: str = "") -> AsyncIterator[tuple[Served, FakeUpstream]]:
    async with FakeUpstream() as fake:
        fake.replay(openai_capture("chat-basic"))
        config = tmp_path / "tollgate.yaml"
        if "ledger:" not in extra_yaml:  # never ./data of the checkout
            extra_yaml += f"\nledger:\n  path: {tmp_path / 'ledger.db'}\n"
        config.write_text(proxy_yaml(fake.api_base, extra=extra_yaml))
        tollgate = await start_tollgate(config, tmp_path / "serve.log", workers=2)
        try:
            m = READY.search(tollgate.log.read_text())
            assert m is not None, tollgate.log.read_text()
            assert m.group(2) == "2"
            yield Served(tollgate.proc, tollgate.log, int(m.group(1)), m.group(3)), fake
        finally:
            tollgate.kill()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Served, FakeUpstream]]:
    async with start_workers(tmp_path) as pair:
        yield pair


async def send(url: str, n: int) -> list[int]:
    body = openai_capture("chat-basic").request_json
    # A fresh connection per request: SO_REUSEPORT spreads connections, not requests.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        sem = asyncio.Semaphore(8)

        async def one() -> int:
            async with sem, session.post(url, json=body) as resp:
                await resp.read()
                return resp.status

        return await asyncio.gather(*(one() for _ in range(n)))


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def test_two_workers_serve_one_port_and_one_scrape_counts_all(
    served: tuple[Served, FakeUpstream],
) -> None:
    srv, fake = served
    workers = children(srv.proc.pid)
    assert len(workers) == 2 and all(alive(p) for p in workers)

    statuses = await send(srv.chat_url, 40)
    assert statuses == [200] * 40
    assert len(fake.requests) == 40

    metrics = await scrape(srv.metrics_url)
    assert metrics["tollgate_requests_total"] == 40
    assert metrics["tollgate_request_duration_seconds_count"] == 40
    # livesum over the live workers: nothing in flight, and not 2x anything.
    assert metrics["tollgate_in_flight_requests"] == 0
    assert metrics["tollgate_build_info"] == 1


async def test_a_killed_worker_is_replaced_and_its_counts_survive(
    served: tuple[Served, FakeUpstream],
) -> None:
    srv, _ = served
    first = children(srv.proc.pid)
    assert await send(srv.chat_url, 20) == [200] * 20

    os.kill(first[0], signal.SIGKILL)

    def replaced() -> bool:
        now = [p for p in children(srv.proc.pid) if alive(p)]
        return len(now) == 2 and first[0] not in now

    await wait_until(replaced, "a replacement worker", WAIT_S, interval=0.05)
    assert first[1] in children(srv.proc.pid)
    # The replacement is listening once the parent says nothing more; just retry briefly.
    await wait_until(lambda: _accepts(srv.port), "the port to accept", WAIT_S, interval=0.05)
    assert await send(srv.chat_url, 10) == [200] * 10
    metrics = await scrape(srv.metrics_url)
    # The dead worker's counter file stays in the multiprocess directory.
    assert metrics["tollgate_requests_total"] == 30
    assert "restarting it" in srv.log.read_text()


async def test_sigterm_to_the_parent_stops_every_worker_and_exits_0(
    served: tuple[Served, FakeUpstream],
) -> None:
    srv, _ = served
    workers = children(srv.proc.pid)
    assert len(workers) == 2
    srv.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: srv.proc.poll() is not None, "the parent to exit", WAIT_S, interval=0.05)
    assert srv.proc.returncode == 0
    assert not any(alive(p) for p in workers)
    log = srv.log.read_text()
    assert log.count("shutting down worker") == 2
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()


async def test_both_workers_share_one_sqlite_ledger(tmp_path: Path) -> None:
    # A request-count budget is only exact if every worker reserves against the same rows
    # atomically: 40 admitted across both workers, then every further request refused.
    budget = f"""
ledger:
  backend: sqlite
  path: {tmp_path / "ledger.db"}
budgets:
  - name: forty
    period: total
    limit_requests: 40
"""
    async with start_workers(tmp_path, budget) as (srv, fake):
        assert await send(srv.chat_url, 40) == [200] * 40
        assert await send(srv.chat_url, 6) == [429] * 6
        assert len(fake.requests) == 40


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_port_0_is_resolved_once_for_every_worker() -> None:
    settings = parse_settings(proxy_yaml("http://127.0.0.1:9/v1"), env={})
    assert settings.server.port == 0 and settings.metrics.port == 0
    pinned, held = pin_ports(settings)
    try:
        assert len(held) == 2
        assert pinned.server.port == held[0].getsockname()[1] != 0
        assert pinned.metrics.port == held[1].getsockname()[1] != 0
        # A worker can bind the reserved port alongside the parent's (never listening) socket.
        worker = socket.socket()
        worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        worker.bind(("127.0.0.1", pinned.server.port))
        worker.close()
    finally:
        for sock in held:
            sock.close()


def test_fixed_ports_are_left_alone() -> None:
    text = proxy_yaml("http://127.0.0.1:9/v1").replace("port: 0", "port: 18080", 1)
    settings = parse_settings(text.replace("port: 0", "port: 19464"), env={})
    pinned, held = pin_ports(settings)
    assert held == [] and pinned is settings


def test_workers_must_be_positive() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--workers", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "--workers" in out.stderr and ">= 1" in out.stderr

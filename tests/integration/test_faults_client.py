"""Client faults, the ledger's side: test_failures.py shows the upstream request is
cancelled within 100 ms when a client leaves; here, what the leaving client is charged
(what was consumed, the reservation released), a client that leaves before its request
is whole, and a client that reads too slowly for the stream it asked for."""

from __future__ import annotations

import asyncio
import socket
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.state import Runtime
from tests.integration.conftest import StartProxy, proxy_yaml
from tests.integration.faults_common import (
    drained,
    leaked_tasks,
    leave_mid_stream,
    log_records,
    server_yaml,
    spend_rows,
    start_server_process,
)
from tests.integration.test_failures import CHAT, SSE, chunk
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.recorder import Recorder
from tests.support.tollgate_process import UpstreamThread

BUDGET = """
budgets:
  - name: daily
    period: daily
    limit_usd: 5
"""


async def budget_state(rt: Runtime) -> dict[str, Any]:
    rows = await rt.ledger.budget_report(rt.clock())
    assert len(rows) == 1, rows
    return rows[0]


async def test_client_gone_while_upstream_thinks_is_charged_the_prompt_and_releases_the_rest(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    rec = Recorder()
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, headers_delay=5.0, chunks=[chunk(0, "x")]))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=BUDGET), observers=[rec])
    session = aiohttp.ClientSession()
    task = asyncio.ensure_future(
        session.post(proxy.base_url + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True}))
    )
    await fake_openai.wait_request()
    held = await budget_state(proxy.runtime)
    assert held["reserved"] > 0  # the worst case is held while the upstream thinks
    task.cancel()
    await session.close()
    ex = await rec.wait()
    await fake_openai.wait_disconnect(timeout=2)
    await drained(proxy.runtime)
    after = await budget_state(proxy.runtime)
    row = next(r for r in spend_rows(Path(proxy.runtime.settings.ledger.path)) if r["request_id"] == ex.request_id)
    assert ex.outcome == "client_gone" and row["outcome"] == "client_gone"
    # Settled with what was consumed: the prompt, no output; nothing left reserved.
    assert row["input_tokens"] > 0 and row["output_tokens"] == 0
    assert after["reserved"] == 0 and after["reserved_requests"] == 0
    assert after["spent"] == Decimal(row["cost_nanos"]) / Decimal(10**9) > 0
    assert await leaked_tasks(proxy.runtime) == []


async def test_client_gone_mid_stream_is_charged_what_was_relayed(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    rec = Recorder()
    chunks = [chunk(i, f"word{i} ") for i in range(40)]
    fake_openai.route("POST", "/v1/chat/completions", Reply(headers=SSE, chunks=chunks, delays=[0] + [0.05] * 39))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=BUDGET), observers=[rec])
    await leave_mid_stream(proxy.base_url, CHAT)
    ex = await rec.wait()
    gone = await fake_openai.wait_disconnect(timeout=2)
    await drained(proxy.runtime)
    row = next(r for r in spend_rows(Path(proxy.runtime.settings.ledger.path)) if r["request_id"] == ex.request_id)
    after = await budget_state(proxy.runtime)
    assert row["outcome"] == "client_gone" and row["output_source"] == "estimated"
    # Billed for what reached the proxy (at least what the client read), not the whole 40.
    relayed = ex.output_text.text()
    assert relayed.count("word") >= 5 and gone.chunks_sent < 40
    assert 5 * 2 <= row["output_tokens"] <= gone.chunks_sent * 3
    assert after["reserved"] == 0 and after["spent"] == Decimal(row["cost_nanos"]) / Decimal(10**9)
    assert await leaked_tasks(proxy.runtime) == []


async def test_client_gone_before_its_request_is_whole_sends_nothing_and_leaks_nothing(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=BUDGET))
    host, port = proxy.url.removeprefix("http://").split(":")
    body = orjson.dumps(CHAT)
    for sent in (b"POST /v1/chat/co", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"):
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(sent)
        await writer.drain()
        writer.close()
    # Headers whole, body half sent: the handler is waiting on the body when the client goes.
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2]
    )
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()
    await asyncio.sleep(0.2)
    assert fake_openai.requests == []
    assert await leaked_tasks(proxy.runtime) == []
    records = log_records(proxy)
    assert [r["outcome"] for r in records] in ([], ["client_gone"]), records
    # Nothing was reserved, so nothing is left held.
    assert await proxy.runtime.ledger.budget_report(proxy.runtime.clock()) == []


async def _read_slowly(port: int, seconds: float) -> tuple[int, socket.socket]:
    """Ask for the stream, then read it at one byte a second through a small receive
    buffer; returns the bytes read and the (still open) socket."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: no autotuning
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    body = orjson.dumps({**CHAT, "stream": True})
    await loop.sock_sendall(
        sock,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
    )
    got = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        got += len(await loop.sock_recv(sock, 1))
        await asyncio.sleep(1.0)
    return got, sock


def _kernel_socket_buffering() -> int:
    """The most a loopback TCP path can buffer: one receive and two send buffers at their
    autotuning maximums (the client's receive buffer is pinned small)."""
    try:
        rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
        wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 64 * 1024 * 1024
    return rmem + 2 * wmem


async def test_slow_reader_keeps_proxy_memory_bounded(tmp_path: Path) -> None:
    """A client reading 1 byte/s from a fast stream of tens of MB: the proxy must stop
    reading the upstream (back-pressure) rather than buffer the stream in memory."""
    event = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": "y" * 16_000}}]}) + b"\n\n"
    # More than the kernel can hold in the socket buffers between upstream and client (the
    # proxy's receive buffer alone autotunes up to tcp_rmem's maximum, 32 MB here, on the
    # pooled connection the warm-up grew): only then does "the upstream could not send it
    # all" show back-pressure rather than the kernel's buffering.
    n = (10 * 1024 * 1024 + _kernel_socket_buffering()) // len(event) + 1
    with UpstreamThread() as upstream:
        upstream.route("POST", "/v1/chat/completions", Reply(headers=SSE, chunks=[event] * n + [b"data: [DONE]\n\n"]))
        config = tmp_path / "tollgate.yaml"
        config.write_text(server_yaml(upstream.api_base, tmp_path / "ledger.db"))
        server = await start_server_process(config, tmp_path)
        try:
            # Once at full speed, so allocator pools and buffers are warm before the baseline.
            async with aiohttp.ClientSession() as s:
                async with s.post(server.base_url + "/chat/completions", data=orjson.dumps({**CHAT, "stream": True})) as r:
                    assert len(await r.read()) >= n * len(event)
            base = server.rss_kib()
            slow = asyncio.ensure_future(_read_slowly(server.port, 10.0))
            peak = base
            while not slow.done():
                peak = max(peak, server.rss_kib())
                await asyncio.sleep(0.25)
            got, sock = await slow
            assert upstream.fake is not None
            sent = sum(len(w.data) for w in upstream.fake.writes if w.index < n) - n * len(event)  # this request's
            sock.close()
            await asyncio.sleep(0.5)
            end = server.rss_kib()
            print(
                f"slow reader: read {got} B in 10 s; upstream had sent {sent / 1e6:.1f} of {n * len(event) / 1e6:.1f} MB; "
                f"proxy RSS {base / 1024:.1f} MiB -> peak {peak / 1024:.1f} MiB -> {end / 1024:.1f} MiB after"
            )
            assert got >= 5
            # Back-pressure reached the upstream: it could not push the whole stream out.
            assert sent < n * len(event)
            # Whatever sits in socket buffers is the kernel's; the proxy holds a few chunks.
            assert peak - base < 16 * 1024, (base, peak)
            # Nor after: accounting for a 10 MB relayed text must not balloon (it once took
            # ~450 MB and 5 s of event loop to count it).
            assert end - base < 16 * 1024, (base, end)
            assert server.stop() == 0
        finally:
            server.kill()
    rows = spend_rows(tmp_path / "ledger.db")
    assert [r["outcome"] for r in rows] == ["ok", "client_gone"]

"""Dependencies failing under the proxy: Redis down and restarted (fail_closed and
fail_open), the SQLite ledger's disk full, the ledger unusable at start, and an OTLP
collector that is not there."""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import time
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.app import METRICS
from tests.integration.conftest import Proxy, StartProxy, proxy_yaml
from tests.integration.faults_common import (
    drained,
    integrity_ok,
    leaked_tasks,
    log_records,
    sample,
    server_yaml,
    spend_rows,
    start_server_process,
)
from tests.integration.test_failures import (
    CHAT,
    SSE,
    assert_openai_error,
    chunk,
    post,
)
from tests.support.fake_upstream import FakeUpstream, RecordedRequest, Reply
from tests.support.procs import free_port
from tests.support.recorder import Recorder
from tests.support.redis_server import RedisServer
from tests.support.tollgate_process import UpstreamThread

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
COMPLETION = {"id": "c", "object": "chat.completion", "choices": [], "usage": USAGE}


def redis_yaml(base: str, redis_url: str, spend_log: Path, mode: str) -> str:
    return proxy_yaml(
        base,
        extra=f"""
budgets:
  - name: daily
    period: daily
    limit_usd: 5
ledger:
  backend: redis
  redis_url: {redis_url}
  path: {spend_log}
  on_unavailable: {mode}
""",
    )


def restart(server: RedisServer) -> None:
    """Start again on the same port (the proxy's URL), with empty data, as a restarted
    Redis without persistence comes back."""
    port = server.port
    server.stop()
    server.start(port)


def stop_only(server: RedisServer) -> None:
    assert server.process is not None
    server.process.kill()
    server.process.wait(5)


async def test_redis_down_fail_closed_is_503_then_recovers(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", Reply.json(COMPLETION))
    rec = Recorder()
    async with RedisServer() as redis_server:
        proxy = await start_proxy(redis_yaml(fake_openai.api_base, redis_server.url, tmp_path / "s.db", "fail_closed"), observers=[rec])
        url = proxy.base_url + "/chat/completions"
        assert (await post(url, CHAT))[0] == 200
        stop_only(redis_server)
        t = time.monotonic()
        status, body, headers = await post(url, CHAT)
        took = time.monotonic() - t
        assert status == 503, body
        err = assert_openai_error(body, type_="server_error", code="ledger_unavailable")
        assert "ledger is unavailable" in err["message"] and headers["retry-after"] == "2"
        assert took < 3.0  # fails fast, does not hang on the dead server
        assert len(fake_openai.requests) == 1  # refused before anything went upstream
        ex = await rec.wait(2)
        assert (ex.outcome, ex.status, ex.error_type) == ("proxy_error", 503, "ledger_unavailable")
        assert sample(proxy, "tollgate_ledger_unavailable_total", operation="reserve", mode="fail_closed") == 1
        restart(redis_server)
        deadline = time.monotonic() + 10
        while (status := (await post(url, CHAT))[0]) != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert status == 200
        await drained(proxy.runtime)
        report = await proxy.runtime.ledger.budget_report(proxy.runtime.clock())
        assert report[0]["spent"] > 0 and report[0]["reserved"] == 0
        assert await leaked_tasks(proxy.runtime) == []


async def test_redis_down_fail_open_admits_counts_and_reconciles(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path
) -> None:
    slow = [chunk(i, f"w{i} ") for i in range(6)] + [
        b"data: " + orjson.dumps({"choices": [], "usage": USAGE}) + b"\n\n",
        b"data: [DONE]\n\n",
    ]

    def reply(request: RecordedRequest) -> Reply:
        if request.json.get("stream"):
            return Reply(headers=SSE, chunks=slow, delays=[0] + [0.1] * 7)
        return Reply.json(COMPLETION)

    fake_openai.route("POST", "/v1/chat/completions", reply)
    async with RedisServer() as redis_server:
        proxy = await start_proxy(redis_yaml(fake_openai.api_base, redis_server.url, tmp_path / "s.db", "fail_open"))
        rt = proxy.runtime
        url = proxy.base_url + "/chat/completions"
        async with aiohttp.ClientSession() as s:
            # A stream reserved while Redis is up, which ends while it is down.
            streaming = await s.post(url, data=orjson.dumps({**CHAT, "stream": True}))
            await streaming.content.readany()
            stop_only(redis_server)
            outage = []
            for _ in range(3):
                status, _, headers = await post(url, CHAT)
                assert status == 200 and headers["x-tollgate-budget-unchecked"] == "ledger-unavailable"
                outage.append(headers["X-Request-Id"])
            assert (await streaming.read()).endswith(b"data: [DONE]\n\n")
            streamed_id = streaming.headers["X-Request-Id"]
        await drained(rt)
        assert sample(proxy, "tollgate_ledger_unavailable_total", operation="reserve", mode="fail_open") == 3
        assert len(rt.unsettled) == 4 and sample(proxy, "tollgate_ledger_unsettled") == 4
        assert [r["budget"] for r in log_records(proxy) if r["request_id"] in outage] == ["unchecked"] * 3
        restart(redis_server)
        deadline = time.monotonic() + 10
        while rt.unsettled and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # the ledger chores retry every 2 s
        assert not rt.unsettled
        assert sample(proxy, "tollgate_ledger_reconciled_total") == 4
        # Redis came back empty: its budget now holds exactly the four late charges.
        rows = {r["request_id"]: r for r in spend_rows(tmp_path / "s.db")}
        assert set(outage) | {streamed_id} <= set(rows)
        late = sum(Decimal(rows[i]["cost_nanos"]) for i in [*outage, streamed_id]) / Decimal(10**9)
        report = await rt.ledger.budget_report(rt.clock())
        assert report[0]["spent"] == late > 0 and report[0]["reserved"] == 0 and report[0]["requests"] == 4
        assert await leaked_tasks(rt) == []


async def test_ledger_disk_full_is_a_clear_error_and_no_corruption(tmp_path: Path) -> None:
    """RLIMIT_FSIZE on the running server: every write past the limit fails with EFBIG, as on
    a full disk. Budgets apply (fail_closed): admissions are refused with 503, settlements of
    requests already admitted wait; once space is back, they land; the file stays sound."""
    ledger = tmp_path / "ledger.db"
    budget = "budgets:\n  - name: daily\n    period: daily\n    limit_usd: 5\n"
    with UpstreamThread() as upstream:
        upstream.route("POST", "/v1/chat/completions", Reply.json(COMPLETION))
        config = tmp_path / "tollgate.yaml"
        config.write_text(server_yaml(upstream.api_base, ledger, budget))
        server = await start_server_process(config, tmp_path)
        try:
            url = server.base_url + "/chat/completions"
            for _ in range(3):
                assert (await post(url, CHAT))[0] == 200
            await asyncio.sleep(0.3)
            wal = Path(f"{ledger}-wal")
            limit = max(wal.stat().st_size, 64 * 1024)
            assert server.log.stat().st_size < limit and server.stdout.stat().st_size < limit
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            statuses = []
            for _ in range(40):  # the WAL grows until a write crosses the limit
                status, body, _ = await post(url, CHAT)
                statuses.append(status)
                if status == 503:
                    assert_openai_error(body, code="ledger_unavailable")
                    break
                assert status == 200
            assert statuses[-1] == 503, statuses
            assert server.proc.poll() is None  # still serving
            assert "ledger unavailable, refusing" in server.log_text()
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # soft only: raising a hard limit needs CAP_SYS_RESOURCE
            deadline = time.monotonic() + 10
            while (await post(url, CHAT))[0] != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert server.stop() == 0
        finally:
            server.kill()
    assert integrity_ok(ledger)
    served = [r for r in server.access_log() if r["status"] == 200]
    rows = {r["request_id"] for r in spend_rows(ledger)}
    # Every request that was served is in the spend log: none lost to the full disk.
    assert {r["request_id"] for r in served} <= rows, server.log_text()[-2000:]


async def test_ledger_unusable_at_start_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    config = tmp_path / "tollgate.yaml"
    config.write_text(server_yaml(f"http://127.0.0.1:{free_port()}/v1", blocker / "ledger.db"))
    try:
        await start_server_process(config, tmp_path, timeout=20)
    except AssertionError as exc:
        text = str(exc)
    else:
        raise AssertionError("started with an unusable ledger")
    assert "exited with 1" in text
    assert "cannot open the ledger" in text and str(blocker) in text
    assert "Traceback" not in text


@pytest.mark.parametrize("taken", ["server", "metrics"])
async def test_a_port_in_use_at_start_is_a_clear_error(tmp_path: Path, taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        text = server_yaml(f"http://127.0.0.1:{free_port()}/v1", tmp_path / "ledger.db")
        section = text.index(f"{taken}:")
        text = text[:section] + text[section:].replace("port: 0", f"port: {port}", 1)
        config = tmp_path / "tollgate.yaml"
        config.write_text(text)
        try:
            await start_server_process(config, tmp_path, timeout=20)
        except AssertionError as exc:
            out = str(exc)
        else:
            raise AssertionError(f"started with its {taken} port taken")
    assert "exited with 1" in out
    assert "cannot start" in out and f"127.0.0.1', {port})" in out and "address already in use" in out
    assert "Traceback" not in out and "Unclosed client session" not in out


async def test_unreachable_otlp_collector_changes_nothing_for_requests(
    start_proxy: StartProxy,
    fake_openai: FakeUpstream,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    # The SDK's batch processor reads its own settings from the process environment.
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    from proxy.observers.tracing import make_tracer_provider

    fake_openai.route("POST", "/v1/chat/completions", Reply.json(COMPLETION))
    dropped: list[int] = []
    proxies: list[Proxy] = []

    def on_drop() -> None:  # wired as `tollgate serve` wires it (proxy.serve)
        dropped.append(1)
        if proxies:
            proxies[0].app[METRICS].count_dropped_span()

    # A collector that takes the connection and never answers: every export waits out its
    # timeout, so the queue surely fills (a refused port fails so fast that whether spans
    # drop depended on timing).
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(64)
    request.addfinalizer(black_hole.close)
    provider = make_tracer_provider(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{black_hole.getsockname()[1]}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "200",
        },
        max_queue_size=8,
        on_drop=on_drop,
    )
    assert provider is not None
    proxies.append(await start_proxy(proxy_yaml(fake_openai.api_base), tracer_provider=provider))
    proxy = proxies[0]
    t = time.monotonic()
    results = await asyncio.gather(*(post(proxy.base_url + "/chat/completions", CHAT) for _ in range(60)))
    took = time.monotonic() - t
    assert all(r[0] == 200 for r in results)
    assert took < 5.0
    # A bounded queue: what did not fit was dropped and counted, not buffered without end.
    assert dropped and sample(proxy, "tollgate_trace_spans_dropped_total") == len(dropped)
    t = time.monotonic()
    await asyncio.to_thread(provider.shutdown)
    assert time.monotonic() - t < 10
    print(f"OTLP unreachable: 60 requests in {took:.2f} s, {len(dropped)} spans dropped")


async def test_a_hung_redis_leaves_no_reservation_for_a_refused_request(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path
) -> None:
    """Redis stopped (SIGSTOP): requests are refused with 503 once its socket timeout runs
    out, but Redis still holds their reserve scripts and runs them when it wakes. Those
    reservations belong to requests that never ran: Tollgate abandons them."""
    fake_openai.route("POST", "/v1/chat/completions", Reply.json(COMPLETION))
    async with RedisServer() as redis_server:
        proxy = await start_proxy(redis_yaml(fake_openai.api_base, redis_server.url, tmp_path / "s.db", "fail_closed"))
        url = proxy.base_url + "/chat/completions"
        assert (await post(url, CHAT))[0] == 200
        await drained(proxy.runtime)
        assert redis_server.process is not None
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            statuses = [r[0] for r in await asyncio.gather(*(post(url, CHAT) for _ in range(5)))]
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        assert statuses == [503] * 5
        rt = proxy.runtime
        deadline = time.monotonic() + 15
        while True:
            report = await rt.ledger.budget_report(rt.clock())
            if report[0]["reserved"] == 0 and not rt.abandoned:
                break
            assert time.monotonic() < deadline, (report, rt.abandoned)
            await asyncio.sleep(0.2)
        assert report[0]["requests"] == 1 and len(fake_openai.requests) == 1

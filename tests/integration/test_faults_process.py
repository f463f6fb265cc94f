"""The server process under signals: SIGTERM drains, SIGHUP reloads (or refuses to).

kill -9 mid-traffic (no settled spend lost) is test_budget_durability.py's; worker
restarts and SIGTERM of the multi-worker parent are test_workers.py's.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.integration.faults_common import (
    ServerProcess,
    server_yaml,
    spend_rows,
    start_server_process,
)
from tests.integration.test_failures import CHAT, SSE, chunk
from tests.support.fake_upstream import Reply
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import free_port
from tests.support.tollgate_process import UpstreamThread

USAGE_CHUNK = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":10,"total_tokens":18}}\n\n'


def slow_stream(n: int, gap: float) -> Reply:
    chunks = [chunk(i, f"t{i} ") for i in range(n)] + [USAGE_CHUNK, b"data: [DONE]\n\n"]
    return Reply(headers=SSE, chunks=chunks, delays=[0] + [gap] * (n - 1))


async def open_stream(session: aiohttp.ClientSession, server: ServerProcess) -> aiohttp.ClientResponse:
    resp = await session.post(
        server.base_url + "/chat/completions",
        data=orjson.dumps({**CHAT, "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 200
    assert (await resp.content.readany()).startswith(b"data: ")
    return resp


async def refused(server: ServerProcess) -> bool:
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{server.port}/healthz", timeout=aiohttp.ClientTimeout(total=2)):
                return False
    except aiohttp.ClientConnectorError:
        return True


async def test_sigterm_drains_in_flight_streams_settles_flushes_and_exits_0(tmp_path: Path) -> None:
    receiver = await OtlpReceiver().start()
    try:
        with UpstreamThread() as upstream:
            upstream.route("POST", "/v1/chat/completions", slow_stream(10, 0.15))
            config = tmp_path / "tollgate.yaml"
            config.write_text(server_yaml(upstream.api_base, tmp_path / "ledger.db"))
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                # Spans would wait 10 minutes for a batch: only the shutdown flush sends them.
                "OTEL_BSP_SCHEDULE_DELAY": "600000",
            }
            server = await start_server_process(config, tmp_path, env=env)
            try:
                async with aiohttp.ClientSession() as session:
                    resp = await open_stream(session, server)
                    rid = resp.headers["X-Request-Id"]
                    t_term = time.monotonic()
                    server.proc.send_signal(signal.SIGTERM)
                    await server.wait_log("draining requests in flight")
                    # Stops accepting at once...
                    assert await refused(server)
                    # ...while the stream in flight runs to its end.
                    rest = await resp.read()
                    assert rest.endswith(b"data: [DONE]\n\n") and b"t9 " in rest
                code = await asyncio.to_thread(server.proc.wait, 20)
                assert code == 0, server.log_text()
                print(f"SIGTERM drain: exited {time.monotonic() - t_term:.2f} s after the signal")
            finally:
                server.kill()
        rows = {r["request_id"]: r for r in spend_rows(tmp_path / "ledger.db")}
        assert rows[rid]["outcome"] == "ok" and rows[rid]["output_tokens"] == 10
        line = next(r for r in server.access_log() if r["request_id"] == rid)
        assert line["outcome"] == "ok"
        spans = await receiver.wait_for_spans(1, timeout=5)
        assert [s for s in spans if s.attributes.get("tollgate.request_id") == rid]
        assert "stopped" in server.log_text()
    finally:
        await receiver.stop()


async def test_sigterm_cancels_what_outlives_the_grace_and_records_it(tmp_path: Path) -> None:
    with UpstreamThread() as upstream:
        upstream.route("POST", "/v1/chat/completions", slow_stream(100, 0.1))
        config = tmp_path / "tollgate.yaml"
        config.write_text(server_yaml(upstream.api_base, tmp_path / "ledger.db"))
        server = await start_server_process(config, tmp_path, env={"TOLLGATE_SHUTDOWN_GRACE_SECONDS": "0.5"})
        try:
            async with aiohttp.ClientSession() as session:
                resp = await open_stream(session, server)
                rid = resp.headers["X-Request-Id"]
                t_term = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()  # cut: no terminating chunk, so no client takes it as whole
            code = await asyncio.to_thread(server.proc.wait, 20)
            took = time.monotonic() - t_term
            assert code == 0 and took < 5.0, (code, took)
        finally:
            server.kill()
        assert upstream.fake is not None and upstream.fake.disconnects  # the upstream request was cancelled too
    row = next(r for r in spend_rows(tmp_path / "ledger.db") if r["request_id"] == rid)
    assert row["outcome"] == "proxy_error" and row["output_tokens"] > 0 and row["cost_nanos"] > 0
    line = next(r for r in server.access_log() if r["request_id"] == rid)
    assert (line["outcome"], line["error_type"]) == ("proxy_error", "shutdown")


async def test_sighup_reloads_a_valid_config_and_rejects_an_invalid_one(tmp_path: Path) -> None:
    with UpstreamThread() as upstream:
        upstream.route("POST", "/v1/chat/completions", slow_stream(8, 0.1))
        config = tmp_path / "tollgate.yaml"
        original = server_yaml(upstream.api_base, tmp_path / "ledger.db")
        config.write_text(original)
        server = await start_server_process(config, tmp_path)
        local = {**CHAT, "model": "local-7b"}
        try:
            async with aiohttp.ClientSession() as session:

                async def ask(body: Mapping[str, object]) -> tuple[int, bytes]:
                    async with session.post(server.base_url + "/chat/completions", data=orjson.dumps(body)) as r:
                        return r.status, await r.read()

                status, body = await ask(local)
                assert status == 404 and orjson.loads(body)["error"]["code"] == "model_not_found"

                # An invalid file: rejected, logged, and the old config keeps serving.
                config.write_text("upstreams: [this is not a mapping\n")
                server.proc.send_signal(signal.SIGHUP)
                await server.wait_log("config reload rejected")
                assert (await ask(CHAT))[0] == 200
                assert (await ask(local))[0] == 404
                assert await server.metric("tollgate_config_reloads_total", result="rejected") == 1

                # A valid one with a new route: applied to new requests, while a stream
                # started before the reload runs on to its end.
                in_flight = await open_stream(session, server)
                config.write_text(
                    original.replace(
                        "routes:\n",
                        'routes:\n  - models: ["local-*"]\n    upstream: openai\n    model: gpt-4o-mini\n',
                        1,
                    ).replace("  port: 0\n", "  port: 1\n", 1)  # server.port: restart-only
                )
                server.proc.send_signal(signal.SIGHUP)
                await server.wait_log("config reloaded")
                assert "changes to server need a restart" in server.log_text()
                status, body = await ask(local)
                assert status == 200, body
                assert upstream.fake is not None and upstream.fake.requests[-1].json["model"] == "gpt-4o-mini"
                assert (await in_flight.read()).endswith(b"data: [DONE]\n\n")
                assert await server.metric("tollgate_config_reloads_total", result="applied") == 1
                # The listener did not move.
                assert (await ask(CHAT))[0] == 200
            assert server.stop() == 0
        finally:
            server.kill()


@pytest.mark.parametrize("bad", ["", "upstreams: {}\n", "routes: 5\n"])
async def test_reload_config_rejects_each_invalid_file_without_touching_the_app(tmp_path: Path, bad: str) -> None:
    from aiohttp import web
    from prometheus_client import CollectorRegistry

    from proxy.app import make_app
    from proxy.config_file import load_settings
    from proxy.serve import reload_config, settings_loader
    from proxy.state import RUNTIME

    config = tmp_path / "t.yaml"
    config.write_text(server_yaml("http://127.0.0.1:9/v1", tmp_path / "l.db"))
    app: web.Application = make_app(load_settings(config), registry=CollectorRegistry())
    before = app[RUNTIME].settings
    config.write_text(bad)
    assert await reload_config(app, settings_loader(config)) is False
    assert app[RUNTIME].settings is before
    faults = app[RUNTIME].faults
    assert faults is not None
    assert faults.reloads.labels("rejected")._value.get() == 1


async def test_sigterm_when_idle_stops_at_once_even_with_a_llama_server_that_is_not_there(tmp_path: Path) -> None:
    """An idle proxy whose llama-server upstream is down (its /props look-up still
    retrying) stops promptly: nothing waits on that look-up. The bound is a loaded 2-core
    machine's: idle, the stop itself takes well under a second."""
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = tmp_path / "tollgate.yaml"
    cfg.write_text(server_yaml(dead + "/v1", tmp_path / "ledger.db").replace(
        "routes:", f"  llamacpp:\n    kind: llamacpp\n    base_url: {dead}\nroutes:", 1
    ))
    server = await start_server_process(cfg, tmp_path)
    await asyncio.sleep(1.0)  # the /props loop is in its retries by now
    t = time.monotonic()
    assert server.stop(timeout=15) == 0
    took = time.monotonic() - t
    print(f"\nidle SIGTERM with an absent llama-server: exited in {took:.2f} s")
    assert took < 3.0, server.log_text()


_METRICS_URL = re.compile(r"metrics: http://127\.0\.0\.1:(\d+)/metrics")


async def test_sigterm_then_immediate_restart_binds_the_same_ports(tmp_path: Path) -> None:
    """Issue 15: a restart straight after SIGTERM failed on the metrics port. The stopped
    server closed its end of scraped connections first, leaving them in TIME_WAIT, and a
    listener bound without SO_REUSEADDR cannot take the port while they last (a minute).
    Both ports are picked by the kernel on the first start (port 0) and asked for again by
    the restart; each stop, idle, must be quick (< 1 s target; 3 s bound for a loaded
    2-core machine)."""
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = tmp_path / "tollgate.yaml"
    cfg.write_text(server_yaml(dead + "/v1", tmp_path / "ledger.db"))
    first = await start_server_process(cfg, tmp_path)
    found = _METRICS_URL.search(first.log_text())
    assert found, first.log_text()
    api_port, metrics_port = first.port, int(found.group(1))
    # Connections the server itself closes at shutdown: a scrape and an API request held
    # open by keep-alive.
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            assert r.status == 200
            await r.read()
        async with s.get(f"http://127.0.0.1:{api_port}/healthz") as r:
            assert r.status == 200
        t = time.monotonic()
        assert first.stop(timeout=15) == 0
        took = time.monotonic() - t
    assert took < 3.0, first.log_text()
    env = {"TOLLGATE_PORT": str(api_port), "TOLLGATE_METRICS_PORT": str(metrics_port)}
    (tmp_path / "again").mkdir()
    second = await start_server_process(cfg, tmp_path / "again", env=env)
    try:
        assert second.port == api_port
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert r.status == 200
    finally:
        t = time.monotonic()
        assert second.stop(timeout=15) == 0
        again = time.monotonic() - t
    print(f"\nidle SIGTERM: {took:.2f} s, then {again:.2f} s after the restart")
    assert again < 3.0, second.log_text()

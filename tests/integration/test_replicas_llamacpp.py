"""A replicated llama.cpp upstream over two real llama-servers (CPU, Gemma 3 270M, one slot
each, small context), driven by the official openai SDK: the choice follows the servers'
free slots (`/slots`), a killed server costs the client nothing, and its health gauge
flips. Needs LLAMA_SERVER and LLAMA_MODEL, like test_real_llamacpp.py; never skips."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from proxy import engine_telemetry
from tests.integration.conftest import Proxy, StartProxy
from tests.integration.test_real_llamacpp import sample, scrape
from tests.support.llama_server import LlamaServer, LlamaServerError
from tests.support.procs import wait_until

PROMPT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture
def two_servers() -> Iterator[tuple[LlamaServer, LlamaServer]]:
    """Two llama-servers, one slot each (-np 1) and a small context, so a single request
    fills one."""
    servers: list[LlamaServer] = []
    problem = None
    try:
        for _ in range(2):
            env = LlamaServer.from_env()
            server = LlamaServer(env.executable, env.model, extra_args=("-c", "512", "-np", "1"))
            server.start()
            servers.append(server)
    except LlamaServerError as exc:
        problem = str(exc)
    if problem is not None:
        for s in servers:
            s.stop()
        pytest.fail(problem, pytrace=False)
    try:
        yield servers[0], servers[1]
    finally:
        for s in servers:
            s.stop()


def config(a: LlamaServer, b: LlamaServer) -> str:
    return f"""
server: {{host: 127.0.0.1, port: 0}}
timeouts: {{connect: 2, first_byte: 60, idle: 60}}
upstreams:
  local:
    kind: llamacpp
    replicas:
      - {{base_url: "{a.url}", name: a}}
      - {{base_url: "{b.url}", name: b}}
    # One check at start; after that only failed connects mark a replica down, so the
    # kill below is met by requests, not by a check.
    health_check: {{interval: 60, timeout: 1, eject_for: 30}}
routes:
  - models: ["local"]
    upstream: local
    model: "models/gemma-3-270m-q4_k_m.gguf"
metrics: {{host: 127.0.0.1, port: 0}}
"""


def client(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-client", max_retries=0, timeout=60)


async def ask(sdk: openai.AsyncOpenAI, stream: bool = False) -> str:
    messages: Any = PROMPT
    if stream:
        chunks = [
            c async for c in await sdk.chat.completions.create(
                model="local", messages=messages, max_tokens=6, temperature=0, stream=True
            )
        ]
        return "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    done = await sdk.chat.completions.create(model="local", messages=messages, max_tokens=6, temperature=0)
    return done.choices[0].message.content or ""


def served_by(proxy: Proxy) -> list[str | None]:
    return [json.loads(line).get("replica") for line in proxy.log_lines()]


async def gauge(proxy: Proxy, name: str, replica: str) -> float:
    return sample(await scrape(proxy.metrics_url), name, upstream="local", replica=replica)


async def test_free_slots_choose_and_a_killed_server_costs_nothing(
    start_proxy: StartProxy, two_servers: tuple[LlamaServer, LlamaServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_servers
    monkeypatch.setattr(engine_telemetry, "SCRAPE_INTERVAL", 0.1)
    proxy = await start_proxy(config(a, b))
    replicas = proxy.runtime.upstreams["local"].replicas
    assert replicas is not None
    by_name = replicas.by_name
    await wait_until(lambda: by_name["a"].slots_free == 1 and by_name["b"].slots_free == 1, "both scraped", 20)
    sdk = client(proxy)

    # Both idle: requests alternate.
    for i in range(4):
        assert await ask(sdk, stream=i % 2 == 1)
    assert sorted(served_by(proxy)) == ["a", "a", "b", "b"]

    # Another client (not through Tollgate) fills a's only slot: Tollgate has nothing in
    # flight there, only /slots can tell, and every request goes to b meanwhile.
    async with aiohttp.ClientSession() as direct:
        body = {"prompt": "Count slowly:", "max_tokens": 400, "ignore_eos": True, "stream": True, "temperature": 0}
        async with direct.post(a.url + "/v1/completions", json=body) as busy:
            assert busy.status == 200
            await busy.content.readany()  # generating
            await wait_until(lambda: by_name["a"].slots_free == 0, "a's slot seen busy", 20)
            assert await gauge(proxy, "tollgate_replica_in_flight_requests", "a") == 0
            for _ in range(3):
                assert await ask(sdk)
            # Closing the connection stops a's generation.
    print(f"\nserved by: {served_by(proxy)}")
    assert served_by(proxy)[4:] == ["b", "b", "b"]

    # a dies between two rounds: the clients see no error at all.
    assert await gauge(proxy, "tollgate_replica_up", "a") == 1
    await asyncio.to_thread(a.stop)
    results = await asyncio.gather(*(ask(sdk, stream=i % 2 == 0) for i in range(4)))
    assert all(results)
    log = [json.loads(line) for line in proxy.log_lines()]
    assert [rec["status"] for rec in log] == [200] * 11
    assert {rec["replica"] for rec in log[7:]} == {"b"}
    assert await gauge(proxy, "tollgate_replica_up", "a") == 0
    assert await gauge(proxy, "tollgate_replica_up", "b") == 1
    failures = await gauge(proxy, "tollgate_replica_connect_failures_total", "a")
    served_b = await gauge(proxy, "tollgate_replica_requests_total", "b")
    print(f"after the kill: connect failures on a {failures:.0f}, requests served by b {served_b:.0f}")
    assert served_b == 9 and failures >= 1
    assert any(rec.get("replica_connect_failures") == ["a"] for rec in log[7:])
    # The upstream's engine gauges add up what answers: b's one slot.
    await wait_until(lambda: by_name["a"].slots_free is None, "a's scrape gone", 10)
    text = await scrape(proxy.metrics_url)
    assert sample(text, "tollgate_llamacpp_slots_total", upstream="local") == 1

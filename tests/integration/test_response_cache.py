"""The response cache end to end: the official openai SDK through a real Tollgate in front of
the fake OpenAI upstream, with the cache in SQLite and in a real Redis. Plain and streamed
answers, hits replayed with the original chunking (read off the wire as HTTP chunks), the
RFC 9211 Cache-Status header, bypass and opt-in, scopes, eviction, TTL, budgets, and the
spend log's cost-0 rows with their savings."""

from __future__ import annotations

import asyncio
import copy
import io
import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import orjson
import pytest

from proxy.cli_ledger import write_spend_table
from proxy.response_cache import Entry
from proxy.state import RUNTIME
from tests.integration.conftest import Proxy, StartProxy, proxy_yaml
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import FakeUpstream, Reply, openai_error_body, openai_usage_aware
from tests.support.procs import free_port
from tests.support.redis_server import RedisServer

MODEL = "gpt-5-nano"
USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 200,
    "total_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}
PRICES = f"""
pricing:
  models:
    {MODEL}: {{input: 2.50, cached_input: 1.25, output: 10.00}}
"""
# (600 uncached * 2.50 + 400 cached * 1.25 + 200 * 10.00) per 1M tokens
COST = Decimal("0.004")
MESSAGES: list[Any] = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        prefix = f"t{abs(hash(request.node.nodeid)) % 10**9}"
        return f"backend: redis\n  redis_url: {server.url}\n  key_prefix: {prefix}"
    return f"backend: sqlite\n  path: {tmp_path / 'cache.db'}"


def routes(fake: FakeUpstream) -> None:
    chat_body = orjson.loads(openai_capture("chat-basic").body)
    chat_body["usage"] = USAGE
    plain = Reply.json(chat_body)
    # Events 10 ms apart, so each reaches Tollgate in a read of its own.
    stream = openai_usage_aware(openai_capture("chat-streaming"), USAGE, gap=0.01)
    broken = Reply(status=500, headers=[("Content-Type", "application/json")],
                   chunks=[openai_error_body("The server had an error", "server_error")])

    stopped_by_cap = copy.deepcopy(chat_body)
    stopped_by_cap["choices"][0]["finish_reason"] = "length"

    def chat(request: Any) -> Reply:
        body = request.json
        content = body.get("messages", [{}])[0].get("content")
        if content == "break":
            return broken
        if content == "long":
            return Reply.json(stopped_by_cap)
        return stream(request) if body.get("stream") else plain

    fake.route("POST", "/v1/chat/completions", chat)
    fake.replay(openai_capture("embeddings-basic"))


async def start(
    start_proxy: StartProxy, fake: FakeUpstream, backend: str, extra: str = "", cache: str = "", ttl: float = 60
) -> Proxy:
    routes(fake)
    config = f"""
{PRICES}
response_cache:
  enabled: true
  {backend}
  ttl_seconds: {ttl}
{cache}
{extra}
"""
    return await start_proxy(proxy_yaml(fake.api_base, extra=config))


def client(proxy: Proxy, key: str = "sk-client", **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=key, max_retries=0, timeout=10, default_headers=headers)


async def spend_rows(proxy: Proxy) -> list[dict[str, Any]]:
    """The spend log's rows, oldest first, once every settlement in flight has landed."""
    rt = proxy.app[RUNTIME]
    await asyncio.gather(*rt.background, return_exceptions=True)
    path = rt.settings.ledger.path
    with sqlite3.connect(path) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM spend_log ORDER BY seq")]


async def writes_done(proxy: Proxy) -> None:
    cache = proxy.app[RUNTIME].response_cache
    assert cache is not None
    await asyncio.gather(*cache.writes)


def metric(proxy: Proxy, name: str, **labels: str) -> float:
    return proxy.registry.get_sample_value(name, labels) or 0.0


async def test_plain_chat_hit_is_free_and_identical(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    proxy = await start(start_proxy, fake_openai, backend)
    c = client(proxy)
    first = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert first.headers["cache-status"] == "tollgate; fwd=uri-miss; fwd-status=200; stored"
    assert Decimal(first.headers["x-tollgate-cost-usd"]) == COST
    await writes_done(proxy)
    # Key order and spacing do not matter: the key is over the parsed body.
    second = await c.chat.completions.with_raw_response.create(temperature=0, messages=MESSAGES, model=MODEL)
    assert second.headers["cache-status"].startswith("tollgate; hit; ttl=")
    assert 0 < int(second.headers["cache-status"].rsplit("=", 1)[1]) <= 60
    assert second.headers["x-tollgate-cost-usd"] == "0"
    assert Decimal(second.headers["x-tollgate-saved-usd"]) == COST
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert second.content == first.content
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert len(fake_openai.requests) == 1
    # A client that asked for usage.cost sees the hit's: 0.
    with_cost = await client(proxy, **{"x-tollgate-include-cost": "true"}).chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0
    )
    assert with_cost.usage is not None and with_cost.usage.model_extra is not None
    assert with_cost.usage.model_extra["cost"]["total_usd"] == 0 and len(fake_openai.requests) == 1

    rows = await spend_rows(proxy)
    assert [(r["cache"], Decimal(r["cost_nanos"]) / 10**9, Decimal(r["saved_nanos"]) / 10**9) for r in rows] == [
        ("miss", COST, 0), ("hit", 0, COST), ("hit", 0, COST),
    ]
    assert rows[1]["input_tokens"] == 0 and rows[1]["outcome"] == "ok"
    rt = proxy.app[RUNTIME]
    now = rt.clock()
    report = await rt.ledger.spend_report(now - timedelta(days=1), now + timedelta(days=1), [])
    assert [(r["requests"], r["cost"], r["saved"]) for r in report] == [(3, COST, 2 * COST)]
    table = io.StringIO()
    write_spend_table(report, [], table)
    assert table.getvalue().split()[:8] == ["requests", "input", "cached", "output", "reasoning", "cost_usd", "saved_usd", "3"]
    labels = {"model": "gpt-*", "upstream": "openai", "endpoint": "chat.completions"}
    assert metric(proxy, "tollgate_response_cache_hits_total", **labels) == 2
    assert metric(proxy, "tollgate_response_cache_misses_total", **labels) == 1
    assert metric(proxy, "tollgate_response_cache_stores_total", **labels) == 1
    assert metric(proxy, "tollgate_response_cache_saved_usd_total", model="gpt-*", upstream="openai", key="none") == float(2 * COST)
    # The hit billed nothing: the cost counter holds the first request's cost alone.
    assert metric(proxy, "tollgate_cost_usd_total", model="gpt-*", upstream="openai", key="none") == float(COST)


def _chunk_frames(raw: bytes) -> tuple[bytes, list[bytes]]:
    """(head, the body's HTTP/1.1 chunks as framed on the wire)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    frames = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return head, frames
        frames.append(rest[:size])
        rest = rest[size + 2 :]


async def raw_post(proxy: Proxy, body: dict[str, Any]) -> tuple[bytes, list[bytes]]:
    """POST over a bare socket, so the response's chunk framing is seen as sent."""
    url = urlsplit(proxy.url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    data = orjson.dumps(body)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-client\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data
    )
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return _chunk_frames(raw)


async def test_stream_hit_replays_the_original_chunks(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    proxy = await start(start_proxy, fake_openai, backend)
    body = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "stream": True}
    head1, frames1 = await raw_post(proxy, body)
    assert b"cache-status: tollgate; fwd=uri-miss; fwd-status=200; stored" in head1.lower()
    await writes_done(proxy)
    head2, frames2 = await raw_post(proxy, body)
    assert b"cache-status: tollgate; hit; ttl=" in head2.lower()
    # The same HTTP chunks, one per upstream SSE event, with Tollgate's usage injection
    # undone on both (the client did not ask for usage).
    assert frames2 == frames1
    assert len(frames1) > 5
    assert b"".join(frames1) == openai_capture("chat-streaming").body
    assert len(fake_openai.requests) == 1

    # Through the SDK: the same text, and a client that asks for usage gets its own entry.
    c = client(proxy)
    stream = await c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stream=True)
    text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
    assert text and len(fake_openai.requests) == 1
    with_usage = await c.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    usage = [ch.usage async for ch in with_usage if ch.usage is not None]
    assert usage and usage[0].prompt_tokens == 1000
    assert len(fake_openai.requests) == 2
    rows = await spend_rows(proxy)
    assert [r["cache"] for r in rows] == ["miss", "hit", "hit", "miss"]
    assert [Decimal(r["saved_nanos"]) / 10**9 for r in rows] == [0, COST, COST, 0]


async def test_what_is_cached_and_what_bypasses(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    proxy = await start(start_proxy, fake_openai, backend)
    c = client(proxy)

    async def status(**kw: Any) -> str:
        headers = kw.pop("headers", {})
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, extra_headers=headers, **kw)
        await writes_done(proxy)
        return raw.headers["cache-status"]

    # No temperature: OpenAI samples at 1, so the answer is not reused.
    assert await status() == "tollgate; fwd=bypass; fwd-status=200"
    assert await status() == "tollgate; fwd=bypass; fwd-status=200"
    assert await status(temperature=0, n=2) == "tollgate; fwd=bypass; fwd-status=200"
    assert len(fake_openai.requests) == 3
    # Opting in caches a sampled answer.
    opt_in = {"x-tollgate-cache": "on"}
    assert (await status(headers=opt_in)).endswith("stored")
    assert (await status(headers=opt_in)).startswith("tollgate; hit")
    assert len(fake_openai.requests) == 4
    # no-cache: not served from the cache, the fresh answer stored; no-store: neither.
    assert await status(temperature=0, headers={"Cache-Control": "no-cache"}) == (
        "tollgate; fwd=request; fwd-status=200; stored"
    )
    assert (await status(temperature=0)).startswith("tollgate; hit")
    assert await status(temperature=0.0, seed=1, headers={"Cache-Control": "no-store"}) == (
        "tollgate; fwd=request; fwd-status=200"
    )
    assert (await status(temperature=0.0, seed=1)).endswith("; stored")
    assert await status(temperature=0, headers={"x-tollgate-cache": "off"}) == "tollgate; fwd=request; fwd-status=200"
    assert len(fake_openai.requests) == 8
    # An upstream error is relayed, never stored.
    broken = [{"role": "user", "content": "break"}]
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as info:
            await c.chat.completions.create(model=MODEL, messages=broken, temperature=0)
        assert info.value.response.headers["cache-status"] == "tollgate; fwd=uri-miss; fwd-status=500"
    # Embeddings are deterministic without asking.
    emb = openai_capture("embeddings-basic").request_json
    for expected in ("stored", "hit"):
        raw = await c.embeddings.with_raw_response.create(**emb)
        await writes_done(proxy)
        assert expected in raw.headers["cache-status"]
    assert len(fake_openai.requests) == 11
    # The x-tollgate-cache header never goes upstream.
    assert all("x-tollgate-cache" not in {k.lower() for k in r.headers} for r in fake_openai.requests)


async def test_scope_key_keeps_credentials_apart(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    proxy = await start(start_proxy, fake_openai, backend)
    for key, expected in (("sk-alice", "stored"), ("sk-bob", "stored"), ("sk-alice", "hit")):
        raw = await client(proxy, key).chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
        await writes_done(proxy)
        assert expected in raw.headers["cache-status"], key
    assert len(fake_openai.requests) == 2


async def test_size_bound_evicts_least_recently_used(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    proxy = await start(start_proxy, fake_openai, backend, cache="  max_entries: 2")
    c = client(proxy)

    async def ask(word: str) -> str:
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": word}], temperature=0
        )
        await writes_done(proxy)
        return raw.headers["cache-status"]

    assert (await ask("a")).endswith("stored")
    assert (await ask("b")).endswith("stored")
    assert (await ask("a")).startswith("tollgate; hit")  # a is now the most recent
    assert (await ask("c")).endswith("stored")  # evicts b
    assert (await ask("a")).startswith("tollgate; hit")
    assert (await ask("b")).endswith("stored")  # b was evicted: a miss, and c goes
    assert (await ask("c")).endswith("stored")
    assert metric(proxy, "tollgate_response_cache_evictions_total", reason="size") == 3
    assert len(fake_openai.requests) == 5


async def test_entries_expire_after_the_ttl(start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str) -> None:
    proxy = await start(start_proxy, fake_openai, backend, ttl=1.5)
    c = client(proxy)
    for _ in range(2):
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
        await writes_done(proxy)
    assert raw.headers["cache-status"].startswith("tollgate; hit")
    await asyncio.sleep(1.8)
    raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert raw.headers["cache-status"].endswith("stored")
    assert len(fake_openai.requests) == 2


async def test_a_hit_is_served_when_the_budget_is_spent(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    budget = """
budgets:
  - name: one-request
    period: daily
    limit_requests: 1
"""
    proxy = await start(start_proxy, fake_openai, backend, extra=budget)
    c = client(proxy)
    await c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    await writes_done(proxy)
    raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert raw.headers["cache-status"].startswith("tollgate; hit")
    with pytest.raises(openai.RateLimitError):
        await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "new"}], temperature=0)
    assert len(fake_openai.requests) == 1


async def test_an_answer_stopped_by_a_cap_the_budget_wrote_is_not_stored(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    """Under a blocking budget a capless request carries the assumed cap: an answer that
    ended before it is stored, one that stopped at it (`length`) is not."""
    budget = """
default_max_tokens: 5
budgets:
  - name: roomy
    period: daily
    limit_usd: 100
"""
    proxy = await start(start_proxy, fake_openai, backend, extra=budget)
    c = client(proxy)
    for content, expected in (
        ("long", "tollgate; fwd=uri-miss; fwd-status=200"),
        ("long", "tollgate; fwd=uri-miss; fwd-status=200"),
        ("Say hi", "tollgate; fwd=uri-miss; fwd-status=200; stored"),
        ("Say hi", "tollgate; hit"),
    ):
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": content}], temperature=0
        )
        await writes_done(proxy)
        status = raw.headers["cache-status"]
        assert status.startswith(expected) if "hit" in expected else status == expected, content
    assert fake_openai.requests[0].json["max_completion_tokens"] == 5
    assert len(fake_openai.requests) == 3


async def test_stored_entry_is_what_the_client_got(start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path) -> None:
    proxy = await start(start_proxy, fake_openai, f"backend: sqlite\n  path: {tmp_path / 'cache.db'}")
    raw = await client(proxy).chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
    await writes_done(proxy)
    with sqlite3.connect(tmp_path / "cache.db") as conn:
        (blob,) = conn.execute("SELECT blob FROM entries").fetchone()
    entry = Entry.decode(blob)
    assert entry is not None and b"".join(entry.chunks) == raw.content
    assert entry.usage is not None and entry.usage.input_tokens == 1000 and entry.usage.cached_input_tokens == 400


async def test_cache_off_adds_nothing(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    routes(fake_openai)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=PRICES))
    assert proxy.app[RUNTIME].response_cache is None
    for _ in range(2):
        raw = await client(proxy).chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
        assert "cache-status" not in raw.headers
    assert len(fake_openai.requests) == 2
    async with aiohttp.ClientSession() as s, s.get(proxy.metrics_url) as r:
        assert "tollgate_response_cache" not in await r.text()
    rows = await spend_rows(proxy)
    assert [(r["cache"], r["saved_nanos"]) for r in rows] == [(None, 0), (None, 0)]


async def test_a_cache_that_cannot_be_reached_never_fails_a_request(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proxy = await start(start_proxy, fake_openai, f"backend: redis\n  redis_url: {dead}")
    c = client(proxy)
    for _ in range(2):
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
        await writes_done(proxy)
        assert raw.headers["cache-status"].startswith("tollgate; fwd=uri-miss; fwd-status=200")
        assert raw.parse().choices[0].message.content
    assert len(fake_openai.requests) == 2
    assert metric(proxy, "tollgate_response_cache_errors_total", op="get") == 2
    assert metric(proxy, "tollgate_response_cache_errors_total", op="put") == 2


async def test_a_stream_carrying_the_clients_own_cost_is_not_stored(
    start_proxy: StartProxy, fake_openai: FakeUpstream, backend: str
) -> None:
    # The usage chunk of a client that opted into usage.cost holds that request's cost: bytes
    # no other request may be answered with (a hit costs 0), so the answer is not filed.
    proxy = await start(start_proxy, fake_openai, backend)
    c = client(proxy, **{"x-tollgate-include-cost": "true"})
    for n in (1, 2):
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        assert raw.headers["cache-status"] == "tollgate; fwd=uri-miss; fwd-status=200"
        usage = [ch.usage async for ch in raw.parse() if ch.usage is not None]
        assert usage and (usage[0].model_extra or {}).get("cost", {}).get("total_usd") is not None
        await writes_done(proxy)
        assert len(fake_openai.requests) == n

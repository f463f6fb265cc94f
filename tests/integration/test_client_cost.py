"""Cost where the client sees it: x-tollgate-cost-* headers on non-stream responses, and the
opt-in `usage.cost` in the body and in a stream's usage chunk, read through the official
openai SDK."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from proxy.keys import hash_key
from proxy.pricing import plain_usd
from proxy.sse import SSEEvent, SSEParser
from tests.integration.conftest import StartProxy, proxy_yaml
from tests.support.cassettes import OPENAI_DIR, OPENAI_EXTRA_DIR, openai_capture
from tests.support.fake_upstream import FakeUpstream, Reply, StreamDialect, dialect_usage_aware, openai_usage_aware
from tests.support.recorder import Recorder

KEY = "tg-cost-key-0123456789"
PRICES = """
pricing:
  models:
    gpt-priced: {input: 2.50, cached_input: 1.25, output: 10.00}
"""
USAGE = {
    "prompt_tokens": 1000,
    "completion_tokens": 200,
    "total_tokens": 1200,
    "prompt_tokens_details": {"cached_tokens": 400, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


def chat_body(model: str) -> bytes:
    # Spacing and key order of the upstream's own output, kept byte for byte by the proxy.
    return (
        b'{\n  "id": "chatcmpl-1",\n  "object": "chat.completion",\n  "model": "' + model.encode()
        + b'",\n  "choices": [{"index": 0, "message": {"role": "assistant", "content": "the \\"usage\\": {} word"},'
        b' "finish_reason": "stop"}],\n  "usage": ' + orjson.dumps(USAGE) + b',\n  "system_fingerprint": "fp_x"\n}\n'
    )


def client(base_url: str, key: str = "sk-client", **headers: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10, default_headers=headers)


async def test_headers_carry_cost_and_body_is_untouched(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    fake_openai.route("POST", "/v1/chat/completions", Reply.json(orjson.loads(chat_body("gpt-priced"))))
    upstream_body = Reply.json(orjson.loads(chat_body("gpt-priced"))).body
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=PRICES))
    raw = await client(proxy.base_url).chat.completions.with_raw_response.create(
        model="gpt-priced", messages=[{"role": "user", "content": "hi"}]
    )
    # (600 uncached * 2.50 + 400 cached * 1.25 + 200 * 10.00) per 1M tokens
    assert Decimal(raw.headers["x-tollgate-cost-usd"]) == Decimal("0.004")
    assert Decimal(raw.headers["x-tollgate-cost-input-usd"]) == Decimal("0.0015")
    assert Decimal(raw.headers["x-tollgate-cost-cached-input-usd"]) == Decimal("0.0005")
    assert Decimal(raw.headers["x-tollgate-cost-output-usd"]) == Decimal("0.002")
    assert "E" not in raw.headers["x-tollgate-cost-usd"]
    assert raw.headers["x-tollgate-cost-source"] == "price_table"
    assert float(raw.headers["x-tollgate-overhead-ms"]) >= 0
    assert raw.http_response.content == upstream_body
    completion = raw.parse()
    assert completion.usage is not None and "cost" not in (completion.usage.model_extra or {})
    # What the client saw is what was accounted.
    seen = await fake_openai.wait_request()
    assert "x-tollgate-include-cost" not in {k.lower() for k in seen.headers}


async def test_opt_in_by_header_adds_usage_cost_only(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    upstream = chat_body("gpt-priced")
    fake_openai.route("POST", "/v1/chat/completions", Reply(status=200, headers=(("Content-Type", "application/json"),), chunks=(upstream,)))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=PRICES))
    raw = await client(proxy.base_url, **{"x-tollgate-include-cost": "true"}).chat.completions.with_raw_response.create(
        model="gpt-priced", messages=[{"role": "user", "content": "hi"}]
    )
    seen = await fake_openai.wait_request()
    assert "x-tollgate-include-cost" not in {k.lower() for k in seen.headers}
    usage = raw.parse().usage
    assert usage is not None
    extra = usage.model_extra or {}
    assert extra["cost_source"] == "price_table"
    assert extra["cost"] == {"total_usd": 0.004, "input_usd": 0.0015, "cached_input_usd": 0.0005, "output_usd": 0.002}
    assert usage.prompt_tokens == 1000 and usage.completion_tokens == 200
    # Only the usage object was re-serialised: the bytes around it are the upstream's.
    body = raw.http_response.content
    head, _, _ = upstream.partition(b'"usage": {')
    assert body.startswith(head)
    assert body.endswith(b',\n  "system_fingerprint": "fp_x"\n}\n')
    assert b'"content": "the \\"usage\\": {} word"' in body
    assert "content-length" not in raw.headers  # the upstream's was chunked; so is ours


async def test_opt_in_by_key_and_unpriced_is_absent_not_zero(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    fake_openai.route("POST", "/v1/chat/completions", Reply.json(orjson.loads(chat_body("gpt-nobody-prices-this"))))
    keys = f"keys:\n  - name: costly\n    key_sha256: {hash_key(KEY)}\n    include_cost: true\n"
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=keys, openai_key=None))
    raw = await client(proxy.base_url, KEY).chat.completions.with_raw_response.create(
        model="gpt-nobody-prices-this", messages=[{"role": "user", "content": "hi"}]
    )
    headers = {k.lower() for k in raw.headers}
    assert raw.headers["x-tollgate-cost-source"] == "none"
    assert not {"x-tollgate-cost-usd", "x-tollgate-cost-input-usd", "x-tollgate-cost-output-usd"} & headers
    usage = raw.parse().usage
    assert usage is not None and usage.model_extra == {"cost_source": "none"}
    assert usage.prompt_tokens == 1000


async def test_streams_and_errors_carry_no_cost_headers(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("chat-streaming")
    fake_openai.replay(cap)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", data=cap.request_body,
                          headers={"Content-Type": "application/json"}) as r:
            await r.read()
            assert r.status == 200 and "x-tollgate-cost-usd" not in r.headers
    await asyncio.sleep(0)


# --- the stream's usage event ----------------------------------------------------------------------

STREAM_PRICES = """
pricing:
  models:
    gpt-5-nano: {input: 2.50, cached_input: 1.25, output: 10.00}
"""
COST = {"total_usd": 0.004, "input_usd": 0.0015, "cached_input_usd": 0.0005, "output_usd": 0.002}


def sse_events(raw: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(raw) + parser.flush()


async def raw_stream(url: str, body: dict[str, object], **headers: str) -> bytes:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers) as r:
        assert r.status == 200 and "x-tollgate-cost-usd" not in r.headers
        return await r.read()


@pytest.mark.parametrize("dialect", ["openai-capture", "multi-line", "everything-in-7-byte-reads"])
async def test_opted_in_stream_gets_cost_in_the_usage_chunk_it_asked_for(
    start_proxy: StartProxy, fake_openai: FakeUpstream, dialect: str
) -> None:
    cap = openai_capture("chat-streaming")
    if dialect == "openai-capture":
        fake_openai.route("POST", cap.path, openai_usage_aware(cap, USAGE))
    elif dialect == "multi-line":
        fake_openai.route("POST", cap.path, dialect_usage_aware(cap, StreamDialect(indent=2), USAGE))
    else:
        everything = StreamDialect(separators=(", ", ": "), indent=1, usage_first=True, eol="\r\n",
                                   data_prefix="data:", comments=True, retry=True)
        fake_openai.route("POST", cap.path, dialect_usage_aware(cap, everything, USAGE, byte_chunk=7))
    rec = Recorder()
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=STREAM_PRICES), observers=[rec])
    body = {**cap.request_json, "stream_options": {"include_usage": True}}

    sdk = client(proxy.base_url, **{"x-tollgate-include-cost": "true"})
    text: list[str] = []
    usages = []
    async for chunk in await sdk.chat.completions.create(**body):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usages.append(chunk.usage)
    await sdk.close()
    (usage,) = usages
    assert usage.prompt_tokens == 1000 and usage.completion_tokens == 200
    assert usage.model_extra == {"cost": COST, "cost_source": "price_table"}
    assert "".join(text)
    # What the client was shown is what was charged.
    ex = await rec.wait()
    assert ex.cost == Decimal("0.004") and not ex.usage_injected
    assert "x-tollgate-include-cost" not in {k.lower() for k in fake_openai.requests[-1].headers}

    # Event for event the upstream's bytes, but for the usage event's `usage`.
    direct = await raw_stream(fake_openai.api_base + "/chat/completions", body)
    through = await raw_stream(proxy.base_url + "/chat/completions", body, **{"x-tollgate-include-cost": "true"})
    changed = [(a, b) for a, b in zip(sse_events(direct), sse_events(through), strict=True) if a.raw != b.raw]
    assert len(changed) == 1
    old, new = orjson.loads(changed[0][0].data or b""), orjson.loads(changed[0][1].data or b"")
    assert new == {**old, "usage": {**old["usage"], "cost": COST, "cost_source": "price_table"}}
    # Not opted in: the upstream's bytes exactly.
    assert await raw_stream(proxy.base_url + "/chat/completions", body) == direct


async def test_stream_cost_by_key_unpriced_and_never_when_usage_was_not_asked(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    cap = openai_capture("chat-streaming")
    fake_openai.route("POST", cap.path, openai_usage_aware(cap, USAGE))
    keys = f"keys:\n  - name: costly\n    key_sha256: {hash_key(KEY)}\n    include_cost: true\n"
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, extra=keys, openai_key=None))
    sdk = client(proxy.base_url, KEY)
    body = {**cap.request_json, "model": "gpt-nobody-prices-this"}
    asked = [c async for c in await sdk.chat.completions.create(**body, stream_options={"include_usage": True})]
    (usage,) = [c.usage for c in asked if c.usage is not None]
    assert usage.model_extra == {"cost_source": "none"}  # absent, never 0
    # The client did not ask for usage: Tollgate's own usage event is stripped, cost and all.
    plain = [c async for c in await sdk.chat.completions.create(**body)]
    assert all(c.usage is None and c.choices for c in plain)
    await sdk.close()


@pytest.mark.parametrize(
    ("name", "directory"),
    [("chat-streaming-detailed-usage", OPENAI_DIR), ("completion-streaming-usage", OPENAI_EXTRA_DIR)],
)
async def test_real_openai_usage_streams_get_the_charged_cost(
    start_proxy: StartProxy, fake_openai: FakeUpstream, name: str, directory: Path
) -> None:
    """OpenAI's own include_usage streams, replayed as captured (shipped prices): the usage
    chunk carries exactly what the spend row is charged, and nothing else changes."""
    cap = openai_capture(name, directory)
    assert cap.request_json["stream_options"] == {"include_usage": True}
    fake_openai.replay(cap)
    rec = Recorder()
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base), observers=[rec])
    sdk = client(proxy.base_url, **{"x-tollgate-include-cost": "true"})
    create = sdk.chat.completions.create if cap.path.endswith("/chat/completions") else sdk.completions.create
    chunks = [c async for c in await create(**cap.request_json)]
    await sdk.close()
    (usage,) = [c.usage for c in chunks if c.usage is not None]
    ex = await rec.wait()
    assert ex.cost is not None and ex.cost > 0 and ex.cost_parts is not None
    parts = ex.cost_parts
    assert usage.model_extra is not None and usage.model_extra["cost_source"] == "price_table"
    assert usage.model_extra["cost"] == {
        "total_usd": float(parts.total), "input_usd": float(parts.input),
        "cached_input_usd": float(parts.cached_input), "output_usd": float(parts.output),
    }
    raw = await raw_stream(proxy.base_url + cap.path.removeprefix("/v1"), cap.request_json,
                           **{"x-tollgate-include-cost": "true"})
    assert b'"cost":{"total_usd":' + plain_usd(parts.total).encode() + b"," in raw
    changed = [(a, b) for a, b in zip(sse_events(cap.body), sse_events(raw), strict=True) if a.raw != b.raw]
    assert len(changed) == 1

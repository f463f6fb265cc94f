"""The official openai SDK, pointed at the proxy, gets what it gets from the upstream directly."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai
import pytest

from tests.integration.conftest import StartProxy, proxy_yaml
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import (
    FakeUpstream,
    Reply,
    openai_usage_aware,
    responses_body,
    responses_reply,
    responses_stream,
)

USAGE = {
    "prompt_tokens": 8,
    "completion_tokens": 26,
    "total_tokens": 34,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
}


def clients(base_url: str) -> tuple[openai.AsyncOpenAI, openai.OpenAI]:
    kw: dict[str, Any] = {"base_url": base_url, "api_key": "sk-client", "max_retries": 0, "timeout": 10}
    return openai.AsyncOpenAI(**kw), openai.OpenAI(**kw)


async def raw_post(url: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.read(), dict(r.headers)


@pytest.mark.parametrize(
    "name",
    ["chat-basic", "chat-tools", "chat-json-mode", "completion-basic", "embeddings-basic", "embeddings-dimensions"],
)
async def test_non_stream_sdk_results_equal_direct(
    start_proxy: StartProxy, fake_openai: FakeUpstream, name: str
) -> None:
    cap = openai_capture(name)
    fake_openai.replay(cap)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    body = cap.request_json
    results = []
    for base in (fake_openai.api_base, proxy.base_url):
        aclient, sclient = clients(base)
        if cap.path == "/v1/chat/completions":
            a = await aclient.chat.completions.create(**body)
            s = await asyncio.to_thread(lambda: sclient.chat.completions.create(**body))
        elif cap.path == "/v1/completions":
            a = await aclient.completions.create(**body)
            s = await asyncio.to_thread(lambda: sclient.completions.create(**body))
        else:
            a = await aclient.embeddings.create(**body)
            s = await asyncio.to_thread(lambda: sclient.embeddings.create(**body))
        assert a.model_dump(warnings=False) == s.model_dump(warnings=False)
        results.append(a.model_dump(warnings=False))
    assert results[0] == results[1]
    # And the raw bytes too.
    direct = await raw_post(fake_openai.api_base + cap.path[3:], cap.request_body)
    proxied = await raw_post(proxy.base_url + cap.path[3:], cap.request_body)
    assert proxied[:2] == direct[:2] == (200, cap.body)


@pytest.mark.parametrize("name", ["chat-streaming", "completion-streaming"])
async def test_stream_bytes_equal_direct_with_usage_injected_and_stripped(
    start_proxy: StartProxy, fake_openai: FakeUpstream, name: str
) -> None:
    cap = openai_capture(name)
    fake_openai.route("POST", cap.path, openai_usage_aware(cap, USAGE))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))

    direct = await raw_post(fake_openai.api_base + cap.path[3:], cap.request_body)
    proxied = await raw_post(proxy.base_url + cap.path[3:], cap.request_body)
    assert direct[1] == cap.body
    assert proxied[0] == 200
    assert proxied[1] == direct[1]  # byte for byte: usage:null and the usage chunk are gone
    assert proxied[2]["Content-Type"].startswith("text/event-stream")
    assert proxied[2]["X-Accel-Buffering"] == "no"
    # The upstream was asked for usage (the proxy's doing) ...
    sent = fake_openai.requests[-1].json
    assert sent["stream_options"] == {"include_usage": True}
    # ... and the proxy kept it.
    assert fake_openai.requests[0].json.get("stream_options") is None


async def test_stream_sdk_chunks_equal_direct(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("chat-streaming")
    fake_openai.route("POST", cap.path, openai_usage_aware(cap, USAGE))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    got = []
    for base in (fake_openai.api_base, proxy.base_url):
        aclient, sclient = clients(base)
        stream = await aclient.chat.completions.create(**cap.request_json)
        chunks = [c.model_dump() async for c in stream]

        def sync_chunks() -> list[dict[str, Any]]:
            return [c.model_dump() for c in sclient.chat.completions.create(**cap.request_json)]

        assert await asyncio.to_thread(sync_chunks) == chunks
        got.append(chunks)
    assert got[0] == got[1]
    assert all(c["usage"] is None for c in got[1])


async def test_client_that_asks_for_usage_gets_it(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("chat-streaming")
    fake_openai.route("POST", cap.path, openai_usage_aware(cap, USAGE))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    aclient, _ = clients(proxy.base_url)
    stream = await aclient.chat.completions.create(**cap.request_json, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 26


async def test_responses_api_stream_and_non_stream(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    usage = {"input_tokens": 11, "output_tokens": 3, "total_tokens": 14}
    stream_body = responses_stream(["Hel", "lo", "!"], usage)
    plain_body = responses_body("Hello!", usage)

    def reply(req: Any) -> Reply:
        return responses_reply(stream_body if req.json.get("stream") else plain_body, stream=bool(req.json.get("stream")))

    fake_openai.route("POST", "/v1/responses", reply)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    results = []
    for base in (fake_openai.api_base, proxy.base_url):
        aclient, _ = clients(base)
        resp = await aclient.responses.create(model="gpt-4o-mini", input="Say hello")
        events = [e.model_dump() async for e in await aclient.responses.create(model="gpt-4o-mini", input="Say hello", stream=True)]
        results.append((resp.model_dump(), events))
    assert results[0] == results[1]
    assert results[1][0]["output_text"] if "output_text" in results[1][0] else True
    # The Responses API has no stream_options: nothing was injected.
    assert all("stream_options" not in r.json for r in fake_openai.requests)


async def test_upstream_error_passes_through_unchanged(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("chat-bad-request")
    fake_openai.replay(cap)
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    status, body, headers = await raw_post(proxy.base_url + "/chat/completions", cap.request_body)
    assert (status, body) == (cap.status, cap.body)
    assert headers.get("Openai-Processing-Ms") == cap.header("Openai-Processing-Ms")
    aclient, _ = clients(proxy.base_url)
    with pytest.raises(openai.BadRequestError) as info:
        await aclient.chat.completions.create(**cap.request_json)
    assert info.value.status_code == 400


async def test_unknown_model_is_openai_shaped_404(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base))
    aclient, _ = clients(proxy.base_url)
    with pytest.raises(openai.NotFoundError) as info:
        await aclient.chat.completions.create(model="mystery-model", messages=[{"role": "user", "content": "hi"}])
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"  # type: ignore[index]
    assert fake_openai.requests == []


async def test_alias_rewrites_model_for_llamacpp(start_proxy: StartProxy, fake_openai: FakeUpstream, fake_llama: FakeUpstream) -> None:
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, llama_root=fake_llama.url))
    aclient, _ = clients(proxy.base_url)
    resp = await aclient.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=32
    )
    assert resp.usage is not None and resp.usage.prompt_tokens == 47
    assert fake_llama.requests[-1].json["model"] == "models/gemma-3-270m-q4_k_m.gguf"
    # llama.cpp streams: no injection by default for kind llamacpp; timings are read instead.
    stream = await aclient.chat.completions.create(
        model="local", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=8, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    assert "stream_options" not in fake_llama.requests[-1].json

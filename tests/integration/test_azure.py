"""Azure OpenAI clients through Tollgate: `AzureOpenAI(azure_endpoint=<tollgate>)` sends
/openai/deployments/{deployment}/chat/completions?api-version=... (also completions and
embeddings) or, for the v1 API, /openai/v1/...; each is metered like the rest: endpoint,
model (the deployment), tokens, cost or unpriced. The official SDK is the client; the fake
Azure upstream replays real captures (an Azure one and OpenAI's own, served at Azure's
paths: the two answer in the same shape)."""

from __future__ import annotations

import json
from decimal import Decimal

import openai
import pytest

from tests.integration.conftest import StartProxy
from tests.support.cassettes import OPENAI_EXTRA_DIR, openai_capture
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.recorder import Recorder

API_VERSION = "2024-12-01-preview"


def azure_yaml(azure_root: str, *, routes: str | None = None, extra: str = "") -> str:
    return f"""
server:
  host: 127.0.0.1
  port: 0
upstreams:
  azure:
    kind: azure
    base_url: {azure_root}
    api_key: azure-secret
  openai:
    kind: openai
    base_url: {azure_root}/v1
    api_key: sk-upstream-secret
routes:
{routes or '''  - models: ["gpt-*", "text-embedding-*", "prod-chat", "no-price-*"]
    upstream: azure'''}
metrics:
  host: 127.0.0.1
  port: 0
{extra}
"""


def azure_client(proxy_url: str) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=proxy_url, api_version=API_VERSION, api_key="client-key", max_retries=0, timeout=10
    )


async def test_chat_on_a_deployment_is_metered_and_priced(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("azure-chat-basic", OPENAI_EXTRA_DIR)
    fake_openai.replay(cap)  # at /openai/deployments/gpt-5-nano/chat/completions
    rec = Recorder()
    proxy = await start_proxy(azure_yaml(fake_openai.url), observers=[rec])
    client = azure_client(proxy.url)
    raw = await client.chat.completions.with_raw_response.create(**cap.request_json)
    completion = raw.parse()
    assert await raw.http_response.aread() == cap.body
    # The upstream's id reaches the SDK unchanged; Tollgate's is in its own header.
    assert completion._request_id == "c44b65e2-6f05-4899-abbe-9cfe79d74b26"
    ex = await rec.wait()
    assert raw.headers["x-tollgate-request-id"] == ex.request_id
    seen = fake_openai.requests[0]
    assert seen.path == "/openai/deployments/gpt-5-nano/chat/completions"
    assert seen.query["api-version"] == API_VERSION
    assert seen.headers["api-key"] == "azure-secret" and "Authorization" not in seen.headers
    assert (ex.endpoint, ex.requested_model, ex.upstream, ex.outcome) == ("chat.completions", "gpt-5-nano", "azure", "ok")
    assert ex.usage is not None and (ex.usage.input_tokens, ex.usage.output_tokens) == (8, 271)
    assert ex.usage.input_source == "upstream"
    # gpt-5-nano: $0.05 in, $0.40 out per 1M.
    assert ex.priced and ex.cost == (8 * Decimal("0.05") + 271 * Decimal("0.40")) / 1_000_000
    line = json.loads(proxy.log_lines()[-1])
    assert line["endpoint"] == "chat.completions" and line["model"] == "gpt-5-nano"


async def test_streaming_chat_and_embeddings_on_deployments(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    stream_cap = openai_capture("chat-streaming-detailed-usage")
    fake_openai.route("POST", "/openai/deployments/gpt-5-nano/chat/completions", Reply.from_capture(stream_cap))
    emb_cap = openai_capture("embeddings-basic")
    fake_openai.route("POST", "/openai/deployments/text-embedding-3-small/embeddings", Reply.from_capture(emb_cap))
    rec = Recorder()
    proxy = await start_proxy(azure_yaml(fake_openai.url), observers=[rec])
    client = azure_client(proxy.url)
    body = stream_cap.request_json
    chunks = 0
    async with await client.chat.completions.create(**body) as stream:
        async for _chunk in stream:
            chunks += 1
    assert chunks > 1
    ex = await rec.wait()
    assert ex.endpoint == "chat.completions" and ex.stream and ex.requested_model == "gpt-5-nano"
    assert ex.usage is not None and ex.usage.input_source == "upstream" and ex.cost and ex.cost > 0

    emb = await client.embeddings.create(**emb_cap.request_json)
    assert emb.data
    (_, ex2) = await rec.wait_for(2)
    assert (ex2.endpoint, ex2.requested_model) == ("embeddings", "text-embedding-3-small")
    assert ex2.usage is not None and ex2.usage.input_tokens == emb.usage.prompt_tokens and ex2.priced


async def test_v1_api_under_openai(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("chat-basic")
    fake_openai.route("POST", "/openai/v1/chat/completions", Reply.from_capture(cap))
    rec = Recorder()
    proxy = await start_proxy(azure_yaml(fake_openai.url), observers=[rec])
    client = openai.AsyncOpenAI(base_url=proxy.url + "/openai/v1", api_key="client-key", max_retries=0, timeout=10)
    completion = await client.chat.completions.create(**cap.request_json)
    assert completion.choices
    ex = await rec.wait()
    assert fake_openai.requests[0].path == "/openai/v1/chat/completions"
    assert (ex.endpoint, ex.requested_model, ex.upstream) == ("chat.completions", "gpt-5-nano", "azure")
    assert ex.priced and ex.cost and ex.cost > 0


async def test_a_deployment_named_by_its_owner_is_priced_by_the_response_model_or_counted_unpriced(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    cap = openai_capture("azure-chat-basic", OPENAI_EXTRA_DIR)
    fake_openai.route("POST", "/openai/deployments/prod-chat/chat/completions", Reply.from_capture(cap))
    rec = Recorder()
    proxy = await start_proxy(azure_yaml(fake_openai.url), observers=[rec])
    client = azure_client(proxy.url)
    await client.chat.completions.create(model="prod-chat", messages=[{"role": "user", "content": "Hello!"}])
    ex = await rec.wait()
    assert ex.requested_model == "prod-chat" and ex.response_model == "gpt-5-nano-2025-08-07"
    assert ex.priced and ex.cost == (8 * Decimal("0.05") + 271 * Decimal("0.40")) / 1_000_000

    # A response whose model has no price either: cost 0, counted unpriced.
    unknown = json.loads(cap.body)
    unknown["model"] = "no-price-model"
    fake_openai.route("POST", "/openai/deployments/no-price-x/chat/completions", Reply.json(unknown))
    await client.chat.completions.create(model="no-price-x", messages=[{"role": "user", "content": "Hello!"}])
    (_, ex2) = await rec.wait_for(2)
    assert ex2.priced is False and ex2.cost == 0
    metrics = proxy.registry.get_sample_value(
        "tollgate_unpriced_requests_total", {"model": "no-price-*", "upstream": "azure"}
    )
    assert metrics == 1.0


async def test_azure_paths_to_an_openai_layout_upstream(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    cap = openai_capture("chat-basic")
    fake_openai.replay(cap)  # at /v1/chat/completions
    rec = Recorder()
    routes = '''  - models: ["gpt-*"]
    upstream: openai'''
    proxy = await start_proxy(azure_yaml(fake_openai.url, routes=routes), observers=[rec])
    client = azure_client(proxy.url)
    body = {k: v for k, v in cap.request_json.items() if k != "model"}
    completion = await client.chat.completions.create(model="gpt-5-nano", **body)
    assert completion.choices
    seen = fake_openai.requests[0]
    assert seen.path == "/v1/chat/completions" and seen.json["model"] == "gpt-5-nano"
    assert "api-version" not in seen.query
    assert seen.headers["Authorization"] == "Bearer sk-upstream-secret" and "api-key" not in seen.headers
    ex = await rec.wait()
    assert ex.upstream == "openai" and ex.priced


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/openai/deployments/gpt-5-nano/images/generations", 404),
        ("POST", "/openai/v1/files", 404),
        ("GET", "/openai/deployments/gpt-5-nano/chat/completions", 405),
    ],
)
async def test_unmeterable_azure_paths_get_openai_shaped_errors(
    start_proxy: StartProxy, fake_openai: FakeUpstream, method: str, path: str, status: int
) -> None:
    import aiohttp

    proxy = await start_proxy(azure_yaml(fake_openai.url))
    async with aiohttp.ClientSession() as s:
        async with s.request(method, proxy.url + path + f"?api-version={API_VERSION}", json={}) as r:
            assert r.status == status
            err = (await r.json())["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert not fake_openai.requests


def test_azure_upstream_settings() -> None:
    from proxy.config_file import parse_settings
    from proxy.errors import ConfigError

    text = azure_yaml("https://res.openai.azure.com/openai")
    settings = parse_settings(text, {})
    up = settings.upstreams["azure"]
    assert (up.kind, up.base_url, up.api_base, up.inject_stream_usage) == (
        "azure", "https://res.openai.azure.com", "https://res.openai.azure.com/openai", True
    )
    with pytest.raises(ConfigError, match=r"upstreams\.azure\.kind.*'azur'"):
        parse_settings(text.replace("kind: azure", "kind: azur"), {})

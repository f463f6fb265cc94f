"""The passthrough rule: a model endpoint under any spelling is metered as that endpoint; a
path Tollgate cannot meter is refused (403) while keys or budgets apply, unless the config
lets it through by name; a body naming a model meets the key's allow-list on every path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal

import orjson
import pytest

from proxy.keys import hash_key
from tests.integration.conftest import Proxy, StartProxy, proxy_yaml
from tests.integration.faults_common import log_records, sample
from tests.integration.test_bad_input import http, raw_exchange, status_of
from tests.integration.test_failures import assert_openai_error, post
from tests.integration.test_real_llamacpp import llama  # noqa: F401 - the session's llama-server
from tests.support.fake_upstream import FakeUpstream, Reply
from tests.support.llama_server import LlamaServer

D = Decimal
KEY = "tg-cheap-only-0123456789"
# llama-server as the default upstream, its model priced at $0.001 per output token.
LLAMA_BUDGET = """
pricing:
  models:
    local: {input: 0, output: 1000}
budgets:
  - name: ten-cents
    period: daily
    limit_usd: 0.10
"""


@pytest.fixture
def llama_yaml(llama: LlamaServer) -> Iterator[str]:  # noqa: F811
    text = proxy_yaml("http://127.0.0.1:9/v1", llama_root=llama.url, default_upstream="llamacpp", extra=LLAMA_BUDGET)
    yield text.replace('    model: "models/gemma-3-270m-q4_k_m.gguf"\n', "")


def chat_body(**fields: object) -> bytes:
    return orjson.dumps({"model": "local", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5, **fields})


async def raw_post(proxy: Proxy, path: str, body: bytes) -> tuple[int, bytes]:
    resp = await raw_exchange(proxy, http(
        f"POST {path} HTTP/1.1", body, Content_Type="application/json", Content_Length=str(len(body))
    ))
    return status_of(resp), resp.partition(b"\r\n\r\n")[2]


async def spend(proxy: Proxy) -> list[dict[str, object]]:
    rt = proxy.runtime
    for _ in range(100):
        if not rt.live_reservations:
            break
        await asyncio.sleep(0.05)
    return await rt.ledger.budget_report(rt.clock())


@pytest.mark.parametrize(
    "path",
    ["/v1/chat/completions/", "/v1/chat/completions;x=1", "/v1//chat/completions", "/v1/chat/completions%2F",
     "/v1/Chat/Completions"],
)
async def test_a_model_endpoint_under_another_spelling_is_metered(
    start_proxy: StartProxy, llama_yaml: str, path: str
) -> None:
    proxy = await start_proxy(llama_yaml)
    status, body = await raw_post(proxy, path, chat_body())
    assert status == 200, body
    [row] = await spend(proxy)
    assert row["requests"] == 1 and row["spent"] == D("0.005")
    [line] = log_records(proxy)
    assert line["endpoint"] == "chat.completions" and line["tokens"]["output"] == 5
    # And the budget holds it like any other: 150 tokens do not fit in what is left.
    status, body = await raw_post(proxy, path, chat_body(max_tokens=150))
    assert status == 429 and b"budget_exceeded" in body


@pytest.mark.parametrize("path", ["//v1/chat/completions", "/v1/./chat/completions", "/v1/chat/%2E/completions"])
async def test_spellings_that_could_leave_the_api_base_are_refused(start_proxy: StartProxy, llama_yaml: str, path: str) -> None:
    proxy = await start_proxy(llama_yaml)
    status, _ = await raw_post(proxy, path, chat_body())
    assert status == 404
    assert await spend(proxy) == []


async def test_a_path_that_cannot_be_metered_is_refused_while_a_budget_applies(
    start_proxy: StartProxy, llama_yaml: str, llama: LlamaServer  # noqa: F811
) -> None:
    """llama-server's Anthropic-style /v1/messages generates tokens Tollgate cannot count."""
    proxy = await start_proxy(llama_yaml)
    before = (await asyncio.to_thread(llama.metrics)).get("llamacpp:tokens_predicted_total", 0.0)
    body = orjson.dumps({"model": "local", "max_tokens": 60, "messages": [{"role": "user", "content": "Hi"}]})
    status, raw = await raw_post(proxy, "/v1/messages", body)
    assert status == 403
    assert_openai_error(orjson.loads(raw), code="unmetered_path")
    after = (await asyncio.to_thread(llama.metrics)).get("llamacpp:tokens_predicted_total", 0.0)
    assert after == before  # nothing reached the server


async def test_an_allowed_unmetered_path_meets_the_keys_model_list(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    fake_openai.route("POST", "/v1/images/generations", Reply.json({"created": 1, "data": []}))
    extra = f"""
keys:
  - name: cheap
    key_sha256: {hash_key(KEY)}
    models: ["paid-cheap*"]
passthrough:
  allow_unmetered: ["/v1/images/*"]
"""
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, default_upstream="openai", extra=extra))
    auth = {"Authorization": f"Bearer {KEY}"}
    url = proxy.base_url + "/images/generations"
    status, body, _ = await post(url, {"model": "paid-expensive", "prompt": "x"}, auth)
    assert status == 403 and body["error"]["code"] == "model_not_allowed"
    status, body, _ = await post(url, {"model": "paid-cheap-1", "prompt": "x"}, auth)
    assert status == 200
    assert [r.json["model"] for r in fake_openai.requests] == ["paid-cheap-1"]
    # Not allowed by name: refused, though the key is valid.
    status, body, _ = await post(proxy.base_url + "/audio/speech", {"model": "paid-cheap-1"}, auth)
    assert status == 403 and body["error"]["code"] == "unmetered_path"
    assert sample(proxy, "tollgate_unmetered_requests_total", allowed_by="/v1/images/*") == 1
    assert [r.get("unmetered") for r in log_records(proxy)] == [None, "/v1/images/*", None]


async def test_without_keys_or_budgets_passthrough_is_open_and_counted(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("GET", "/v1/files", Reply.json({"object": "list", "data": []}))
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base, default_upstream="openai"))
    async_status = (await post(proxy.base_url + "/files", b"", {"X-Method": "GET"}))[0]
    assert async_status in (200, 404)  # POST /v1/files is the fake's to answer
    assert sample(proxy, "tollgate_unmetered_requests_total", allowed_by="unguarded") == 1

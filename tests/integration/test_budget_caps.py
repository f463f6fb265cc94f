"""The reservation covers everything the upstream will generate: every field the upstream
obeys for its output cap, times the outputs it makes (`n`, `best_of`, a batch of prompts),
against a real llama-server and against the OpenAI fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from tests.integration.conftest import StartProxy
from tests.integration.test_budgets_e2e import EPOCH, FAR, budget_yaml, config, post, settled
from tests.integration.test_real_llamacpp import llama  # noqa: F401 - the session's llama-server
from tests.support.fake_upstream import FakeUpstream, RecordedRequest, Reply
from tests.support.llama_server import LlamaServer

D = Decimal
# $0.001 per output token, input free: a $0.10 budget holds 100 output tokens.
LLAMA_PRICE = '    local: {input: 0, output: 1000}\n'
TEN_CENTS = """  - name: ten-cents
    period: daily
    limit_usd: 0.10
"""
TEN_CENTS_CLAMPED = TEN_CENTS + "    on_exceed: clamp\n    min_output_tokens: 1\n"


def llama_ask(**fields: Any) -> dict[str, Any]:
    return {"model": "local", "messages": [{"role": "user", "content": "Count from one to one hundred."}],
            "ignore_eos": True, **fields}


@pytest.fixture
def llama_config(llama: LlamaServer) -> Iterator[str]:  # noqa: F811
    text = config("http://127.0.0.1:9/v1", llama_root=llama.url)
    marker = "  models:\n"
    assert text.count(marker) == 1
    yield text.replace(marker, marker + LLAMA_PRICE)


async def test_llamacpp_n_predict_over_max_tokens_is_reserved(start_proxy: StartProxy, llama_config: str) -> None:
    """llama-server obeys n_predict over max_tokens: `{max_tokens: 1, n_predict: 150}`
    generates 150 tokens, so the reservation is for 150 ($0.15 on a $0.10 budget)."""
    proxy = await start_proxy(llama_config + budget_yaml(TEN_CENTS))
    status, body, _ = await post(proxy, llama_ask(max_tokens=1, n_predict=150))
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    # What fits is admitted and stays within the limit.
    status, body, _ = await post(proxy, llama_ask(max_tokens=1, n_predict=60))
    assert status == 200 and body["usage"]["completion_tokens"] == 60
    report = await settled(proxy, 1)
    assert report[0]["spent"] == D("0.060")


async def test_llamacpp_clamp_lowers_the_field_the_server_obeys(start_proxy: StartProxy, llama_config: str) -> None:
    proxy = await start_proxy(llama_config + budget_yaml(TEN_CENTS_CLAMPED))
    status, body, headers = await post(proxy, llama_ask(max_tokens=1, n_predict=150))
    assert status == 200, body
    clamped = int(headers["x-tollgate-budget-clamped"].split(";")[0].split("=")[1])
    assert clamped <= 100
    assert body["usage"]["completion_tokens"] == clamped  # ignore_eos: it ran to the cap
    report = await settled(proxy, 1)
    assert report[0]["spent"] <= D("0.10")


async def test_llamacpp_without_a_cap_is_reserved_at_its_context_size(start_proxy: StartProxy, llama_config: str) -> None:
    """n_predict: -1 runs until the context (2048 here) is full: reserved as such."""
    proxy = await start_proxy(llama_config + budget_yaml(TEN_CENTS))
    upstream = proxy.runtime.upstreams["llamacpp"]
    for _ in range(200):  # /props is read in the background at start-up
        if upstream.context_size is not None:
            break
        await asyncio.sleep(0.05)
    assert upstream.context_size == 2048
    status, body, _ = await post(proxy, llama_ask(n_predict=-1))
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    status, body, _ = await post(proxy, llama_ask(n_predict=-2))
    assert status == 400 and body["error"]["param"] == "n_predict"


def n_times_cap(request: RecordedRequest) -> Reply:
    """OpenAI's bill for `n` choices: every choice runs to the cap."""
    body = request.json
    n = body.get("n", 1)
    cap = body.get("max_completion_tokens") or body.get("max_tokens") or 16
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    choices = max(n, body.get("best_of", 1)) * prompts
    return Reply.json({
        "id": "x", "object": "chat.completion", "model": body["model"], "choices": [],
        "usage": {"prompt_tokens": 9, "completion_tokens": choices * cap, "total_tokens": 9 + choices * cap},
    })


DOLLAR_BLOCK = """  - name: dollar
    period: daily
    limit_usd: 1
"""


@pytest.mark.parametrize(
    ("path", "body", "outputs"),
    [
        ("/chat/completions", {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "n": 10, "max_tokens": 20}, 10),
        ("/completions", {"model": "gpt-test", "prompt": ["a", "b", "c"], "best_of": 4, "n": 2, "max_tokens": 20}, 12),
    ],
    ids=["chat-n", "completions-best_of-batch"],
)
async def test_concurrent_requests_for_several_outputs_never_overspend(
    start_proxy: StartProxy, fake_openai: FakeUpstream, path: str, body: dict[str, Any], outputs: int
) -> None:
    """Each request generates `outputs` x 20 tokens ($0.001 each); 40 at once on $1."""
    fake_openai.route("POST", "/v1" + path, n_times_cap)
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DOLLAR_BLOCK)))
    results = await asyncio.gather(*(post(proxy, body, path=path) for _ in range(40)))
    admitted = [r for r in results if r[0] == 200]
    assert {r[0] for r in results} <= {200, 429}
    fits = int(D(1) / (D("0.001") * outputs * 20))
    assert len(admitted) == fits
    report = await settled(proxy, len(admitted))
    assert report[0]["spent"] == D("0.001") * outputs * 20 * fits <= D(1)
    spend = await proxy.runtime.ledger.spend_report(EPOCH, FAR, [])
    assert spend[0]["cost"] == report[0]["spent"]

"""Rate and concurrency limits end to end: the official openai SDK (retries off, so every
429 is seen) through the proxy to a fake upstream.

The proxy's clock is the test's (`Clock`): the SQLite store decides at that instant, so
every GCRA figure (remaining, reset, Retry-After) is exact by hand.
"""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.estimate import estimate_prompt_tokens
from proxy.spend.admission import INPUT_MARGIN, INPUT_MARGIN_TOKENS
from tests.integration.conftest import Proxy, StartProxy, proxy_yaml
from tests.integration.faults_common import drained
from tests.support.fake_upstream import FakeUpstream, RecordedRequest, Reply
from tests.support.redis_server import RedisServer

T0 = datetime(2025, 6, 15, 20, 0, 0, tzinfo=UTC)
MESSAGES: list[Any] = [{"role": "user", "content": "Hello!"}]
CAP = 25
PROMPT_TOKENS = 9  # what the fake upstream reports


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def completion(request: RecordedRequest) -> Reply:
    """Uses its whole output cap; carries OpenAI's own rate-limit headers."""
    body = request.json if isinstance(request.json, dict) else {}
    out = int(body.get("max_tokens") or body.get("max_completion_tokens") or 1)
    return Reply.json(
        {
            "id": "chatcmpl-rl",
            "object": "chat.completion",
            "created": 1750000000,
            "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": out, "total_tokens": PROMPT_TOKENS + out},
        },
        headers=[
            ("x-ratelimit-limit-requests", "10000"),
            ("x-ratelimit-remaining-requests", "9999"),
            ("x-ratelimit-limit-tokens", "2000000"),
            ("x-ratelimit-remaining-tokens", "1999000"),
        ],
    )


def worst_case(max_tokens: int = CAP) -> int:
    """What the proxy charges a tokens-per-minute limit for one `ask`."""
    body = {"model": "gpt-test", "messages": MESSAGES, "max_tokens": max_tokens}
    prompt = estimate_prompt_tokens("chat.completions", body, "gpt-test")
    return math.ceil(prompt * INPUT_MARGIN) + INPUT_MARGIN_TOKENS + max_tokens


def sdk(proxy: Proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-anything", max_retries=0, timeout=10)


async def ask(client: openai.AsyncOpenAI, user: str = "alice", max_tokens: int = CAP, model: str = "gpt-test") -> Any:
    return await client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, user=user
    )


async def start(start_proxy: StartProxy, fake: FakeUpstream, limits: str, clock: Clock | None = None) -> Proxy:
    fake.route("POST", "/v1/chat/completions", completion)
    kwargs: dict[str, Any] = {} if clock is None else {"clock": clock}
    return await start_proxy(proxy_yaml(fake.api_base, extra=limits), **kwargs)


async def refused_count(proxy: Proxy) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as s, s.get(proxy.metrics_url) as r:
        text = await r.text()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tollgate_rate_limited_total":
                out[(sample.labels["limit"], sample.labels["kind"])] = sample.value
    return out


async def test_requests_per_minute_per_user(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    clock = Clock(T0)
    proxy = await start(start_proxy, fake_openai, """
limits:
  - name: per-user
    scope: {user: "*"}
    requests_per_minute: 3
""", clock)
    client = sdk(proxy)
    seen = []
    for _ in range(3):
        raw = await ask(client)
        seen.append((raw.headers["x-ratelimit-remaining-requests"], raw.headers["x-ratelimit-reset-requests"]))
        # Ours replace the upstream's for the kind a Tollgate limit covers...
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers.get_list("x-ratelimit-limit-requests") == ["3"]
        # ...and the kind none covers keeps the upstream's.
        assert raw.headers["x-ratelimit-limit-tokens"] == "2000000"
    # A burst of a minute's worth; each request is 20 s of refill.
    assert seen == [("2", "20s"), ("1", "40s"), ("0", "1m0s")]

    clock.now += timedelta(seconds=5)
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(client)
    err = refused.value
    assert err.status_code == 429
    assert err.code == "requests_per_minute_exceeded"
    assert err.type == "rate_limit_exceeded"
    assert "'per-user' (user alice)" in err.message and "3 requests per minute" in err.message
    # 15 s until one request's worth has drained.
    assert err.response.headers["retry-after"] == "15"
    assert err.response.headers["x-tollgate-ratelimit-name"] == "per-user"
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert len(fake_openai.requests) == 3

    # Another user has a counter of their own.
    assert (await ask(client, user="bob")).headers["x-ratelimit-remaining-requests"] == "2"
    # One millisecond short of the Retry-After instant's exact wait: still refused; then admitted.
    clock.now += timedelta(seconds=15) - timedelta(milliseconds=1)
    with pytest.raises(openai.RateLimitError):
        await ask(client)
    clock.now += timedelta(milliseconds=1)
    assert (await ask(client)).headers["x-ratelimit-remaining-requests"] == "0"
    assert len(fake_openai.requests) == 5
    assert (await refused_count(proxy)) == {("per-user", "requests"): 2.0}


async def test_tokens_per_minute_charges_the_worst_case_and_corrects_to_usage(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    clock = Clock(T0)
    cost = worst_case()
    actual = PROMPT_TOKENS + CAP
    assert cost > actual  # the estimate is a worst case
    limit = 3 * cost - 1
    proxy = await start(start_proxy, fake_openai, f"""
limits:
  - name: team-tpm
    scope: {{model: "gpt-*"}}
    tokens_per_minute: {limit}
""", clock)
    client = sdk(proxy)
    first = await ask(client)
    # Charged at the worst case when admitted...
    assert first.headers["x-ratelimit-remaining-tokens"] == str(limit - cost)
    assert first.headers["x-ratelimit-limit-tokens"] == str(limit)
    # ...corrected to the upstream's usage when it finished.
    second = await ask(client)
    assert second.headers["x-ratelimit-remaining-tokens"] == str(limit - actual - cost)
    third = await ask(client)
    assert third.headers["x-ratelimit-remaining-tokens"] == str(limit - 2 * actual - cost)
    # Now 3 x actual are used: another worst case does not fit until enough has drained.
    used = 3 * actual
    assert used + cost > limit
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(client)
    assert refused.value.code == "tokens_per_minute_exceeded"
    wait_ms = math.ceil((used + cost - limit) * 60_000 / limit)
    assert refused.value.response.headers["retry-after"] == str(math.ceil(wait_ms / 1000))
    clock.now += timedelta(milliseconds=wait_ms)
    await ask(client)
    # A request that could never fit is told so, with no Retry-After.
    with pytest.raises(openai.RateLimitError) as never:
        await ask(client, max_tokens=limit)
    assert "can never be admitted" in never.value.message
    assert "retry-after" not in never.value.response.headers
    assert len(fake_openai.requests) == 4
    # The request counter of no Tollgate limit: the upstream's header passes.
    assert first.headers["x-ratelimit-limit-requests"] == "10000"


async def test_tokens_per_minute_writes_the_cap_it_charged(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    proxy = await start(start_proxy, fake_openai, """
default_max_tokens: 40
limits:
  - name: tpm
    tokens_per_minute: 100000
""")
    await sdk(proxy).chat.completions.create(model="gpt-test", messages=MESSAGES)
    # The request set no cap: the one the charge assumed goes upstream with it.
    assert fake_openai.requests[0].json["max_completion_tokens"] == 40


async def test_max_in_flight_caps_concurrency_and_frees_slots_on_every_path(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    proxy = await start(start_proxy, fake_openai, """
limits:
  - name: two-at-once
    scope: {user: "*"}
    max_in_flight: 2
""")
    client = sdk(proxy)
    fake_openai.hold = asyncio.Event()
    running = [asyncio.create_task(ask(client)) for _ in range(2)]
    await fake_openai.wait_request(2)
    with pytest.raises(openai.RateLimitError) as refused:
        await ask(client)
    assert refused.value.code == "max_in_flight_exceeded"
    assert "2 are running" in refused.value.message
    assert refused.value.response.headers["retry-after"] == "1"
    running.append(asyncio.create_task(ask(client, user="bob")))  # a user of their own
    await fake_openai.wait_request(3)
    fake_openai.hold.set()
    await asyncio.gather(*running)
    fake_openai.hold = None

    # One after the other: each finds the slot the last one gave back before it ended.
    for _ in range(5):
        await ask(client)
    # A stream, an upstream error and a client that leaves each give their slot back.
    stream = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, user="alice", stream=True)
    async for _ in stream:
        pass
    fake_openai.route("POST", "/v1/chat/completions", Reply.json({"error": {"message": "boom"}}, status=500))
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            await ask(client)
    fake_openai.route("POST", "/v1/chat/completions", completion)
    fake_openai.hold = asyncio.Event()
    gone = [asyncio.create_task(ask(client)) for _ in range(2)]
    await fake_openai.wait_request(len(fake_openai.requests))
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    fake_openai.hold = None
    for _ in range(20):
        if not proxy.runtime.limiter.live and not proxy.runtime.limiter.background:
            break
        await asyncio.sleep(0.05)
    assert proxy.runtime.limiter.live == {}
    assert (await ask(client)).http_response.status_code == 200
    assert (await ask(client)).http_response.status_code == 200
    assert (await refused_count(proxy)) == {("two-at-once", "in_flight"): 1.0}


async def test_a_dead_processs_slots_come_back_when_their_lease_ends(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    clock = Clock(T0)
    proxy = await start(start_proxy, fake_openai, """
ledger: {lease_seconds: 30}
limits:
  - name: one
    max_in_flight: 1
""", clock)
    client = sdk(proxy)
    fake_openai.hold = asyncio.Event()
    held = asyncio.create_task(ask(client))
    await fake_openai.wait_request(1)
    # The process holding the slot "dies": it stops renewing its leases.
    proxy.runtime.limiter.live.clear()
    with pytest.raises(openai.RateLimitError):
        await ask(client)
    clock.now += timedelta(seconds=30)
    fake_openai.hold.set()
    await ask(client)
    await held


async def test_limits_and_budgets_together(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    """A budget refusal charges no rate limit; a rate-limit refusal releases the budget's hold."""
    proxy = await start(start_proxy, fake_openai, """
pricing:
  models:
    gpt-test: {input: 0, output: 1000}
budgets:
  - name: tiny
    period: total
    limit_usd: 0.1
limits:
  - name: rpm
    requests_per_minute: 2
""")
    client = sdk(proxy)
    with pytest.raises(openai.RateLimitError) as budget:
        await ask(client, max_tokens=120)  # $0.12 > $0.1
    assert budget.value.code == "budget_exceeded"
    await ask(client)
    await ask(client)
    with pytest.raises(openai.RateLimitError) as rate:
        await ask(client)
    assert rate.value.code == "requests_per_minute_exceeded"
    # The refused request's hold is released on a task of its own, after the 429 is sent.
    await drained(proxy.runtime)
    rows = await proxy.runtime.ledger.budget_report(datetime.now(UTC))
    assert rows[0]["requests"] == 2 and rows[0]["reserved"] == 0


async def test_unmatched_requests_carry_no_headers_of_ours(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    proxy = await start(start_proxy, fake_openai, """
limits:
  - name: other-model
    scope: {model: "gpt-4o*"}
    requests_per_minute: 1
""")
    raw = await ask(sdk(proxy))
    assert raw.headers["x-ratelimit-limit-requests"] == "10000"
    assert proxy.runtime.limiter.live == {}


@pytest.mark.parametrize("mode", ["fail_closed", "fail_open"])
async def test_a_ledger_outage_follows_on_unavailable(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path, mode: str
) -> None:
    """Redis shared by instances, then gone: refuse (503) or admit unlimited, as configured."""
    with RedisServer() as redis:
        proxy = await start(start_proxy, fake_openai, f"""
ledger: {{backend: redis, redis_url: "{redis.url}", path: "{tmp_path / 'spend.db'}", on_unavailable: {mode}}}
limits:
  - name: rpm
    requests_per_minute: 100
""")
        client = sdk(proxy)
        ok = await ask(client)
        # Decided on Redis's clock: the counter holds one request, whatever the host's clock.
        assert ok.headers["x-ratelimit-remaining-requests"] == "99"
        redis.stop()
        if mode == "fail_closed":
            with pytest.raises(openai.APIStatusError) as down:
                await ask(client)
            assert down.value.status_code == 503 and down.value.code == "ledger_unavailable"
            assert len(fake_openai.requests) == 1
        else:
            raw = await ask(client)
            assert raw.headers["x-ratelimit-limit-requests"] == "10000"  # no limit of ours applied
            assert len(fake_openai.requests) == 2

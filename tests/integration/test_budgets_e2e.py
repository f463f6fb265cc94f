"""Budgets end to end: the official openai SDK and raw HTTP through the proxy, fake upstreams.

Prices are overridden so every worst case is exact by hand: `gpt-test` costs nothing per
input token and $1000 per 1M output tokens, i.e. $0.001 per output token; the fake upstream
answers with exactly as many completion tokens as the request's cap (`echo_cap`), so a
request capped at 6 tokens reserves $0.006 and then spends $0.006.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

from proxy.keys import hash_key
from tests.integration.conftest import Proxy, StartProxy
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import (
    FakeLlamaServer,
    FakeUpstream,
    RecordedRequest,
    Reply,
)

D = Decimal
KEY_ALPHA = "tg-alpha-0123456789"
KEY_BETA = "tg-beta-9876543210"
ADMIN = "adm-secret-42"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FAR = datetime(9999, 1, 1, tzinfo=UTC)
# A Sunday evening: the daily window ends in 4 hours.
T0 = datetime(2025, 6, 15, 20, 0, 0, tzinfo=UTC)

PRICING = """
pricing:
  models:
    gpt-test: {input: 0, output: 1000}
    gpt-dead: {input: 0, output: 1000}
    gpt-other: {input: 0, output: 1000}
"""


class Clock:
    """The proxy's wall clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def config(
    openai_base: str,
    *,
    extra: str = "",
    openai_key: str | None = "sk-upstream-secret",
    llama_root: str | None = None,
    default_max_tokens: int = 4096,
) -> str:
    key = f"    api_key: {openai_key}\n" if openai_key else ""
    llama = f"  llamacpp:\n    kind: llamacpp\n    base_url: {llama_root}\n" if llama_root else ""
    llama_route = "  - models: [local]\n    upstream: llamacpp\n" if llama_root else ""
    return f"""
server: {{host: 127.0.0.1, port: 0}}
timeouts: {{connect: 2, first_byte: 5, idle: 5}}
upstreams:
  openai:
    kind: openai
    base_url: {openai_base}
{key}  dead:
    kind: openai
    base_url: http://127.0.0.1:9/v1
{llama}routes:
  - models: [gpt-dead]
    upstream: dead
  - models: ["gpt-*"]
    upstream: openai
{llama_route}metrics: {{host: 127.0.0.1, port: 0}}
default_max_tokens: {default_max_tokens}
{PRICING}
{extra}
"""


def chat_completion(completion_tokens: int, prompt_tokens: int = 9, model: str = "gpt-test") -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1750000000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def cap_of(body: Any) -> int | None:
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if isinstance(body, dict) and body.get(name) is not None:
            return int(body[name])
    return None


def echo_cap(request: RecordedRequest) -> Reply:
    """Use the whole output cap: actual cost == worst case (minus input, priced 0)."""
    return Reply.json(chat_completion(cap_of(request.json) or 1))


def sdk(proxy: Proxy, api_key: str = "sk-anything", **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base_url, api_key=api_key, max_retries=0, timeout=10, **kw)


def ask(max_tokens: int | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hello!"}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


async def post(
    proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None, path: str = "/chat/completions"
) -> tuple[int, dict[str, Any], CIMultiDict[str]]:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + path, json=body, headers=headers or {}) as r:
            raw = await r.read()
            return r.status, json.loads(raw) if raw else {}, CIMultiDict(r.headers)


async def spend_rows(proxy: Proxy) -> int:
    total = await proxy.runtime.ledger.spend_report(EPOCH, FAR, [])
    return int(total[0]["requests"]) if total else 0


async def settled(proxy: Proxy, rows: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Wait until `rows` requests are in the spend log and nothing is reserved any more."""
    rt = proxy.runtime
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        report = await rt.ledger.budget_report(rt.clock())
        if await spend_rows(proxy) >= rows and all(r["reserved"] == 0 for r in report):
            return report
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not settled: {await spend_rows(proxy)} rows, report {report}")
        await asyncio.sleep(0.01)


def bucket(report: list[dict[str, Any]], name: str, user: str | None = None) -> dict[str, Any]:
    found = [r for r in report if r["name"] == name and (user is None or r["user"] == user)]
    assert len(found) == 1, report
    return found[0]


def log_records(proxy: Proxy) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.log_lines()]


def budget_yaml(*rules: str) -> str:
    return "budgets:\n" + "".join(rules)


DAILY_CENT = """  - name: daily-cap
    period: daily
    limit_usd: 0.01
"""


DOLLAR = """  - name: dollar
    period: daily
    limit_usd: 1
"""


# ---------------------------------------------------------------------------------------
# Keys


async def test_unknown_keys_get_401_and_upstream_never_sees_a_virtual_key(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    keys = f"""
keys:
  - name: alpha
    key_sha256: {hash_key(KEY_ALPHA)}
    models: ["gpt-test"]
    metadata: {{team: red}}
  - name: beta
    key_sha256: {hash_key(KEY_BETA)}
"""
    proxy = await start_proxy(config(fake_openai.api_base, extra=keys))

    # Missing key: raw, the OpenAI error shape; through the SDK, AuthenticationError.
    status, body, _ = await post(proxy, ask(5))
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "didn't provide an API key" in body["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as wrong:
        await sdk(proxy, "tg-wrong").chat.completions.create(**ask(5))
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    assert "tg-wrong" not in str(wrong.value)
    assert fake_openai.requests == []

    # A key restricted to gpt-test asking for another model: 403, nothing upstream.
    with pytest.raises(openai.PermissionDeniedError) as denied:
        await sdk(proxy, KEY_ALPHA).chat.completions.create(**{**ask(5), "model": "gpt-other"})
    assert denied.value.status_code == 403 and "alpha" in denied.value.message
    assert fake_openai.requests == []

    ok = await sdk(proxy, KEY_ALPHA).chat.completions.create(**ask(5))
    assert ok.usage is not None and ok.usage.completion_tokens == 5
    await sdk(proxy, KEY_BETA).chat.completions.create(**{**ask(3), "model": "gpt-other"})
    assert len(fake_openai.requests) == 2
    for seen in fake_openai.requests:
        assert seen.headers["Authorization"] == "Bearer sk-upstream-secret"
        assert not any(KEY_ALPHA in v or KEY_BETA in v for v in seen.headers.values())
    await settled(proxy, 2)
    assert [r["key"] for r in log_records(proxy)] == [None, None, "alpha", "alpha", "beta"]
    by_key = await proxy.runtime.ledger.spend_report(EPOCH, FAR, ["key"])
    assert [(r["key"], r["cost"]) for r in by_key] == [("alpha", D("0.005")), ("beta", D("0.003"))]


async def test_no_upstream_key_configured_means_no_authorization_upstream(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    keys = f"keys:\n  - name: alpha\n    key_sha256: {hash_key(KEY_ALPHA)}\n"
    proxy = await start_proxy(config(fake_openai.api_base, extra=keys, openai_key=None))
    await sdk(proxy, KEY_ALPHA).chat.completions.create(**ask(2))
    seen = await fake_openai.wait_request()
    assert "Authorization" not in seen.headers


async def test_without_keys_requests_are_anonymous(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DAILY_CENT)))
    await sdk(proxy, "whatever-the-client-sends").chat.completions.create(**ask(2))
    await settled(proxy, 1)
    assert log_records(proxy)[0]["key"] is None
    assert (await fake_openai.wait_request()).headers["Authorization"] == "Bearer sk-upstream-secret"


# ---------------------------------------------------------------------------------------
# Refusal, settlement


async def test_refusal_is_a_429_budget_exceeded_naming_budget_spend_limit_and_reset(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    clock = Clock(T0)
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DAILY_CENT)), clock=clock)
    client = sdk(proxy)
    await client.chat.completions.create(**ask(6))
    await settled(proxy, 1)

    # $0.006 spent + $0.005 worst case > $0.01.
    status, body, headers = await post(proxy, ask(5))
    assert status == 429
    err = body["error"]
    assert err["type"] == "budget_exceeded" and err["code"] == "budget_exceeded"
    assert err["message"] == (
        "Budget 'daily-cap' exceeded: $0.006 spent of the $0.01 limit. "
        "It resets at 2025-06-16T00:00:00Z (in 4 hours). "
        "This request reserves up to $0.005 (its prompt, and 5 output tokens); "
        "with max_tokens at most 4 it fits this budget now."
    )
    assert headers["retry-after"] == "14400"  # 4 h to midnight UTC
    assert headers["x-tollgate-budget-name"] == "daily-cap"
    assert headers["x-tollgate-budget-reserved"] == "0.005000000"
    assert headers["x-tollgate-budget-fits-max-tokens"] == "4"

    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**ask(5))
    assert refused.value.status_code == 429 and refused.value.code == "budget_exceeded"
    assert "2025-06-16T00:00:00Z" in refused.value.message

    # Exactly what still fits is admitted: $0.004.
    await client.chat.completions.create(**ask(4))
    report = await settled(proxy, 2)
    assert bucket(report, "daily-cap")["spent"] == D("0.01")
    assert len(fake_openai.requests) == 2
    assert [r["budget"] for r in log_records(proxy)] == ["ok", "refused:daily-cap", "refused:daily-cap", "ok"]


async def test_worst_case_is_reserved_while_in_flight_and_replaced_by_the_actual_cost(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    """Shipped gpt-4o-mini prices ($0.15 in, $0.60 out per 1M): the reservation held while
    the upstream thinks is the hand-computed worst case; settlement spends the usage's cost."""
    fake_openai.route(
        "POST", "/v1/chat/completions", Reply.json(chat_completion(100, prompt_tokens=9, model="gpt-4o-mini"))
    )
    fake_openai.hold = asyncio.Event()
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DAILY_CENT)))
    body = {**ask(1000), "model": "gpt-4o-mini"}
    call = asyncio.create_task(sdk(proxy).chat.completions.create(**body))
    await fake_openai.wait_request()
    report = await proxy.runtime.ledger.budget_report(proxy.runtime.clock())
    # "Hello!" from user: 3 per message + 1 ("user") + 2 ("Hello", "!") + 3 priming = 9
    # tokens; reserved as ceil(9 * 1.10) + 16 = 26 input tokens plus the 1000-token cap.
    worst = D(26) * D("0.15") / 10**6 + D(1000) * D("0.60") / 10**6
    assert bucket(report, "daily-cap")["reserved"] == worst == D("0.0006039")
    fake_openai.hold.set()
    await call
    report = await settled(proxy, 1)
    actual = D(9) * D("0.15") / 10**6 + D(100) * D("0.60") / 10**6
    assert bucket(report, "daily-cap")["spent"] == actual
    assert bucket(report, "daily-cap")["reserved"] == 0
    assert D(log_records(proxy)[0]["cost_usd"]) == actual


async def test_settled_spend_equals_the_sum_of_request_costs(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rule = """  - name: big
    period: daily
    limit_usd: 10
"""
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(rule)))
    client = sdk(proxy)
    caps = [3, 7, 11, 2, 5]
    await asyncio.gather(*(client.chat.completions.create(**ask(c), user=f"u{c % 2}") for c in caps))
    report = await settled(proxy, len(caps))
    costs = [D(r["cost_usd"]) for r in log_records(proxy)]
    assert sum(costs) == D("0.028") == bucket(report, "big")["spent"]
    assert bucket(report, "big")["requests"] == len(caps)
    by_user = await proxy.runtime.ledger.spend_report(EPOCH, FAR, ["user"])
    assert {r["user"]: r["cost"] for r in by_user} == {"u0": D("0.002"), "u1": D("0.026")}


async def test_failed_upstream_releases_the_reservation_and_bills_nothing(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route(
        "POST",
        "/v1/chat/completions",
        Reply.json({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}, status=500),
    )
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DAILY_CENT)))
    with pytest.raises(openai.InternalServerError):
        await sdk(proxy).chat.completions.create(**ask(9))
    # The unreachable upstream (port 9, nothing listens): 502 from the proxy itself.
    status, body, _ = await post(proxy, {**ask(9), "model": "gpt-dead"})
    assert status == 502 and body["error"]["code"] == "upstream_unreachable"
    report = await settled(proxy, 2)
    b = bucket(report, "daily-cap")
    assert (b["spent"], b["reserved"], b["requests"]) == (0, 0, 2)
    assert [(r["outcome"], r["cost_usd"]) for r in log_records(proxy)] == [
        ("upstream_error", None),
        ("proxy_error", None),
    ]
    # Both $0.009 worst cases were released: another $0.009 request fits.
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    assert (await sdk(proxy).chat.completions.create(**ask(9))).usage.completion_tokens == 9  # type: ignore[union-attr]


async def test_client_disconnect_mid_stream_bills_the_partial_usage(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    cap = openai_capture("chat-streaming")
    fake_openai.replay(cap, gap=0.05)  # no usage chunk: the proxy estimates what it relayed
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DAILY_CENT)))
    received = b""
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.base_url + "/chat/completions", json={**ask(9), "stream": True}) as r:
            assert r.status == 200
            while received.count(b'"content":') < 3:
                received += await r.content.readany()
    await fake_openai.wait_disconnect()
    report = await settled(proxy, 1)
    rec = log_records(proxy)[0]
    assert rec["outcome"] == "client_gone"
    billed = D(rec["cost_usd"])
    # Some output was relayed and is billed (estimated), but less than the 9-token cap.
    assert rec["tokens"]["output_source"] == "estimated"
    assert 0 < rec["tokens"]["output"] < 9
    assert billed == D(rec["tokens"]["output"]) / 1000
    b = bucket(report, "daily-cap")
    assert (b["spent"], b["reserved"]) == (billed, 0)


# ---------------------------------------------------------------------------------------
# Output caps: clamp mode, and the assumed cap written into capless requests


async def test_clamp_lowers_the_cap_to_what_fits_then_refuses_below_the_minimum(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rule = """  - name: clamped
    period: daily
    limit_usd: 0.01
    on_exceed: clamp
    min_output_tokens: 3
"""
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(rule)))
    status, _, headers = await post(proxy, ask(6))
    assert status == 200 and "x-tollgate-budget-clamped" not in headers
    await settled(proxy, 1)

    # $0.004 left: a 100-token cap is lowered to 4, in the field the client used.
    status, body, headers = await post(proxy, ask(100))
    assert status == 200
    assert headers["x-tollgate-budget-clamped"] == "max_tokens=4; budget=clamped"
    assert fake_openai.requests[-1].json["max_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 4
    await settled(proxy, 2)

    status, body, _ = await post(proxy, {**ask(), "max_completion_tokens": 50})
    assert status == 429  # $0 left: 0 tokens fit, below min_output_tokens
    assert body["error"]["code"] == "budget_exceeded"
    assert len(fake_openai.requests) == 2
    assert [r["budget"] for r in log_records(proxy)] == ["ok", "clamped:clamped", "refused:clamped"]


async def test_clamp_below_min_output_tokens_refuses(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rule = """  - name: clamped
    period: daily
    limit_usd: 0.01
    on_exceed: clamp
    min_output_tokens: 5
"""
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(rule)))
    await post(proxy, ask(6))
    await settled(proxy, 1)
    status, body, _ = await post(proxy, ask(100))  # 4 would fit; the minimum is 5
    assert status == 429 and body["error"]["type"] == "budget_exceeded"
    assert len(fake_openai.requests) == 1


async def test_assumed_cap_is_written_into_capless_requests_under_a_blocking_budget(
    start_proxy: StartProxy, fake_openai: FakeUpstream, fake_llama: FakeLlamaServer
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    fake_openai.route("POST", "/v1/completions", echo_cap)
    proxy = await start_proxy(
        config(fake_openai.api_base, llama_root=fake_llama.url, default_max_tokens=50, extra=budget_yaml(DOLLAR))
    )
    await post(proxy, ask())
    chat = fake_openai.requests[-1].json
    assert chat["max_completion_tokens"] == 50 and "max_tokens" not in chat
    await post(proxy, {"model": "gpt-test", "prompt": "Hello"}, path="/completions")
    assert fake_openai.requests[-1].json["max_tokens"] == 50
    # llama-server reads max_tokens (n_predict), not max_completion_tokens.
    status, _, _ = await post(proxy, {**ask(), "model": "local"})
    assert status == 200
    local = fake_llama.requests[-1].json
    assert local["max_tokens"] == 50 and "max_completion_tokens" not in local
    # The client's own cap is left alone.
    await post(proxy, {**ask(), "max_completion_tokens": 7})
    assert fake_openai.requests[-1].json["max_completion_tokens"] == 7
    report = await settled(proxy, 4)
    # Each capless gpt-test request reserved, and spent, 50 tokens: 2 x $0.05 + $0.007
    # (`local` has no price).
    assert bucket(report, "dollar")["spent"] == D("0.107")


async def test_no_cap_is_written_when_only_soft_budgets_apply(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rule = """  - name: soft
    period: daily
    limit_usd: 100
    action: warn
"""
    proxy = await start_proxy(config(fake_openai.api_base, default_max_tokens=50, extra=budget_yaml(rule)))
    await post(proxy, ask())
    seen = fake_openai.requests[-1].json
    assert cap_of(seen) is None
    assert seen == ask()


# ---------------------------------------------------------------------------------------
# Soft budgets: headers, log, metric, webhook


class Receiver:
    """A webhook endpoint that answers 500 to its first POST, then 200."""

    def __init__(self) -> None:
        self.attempts: list[dict[str, Any]] = []
        self.accepted: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.attempts.append(body)
        if len(self.attempts) == 1:
            return web.Response(status=500)
        self.accepted.append(body)
        return web.Response(status=204)


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    server = await aiohttp_server(app)
    yield rec, str(server.make_url("/hook"))


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 6.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def scrape(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(proxy.metrics_url) as r:
        text = await r.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_soft_budget_warns_with_headers_log_metric_and_one_webhook_per_threshold(
    start_proxy: StartProxy, fake_openai: FakeUpstream, receiver: tuple[Receiver, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec, url = receiver
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rule = """  - name: soft
    period: daily
    limit_usd: 0.01
    action: warn
    thresholds: [0.5, 0.95]
"""
    clock = Clock(T0)
    extra = budget_yaml(rule) + f"webhook:\n  url: {url}\n  timeout: 2\n  max_retries: 3\n"
    proxy = await start_proxy(config(fake_openai.api_base, extra=extra), clock=clock)
    seen: list[CIMultiDict[str]] = []
    for _ in range(5):  # $0.003 each: 0.003, 0.006 (50%), 0.009, 0.012 (95%), 0.015
        status, _, headers = await post(proxy, ask(3))
        assert status == 200  # a warn budget never refuses
        seen.append(headers)
        await settled(proxy, len(seen))
    assert "x-tollgate-budget-name" not in seen[0]
    for headers in seen[1:]:  # at or over the first threshold: every response says so
        assert headers["x-tollgate-budget-name"] == "soft"
        assert headers["x-tollgate-budget-reset"] == "2025-06-16T00:00:00Z"
    assert [h["x-tollgate-budget-remaining"] for h in seen[1:]] == ["0.004000", "0.001000", "0.000000", "0.000000"]

    # At 20:00, $0.009 also makes the forecast cross the limit: that webhook
    # (test_forecast_webhook.py) is left out here.
    def thresholds(posts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [h for h in posts if h["event"] == "budget.threshold_crossed"]

    await wait_until(lambda: len(thresholds(rec.accepted)) == 2, "two accepted webhooks")
    await asyncio.sleep(0.6)  # longer than the first retry delay: no further POST comes
    assert len(thresholds(rec.attempts)) == 3  # the first was refused with 500 and retried
    # Sent in the background: the refused first attempt is retried after the other one.
    assert sorted((h["budget"], h["threshold"], h["spent_usd"]) for h in thresholds(rec.accepted)) == [
        ("soft", 0.5, "0.006000000"),
        ("soft", 0.95, "0.012000000"),
    ]
    assert all(h["window_end"] == "2025-06-16T00:00:00Z" for h in thresholds(rec.accepted))
    metrics = await scrape(proxy)
    crossings = {
        labels: v for (name, labels), v in metrics.items() if name == "tollgate_budget_threshold_crossings_total"
    }
    assert crossings == {(("budget", "soft"), ("threshold", "0.5")): 1.0, (("budget", "soft"), ("threshold", "0.95")): 1.0}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "crossed" in r.getMessage()]
    assert warnings == ["budget 'soft' crossed 50% of its limit", "budget 'soft' crossed 95% of its limit"]

    # The next day is a new period: crossing 50% again is news again.
    clock.now = T0 + timedelta(days=1)
    for i in range(2):
        await post(proxy, ask(3))
        await settled(proxy, 6 + i)
    await wait_until(lambda: len(thresholds(rec.accepted)) == 3, "the next period's webhook")
    third = thresholds(rec.accepted)[2]
    assert third["threshold"] == 0.5 and third["window_end"] == "2025-06-17T00:00:00Z"


# ---------------------------------------------------------------------------------------
# Periods, users


async def test_hourly_and_monthly_budgets_roll_over_with_the_clock(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rules = """  - name: hourly
    period: hourly
    limit_usd: 0.01
    scope: {model: "gpt-test"}
  - name: monthly
    period: monthly
    limit_usd: 0.01
    scope: {model: "gpt-other"}
"""
    clock = Clock(datetime(2025, 1, 31, 23, 59, 30, tzinfo=UTC))
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(rules)), clock=clock)
    for model in ("gpt-test", "gpt-other"):
        assert (await post(proxy, {**ask(8), "model": model}))[0] == 200
    await settled(proxy, 2)
    status, body, headers = await post(proxy, ask(8))
    assert status == 429 and headers["retry-after"] == "30"
    assert "resets at 2025-02-01T00:00:00Z (in 1 minute)" in body["error"]["message"]
    status, body, headers = await post(proxy, {**ask(8), "model": "gpt-other"})
    assert status == 429 and headers["retry-after"] == "30"

    clock.now = datetime(2025, 2, 1, 0, 0, 0, tzinfo=UTC)  # a new hour and a new month
    for model in ("gpt-test", "gpt-other"):
        assert (await post(proxy, {**ask(8), "model": model}))[0] == 200
    report = await settled(proxy, 4)
    assert [(r["name"], r["spent"], r["window_start"]) for r in report] == [
        ("hourly", D("0.008"), clock.now),
        ("monthly", D("0.008"), clock.now),
    ]
    clock.now = datetime(2025, 2, 1, 0, 59, 59, tzinfo=UTC)  # same hour, same month
    assert (await post(proxy, ask(8)))[0] == 429
    clock.now = datetime(2025, 2, 1, 1, 0, 0, tzinfo=UTC)  # next hour, same month
    assert (await post(proxy, ask(8)))[0] == 200
    status, _, headers = await post(proxy, {**ask(8), "model": "gpt-other"})
    assert status == 429 and headers["retry-after"] == str(27 * 24 * 3600 + 23 * 3600)


async def test_per_user_template_gives_each_user_their_own_limit(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rule = """  - name: per-user
    period: daily
    limit_usd: 0.01
    scope: {user: "*"}
"""
    proxy = await start_proxy(
        config(fake_openai.api_base, extra="user_header: X-End-User\n" + budget_yaml(rule)), clock=Clock(T0)
    )
    assert (await post(proxy, ask(8, user="alice")))[0] == 200
    assert (await post(proxy, ask(8), headers={"X-End-User": "bob"}))[0] == 200
    await settled(proxy, 2)
    status, body, _ = await post(proxy, ask(8, user="alice"))
    assert status == 429
    assert body["error"]["message"].startswith("Budget 'per-user' (user alice) exceeded: $0.008 spent")
    # The header wins over the body's user: this is bob's request, and bob is spent too.
    assert (await post(proxy, ask(8, user="carol"), headers={"X-End-User": "bob"}))[0] == 429
    assert (await post(proxy, ask(8, user="carol")))[0] == 200
    # No user at all: the template does not apply.
    assert (await post(proxy, ask(50)))[0] == 200
    report = await settled(proxy, 4)
    assert {r["user"]: r["spent"] for r in report} == {"alice": D("0.008"), "bob": D("0.008"), "carol": D("0.008")}


# ---------------------------------------------------------------------------------------
# Reporting: gauges and the admin endpoint


async def test_budget_gauges_and_the_admin_endpoint(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    rules = DAILY_CENT + """  - name: per-user
    period: daily
    limit_usd: 0.01
    scope: {user: "*"}
"""
    extra = budget_yaml(rules) + f"admin:\n  api_key: {ADMIN}\n"
    proxy = await start_proxy(config(fake_openai.api_base, extra=extra), clock=Clock(T0))
    await post(proxy, ask(3, user="alice"))
    await post(proxy, ask(5, user="bob"))
    await settled(proxy, 2)

    def gauge(metrics: dict[Any, float], name: str, budget: str) -> float | None:
        return metrics.get((name, (("budget", budget),)))

    # The chore refreshes the gauges every 2 s: wait for it, bounded.
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        metrics = await scrape(proxy)
        if gauge(metrics, "tollgate_budget_spent_usd", "daily-cap") == 0.008:
            break
        assert asyncio.get_running_loop().time() < deadline, metrics
        await asyncio.sleep(0.1)
    assert gauge(metrics, "tollgate_budget_limit_usd", "daily-cap") == 0.01
    assert gauge(metrics, "tollgate_budget_remaining_usd", "daily-cap") == pytest.approx(0.002)
    assert gauge(metrics, "tollgate_budget_spent_usd", "per-user") == 0.008  # summed over users
    # What the per-user limit applies to: bob's $0.005, the most any one user spent.
    assert gauge(metrics, "tollgate_budget_bucket_spent_max_usd", "per-user") == 0.005
    assert gauge(metrics, "tollgate_budget_bucket_spent_max_usd", "daily-cap") == 0.008
    assert gauge(metrics, "tollgate_budget_remaining_usd", "per-user") == pytest.approx(0.005)  # bob's
    assert gauge(metrics, "tollgate_budget_reset_timestamp_seconds", "daily-cap") == datetime(
        2025, 6, 16, tzinfo=UTC
    ).timestamp()
    assert gauge(metrics, "tollgate_budget_period_seconds", "daily-cap") == 86400  # what burn rates divide by

    url = proxy.base_url + "/tollgate/budgets"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
        async with s.get(url, headers={"Authorization": "Bearer nope"}) as r:
            assert r.status == 401
        async with s.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 200
            data = await r.json()
    assert data["now"] == "2025-06-15T20:00:00Z"
    assert [(d["name"], d["user"], d["spent"], d["limit_usd"], d["remaining"], d["window_end"]) for d in data["data"]] == [
        ("daily-cap", None, "0.008000000", "0.010000000", "0.002000000", "2025-06-16T00:00:00Z"),
        ("per-user", "alice", "0.003000000", "0.010000000", "0.007000000", "2025-06-16T00:00:00Z"),
        ("per-user", "bob", "0.005000000", "0.010000000", "0.005000000", "2025-06-16T00:00:00Z"),
    ]
    # The forecast at the injected 20:00: 20 of the day's 24 hours gone, pace = spend / 20 h.
    assert [(d["forecast"], d["pace_usd_per_hour"], d["projected_usd"], d["limit_at"]) for d in data["data"]] == [
        ("under", "0.000400000", "0.009600000", None),
        ("under", "0.000150000", "0.003600000", None),
        ("under", "0.000250000", "0.006000000", None),
    ]


async def test_admin_endpoint_is_off_without_an_admin_key(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DAILY_CENT)))
    async with aiohttp.ClientSession() as s, s.get(proxy.base_url + "/tollgate/budgets") as r:
        assert r.status == 403
        assert "admin.api_key" in (await r.json())["error"]["message"]


async def test_a_reused_client_request_id_loses_no_spend_row(start_proxy: StartProxy, fake_openai: FakeUpstream) -> None:
    """Five calls with the same x-request-id are five settlements: the budget and the spend
    log (what `tollgate spend` reports) agree on five requests and their cost."""
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DOLLAR)))
    for _ in range(5):
        status, _, headers = await post(proxy, ask(max_tokens=3), headers={"X-Request-Id": "my-fixed-id"})
        assert status == 200 and headers["X-Request-Id"] == "my-fixed-id"
    report = await settled(proxy, 5)
    assert [(r["requests"], r["spent"]) for r in report] == [(5, D("0.015"))]
    spend = await proxy.runtime.ledger.spend_report(EPOCH, FAR, [])
    assert [(r["requests"], r["cost"]) for r in spend] == [(5, D("0.015"))]


async def test_a_request_outliving_its_lease_keeps_its_reservation(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path
) -> None:
    """A stream that runs 4 s on a 1 s lease: its reservation is renewed while it runs, so a
    request that would only fit without it is refused until it settles."""
    usage = b'data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":8,"total_tokens":17}}\n\n'
    words = [
        b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"w "}}]}\n\n'
    ] * 8
    fake_openai.route(
        "POST", "/v1/chat/completions",
        lambda r: Reply(headers=[("Content-Type", "text/event-stream")], chunks=[*words, usage, b"data: [DONE]\n\n"],
                        delays=[0] + [0.5] * 8 + [0]) if r.json.get("stream") else echo_cap(r),
    )
    extra = budget_yaml(DAILY_CENT) + f"ledger:\n  path: {tmp_path / 'lease.db'}\n  lease_seconds: 1\n"
    proxy = await start_proxy(config(fake_openai.api_base, extra=extra))
    async def stream() -> int:
        async with aiohttp.ClientSession() as s, s.post(proxy.base_url + "/chat/completions", json=ask(8, stream=True)) as r:
            await r.read()
            return r.status

    slow = asyncio.ensure_future(stream())  # reserves $0.008 of $0.01
    await asyncio.sleep(2.5)  # past two and a half leases
    status, body, headers = await post(proxy, ask(5))
    assert status == 429 and body["error"]["code"] == "budget_exceeded"
    # Only the stream in flight stands in the way: come back in seconds, not at midnight.
    assert headers["retry-after"] == "2" and "requests in flight (1) finish" in body["error"]["message"]
    assert await slow == 200
    report = await settled(proxy, 1)
    assert report[0]["spent"] == D("0.008")
    status, _, _ = await post(proxy, ask(2))
    assert status == 200


async def test_a_request_without_max_tokens_learns_what_was_assumed_and_what_fits(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    """No cap: reserved at default_max_tokens (4096 here, $4.096 at $0.001 a token), which a
    client did not know it asked for. The 429 says so, and the cap that would fit."""
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(DOLLAR)))
    status, body, headers = await post(proxy, ask())
    assert status == 429
    message = body["error"]["message"]
    assert "$0.00 spent of the $1.00 limit" in message
    assert "This request reserves up to $4.096 (its prompt, and 4096 output tokens)" in message
    assert "with max_completion_tokens at most 1000 it fits this budget now" in message
    assert headers["x-tollgate-budget-fits-max-tokens"] == "1000"
    status, _, _ = await post(proxy, {**ask(), "max_completion_tokens": 1000})
    assert status == 200


async def test_a_team_budget_is_shared_by_the_teams_keys_and_the_team_reaches_every_record(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    """Issue 15: key metadata `team` scopes a budget shared by that team's keys, and the
    team, the key and the user are in the access log and the spend log."""
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    gamma = "tg-gamma-5555555555"
    keys = f"""
keys:
  - name: alpha
    key_sha256: {hash_key(KEY_ALPHA)}
    metadata: {{team: search, cost_center: "42"}}
  - name: beta
    key_sha256: {hash_key(KEY_BETA)}
    metadata: {{team: search}}
  - name: gamma
    key_sha256: {hash_key(gamma)}
    metadata: {{team: ads}}
user_header: x-end-user
"""
    rules = budget_yaml("""  - name: per-team
    scope: {team: "*"}
    period: daily
    limit_usd: 0.01
""")
    proxy = await start_proxy(config(fake_openai.api_base, extra=keys + rules), clock=Clock(T0))
    await sdk(proxy, KEY_ALPHA).chat.completions.create(**ask(8), extra_headers={"x-end-user": "ann"})
    await settled(proxy, 1)
    # $0.008 of the search team's $0.01 is spent: beta, also search, cannot reserve $0.005 ...
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk(proxy, KEY_BETA).chat.completions.create(**ask(5))
    assert "'per-team' (team search)" in refused.value.message
    # ... while ads has its own bucket.
    await sdk(proxy, gamma).chat.completions.create(**ask(5))
    report = await settled(proxy, 2)
    assert sorted((r["team"], r["spent"]) for r in report if r["name"] == "per-team") == [
        ("ads", D("0.005")), ("search", D("0.008")),
    ]
    by_team = await proxy.runtime.ledger.spend_report(EPOCH, FAR, ["team", "key", "user"])
    assert [(r["team"], r["key"], r["user"], r["cost"]) for r in by_team] == [
        ("ads", "gamma", None, D("0.005")), ("search", "alpha", "ann", D("0.008")),
    ]
    logged = [(r["key"], r["user"], r["team"], r.get("key_metadata"), r["budget"]) for r in log_records(proxy)]
    assert logged == [
        ("alpha", "ann", "search", {"team": "search", "cost_center": "42"}, "ok"),
        ("beta", None, "search", {"team": "search"}, "refused:per-team"),
        ("gamma", None, "ads", {"team": "ads"}, "ok"),
    ]

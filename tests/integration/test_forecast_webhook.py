"""The forecast webhook end to end: real requests through the proxy, a real HTTP receiver on
127.0.0.1, the proxy's clock injected (every instant below is built from T0, never compared
with the real clock).

`gpt-test` costs $0.001 per output token and the fake upstream bills the request's cap, so a
request capped at 3 tokens spends exactly $0.003. The daily window is 24 h; at 20:00, 20 h
have passed, so the projection is spent × 24/20.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web

from tests.integration.conftest import StartProxy
from tests.integration.test_budgets_e2e import T0, Clock, ask, budget_yaml, config, echo_cap, post, settled, wait_until
from tests.support.fake_upstream import FakeUpstream

RULE = """  - name: soft
    period: daily
    limit_usd: 0.01
    action: warn
    thresholds: [1.0]
"""


class Receiver:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        return web.Response(status=204)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.received if r.get("event") == event]


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Any]) -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    server = await aiohttp_server(app)
    yield rec, str(server.make_url("/hook"))


async def test_the_forecast_webhook_fires_once_when_the_projection_first_crosses_the_limit(
    start_proxy: StartProxy, fake_openai: FakeUpstream, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    clock = Clock(T0)  # 20:00: the daily window ends in 4 hours
    extra = budget_yaml(RULE) + f"webhook:\n  url: {url}\n  timeout: 2\n  max_retries: 0\n"
    proxy = await start_proxy(config(fake_openai.api_base, extra=extra), clock=clock)

    # $0.003 → projects $0.0036, $0.006 → $0.0072: within the limit, nothing is sent.
    for n in (1, 2):
        assert (await post(proxy, ask(3)))[0] == 200
        await settled(proxy, n)
    await asyncio.sleep(0.3)
    assert rec.of("budget.forecast_exceeded") == []

    # $0.009 → projects $0.0108 > $0.01: the limit is hit at 0.009/72000 s per $, i.e.
    # ($0.001 left) 8000 s from now.
    assert (await post(proxy, ask(3)))[0] == 200
    await settled(proxy, 3)
    await wait_until(lambda: len(rec.of("budget.forecast_exceeded")) == 1, "the forecast webhook")
    hook = rec.of("budget.forecast_exceeded")[0]
    assert hook == {
        "type": "budget.forecast_exceeded",
        "event": "budget.forecast_exceeded",
        "time": "2025-06-15T20:00:00Z",
        "budget": "soft",
        "bucket": hook["bucket"],
        "action": "warn",
        "scope": {"key": None, "user": None, "team": None, "model": None},
        "forecast": "over",
        "spent": "0.009000000",
        "limit": "0.01",
        "projected": "0.010800000",
        "limit_at": (T0 + timedelta(seconds=8000)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "window": {"start": "2025-06-15T00:00:00Z", "end": "2025-06-16T00:00:00Z"},
    }
    assert "2025-06-15" in hook["bucket"]

    # Still over, then exceeded (and the 100% threshold webhook fires): no second forecast.
    clock.now = T0 + timedelta(minutes=30)
    for n in (4, 5):
        assert (await post(proxy, ask(3)))[0] == 200
        await settled(proxy, n)
    await wait_until(lambda: len(rec.of("budget.threshold_crossed")) == 1, "the 100% threshold webhook")
    await asyncio.sleep(0.3)
    assert len(rec.of("budget.forecast_exceeded")) == 1

    # The next day is a new window: crossing again is news again.
    clock.now = T0 + timedelta(days=1)
    for n in (6, 7, 8):
        assert (await post(proxy, ask(3)))[0] == 200
        await settled(proxy, n)
    await wait_until(lambda: len(rec.of("budget.forecast_exceeded")) == 2, "the next window's forecast webhook")
    second = rec.of("budget.forecast_exceeded")[1]
    assert second["window"] == {"start": "2025-06-16T00:00:00Z", "end": "2025-06-17T00:00:00Z"}
    assert second["bucket"] != hook["bucket"]


async def test_a_settlement_going_straight_over_the_limit_is_announced_without_a_projection(
    start_proxy: StartProxy, fake_openai: FakeUpstream, receiver: tuple[Receiver, str]
) -> None:
    rec, url = receiver
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    clock = Clock(T0)
    extra = budget_yaml(RULE) + f"webhook:\n  url: {url}\n  timeout: 2\n  max_retries: 0\n"
    proxy = await start_proxy(config(fake_openai.api_base, extra=extra), clock=clock)
    assert (await post(proxy, ask(12)))[0] == 200  # $0.012 > $0.01 at once
    await settled(proxy, 1)
    await wait_until(lambda: len(rec.of("budget.forecast_exceeded")) == 1, "the forecast webhook")
    hook = rec.of("budget.forecast_exceeded")[0]
    assert (hook["forecast"], hook["spent"], hook["projected"], hook["limit_at"]) == ("exceeded", "0.012000000", None, None)

"""llama.cpp's own telemetry joined to Tollgate's, against a real llama-server: /metrics and
/slots scraped for the app's lifetime, and each request's time split into queue+network,
prompt eval and generation."""

from __future__ import annotations

import asyncio

import pytest

from proxy import engine_telemetry
from proxy.exchange import Exchange, llamacpp_phases
from tests.integration.conftest import StartProxy, proxy_yaml
from tests.integration.test_real_llamacpp import UNUSED_OPENAI, client, llama, sample, scrape  # noqa: F401
from tests.support.llama_server import LlamaServer


async def test_scrape_and_phases_against_real_llama_server(
    start_proxy: StartProxy, llama: LlamaServer, monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setattr(engine_telemetry, "SCRAPE_INTERVAL", 0.1)
    proxy = await start_proxy(proxy_yaml(UNUSED_OPENAI, llama_root=llama.url))
    sdk = client(proxy.base_url)
    messages = [{"role": "user", "content": "Name three colors."}]
    await sdk.chat.completions.create(model="local", messages=messages, max_tokens=8, seed=1)  # type: ignore[arg-type]
    stream = await sdk.chat.completions.create(
        model="local", messages=messages, max_tokens=8, seed=1, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )
    async for _ in stream:
        pass
    text = ""
    for _ in range(100):
        text = await scrape(proxy.metrics_url)
        if sample(text, "tollgate_llamacpp_slots_total", upstream="llamacpp") >= 1:
            break
        await asyncio.sleep(0.1)
    assert sample(text, "tollgate_llamacpp_scrape_up", upstream="llamacpp") == 1
    assert sample(text, "tollgate_llamacpp_slots_total", upstream="llamacpp") >= 1
    assert 'tollgate_llamacpp_slots_busy{upstream="llamacpp"}' in text
    assert 'tollgate_llamacpp_requests_deferred{upstream="llamacpp"}' in text
    assert 'tollgate_llamacpp_requests_processing{upstream="llamacpp"}' in text
    # This server no longer exports kv_cache_usage_ratio: the gauge stays unset, never 0.
    assert 'tollgate_llamacpp_kv_cache_usage_ratio{upstream="llamacpp"}' not in text
    for phase in ("queue_network", "prompt_eval", "generation"):
        count = sample(text, "tollgate_llamacpp_request_phase_seconds_count", upstream="llamacpp", phase=phase)
        assert count == 2, phase
        assert sample(text, "tollgate_llamacpp_request_phase_seconds_sum", upstream="llamacpp", phase=phase) >= 0
    # Shutdown stops the scraper (a probe task) with the app.
    rt = proxy.runtime
    assert any(not t.done() for t in rt.probes)
    await proxy.server.close()
    assert not rt.probes or all(t.done() for t in rt.probes)


async def test_a_server_that_does_not_answer_reads_as_down(start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_telemetry, "SCRAPE_INTERVAL", 0.05)
    proxy = await start_proxy(proxy_yaml(UNUSED_OPENAI, llama_root="http://127.0.0.1:9"))
    text = ""
    for _ in range(100):
        text = await scrape(proxy.metrics_url)
        if 'tollgate_llamacpp_scrape_up{upstream="llamacpp"}' in text:
            break
        await asyncio.sleep(0.05)
    assert sample(text, "tollgate_llamacpp_scrape_up", upstream="llamacpp") == 0
    assert 'tollgate_llamacpp_slots_total{upstream="llamacpp"}' not in text


def test_parsers() -> None:
    text = "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 3\nx{a=\"b\"} 1\nbad line\n"
    assert engine_telemetry.parse_prometheus_text(text) == {"llamacpp:requests_deferred": 3.0}
    slots = [{"id": 0, "is_processing": True}, {"id": 1, "is_processing": False}, "junk"]
    assert engine_telemetry.slot_counts(slots) == (1, 3)
    assert engine_telemetry.slot_counts({"error": "slots off"}) is None


def test_phases_from_timings() -> None:
    ex = Exchange(request_id="r", endpoint="chat", method="POST", path="/v1/chat/completions", t0_ns=0)
    ex.llamacpp_timings = {"prompt_ms": 20.0, "predicted_ms": 100.0}
    ex.t_upstream_sent_ns = 1_000_000_000
    ex.stream = True
    ex.t_first_token_ns = ex.t_upstream_sent_ns + 25_000_000
    phases = llamacpp_phases(ex)
    assert phases["prompt_eval"] == pytest.approx(0.02) and phases["generation"] == pytest.approx(0.1)
    assert phases["queue_network"] == pytest.approx(0.005)
    ex.stream = False
    ex.t_end_ns = ex.t_upstream_sent_ns + 110_000_000  # less than the server's own work: two clocks
    assert llamacpp_phases(ex)["queue_network"] == 0.0

"""End to end through the exports: /metrics on the metrics port, OTLP spans to an in-process
receiver, the JSON access log, the summary endpoint, and a failing observer.

Each export is checked against the Exchange the proxy itself recorded (kept by a `Recorder`
observer), so a value that is exported wrong, or not at all, fails here.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client.parser import text_string_to_metric_families

from proxy.exchange import Exchange
from tests.integration.conftest import Proxy, StartProxy, proxy_yaml
from tests.integration.test_fidelity import (
    CHAT_BODY,
    MODEL,
    RESPONSE_MODEL,
    content_stream,
    timed_post,
)
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import (
    FakeUpstream,
    RecordedRequest,
    Reply,
    openai_error_body,
    openai_usage_aware,
)
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.procs import free_port
from tests.support.recorder import Recorder

USAGE = {
    "prompt_tokens": 1500,
    "completion_tokens": 10,
    "total_tokens": 1510,
    "prompt_tokens_details": {"cached_tokens": 1280, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 4, "audio_tokens": 0},
}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
CLIENT_KEY = "sk-client-SECRET-7f3a9c"
PROMPT_MARKER = "PROMPT-MARKER-q8w7e6"
COMPLETION_WORD = " COMPLETIONMARKER"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scripted_openai(
    fake: FakeUpstream, *, ttft: float = 0.05, gap: float = 0.005, n_tokens: int = 10
) -> None:
    """chat/completions on `fake`: streams are scripted; `gpt-fail` answers 500;
    `gpt-nousage` gets chat-basic without its usage; other non-stream requests get chat-basic."""
    script = content_stream(
        n_tokens=n_tokens, ttft=ttft, gap=gap, usage=USAGE, word=COMPLETION_WORD
    )
    stream_reply = script.handler()
    basic_cap = openai_capture("chat-basic")
    basic = Reply.from_capture(basic_cap)
    without_usage = json.loads(basic_cap.body)
    del without_usage["usage"]
    no_usage = Reply.json(without_usage)
    failure = Reply(
        status=500,
        headers=[("Content-Type", "application/json")],
        chunks=[openai_error_body("The server had an error.", "server_error")],
    )

    def reply(request: RecordedRequest) -> Reply:
        body = request.json if isinstance(request.json, dict) else {}
        if body.get("model") == "gpt-fail":
            return failure
        if body.get("model") == "gpt-nousage":
            return no_usage
        return stream_reply(request) if body.get("stream") else basic

    fake.route("POST", "/v1/chat/completions", reply)


async def scrape(proxy: Proxy) -> Samples:
    async with aiohttp.ClientSession() as s, s.get(proxy.metrics_url) as r:
        assert r.status == 200
        text = await r.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def chat(
    proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, bytes, CIMultiDict[str]]:
    posted = await timed_post(proxy.base_url + "/chat/completions", body, headers)
    return posted.status, posted.body, posted.headers


# --- Prometheus ------------------------------------------------------------------------------------


async def test_metrics_equal_the_exchanges(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    scripted_openai(fake_openai, ttft=0.2)
    rec = Recorder()
    proxy = await start_proxy(
        proxy_yaml(fake_openai.api_base, default_upstream="openai"), observers=[rec]
    )

    # While a stream is open, it is in flight.
    task = asyncio.create_task(chat(proxy, CHAT_BODY))
    await fake_openai.wait_request(1)
    during = await scrape(proxy)
    assert value(during, "tollgate_in_flight_requests", upstream="openai") == 1
    assert value(during, "tollgate_open_streams", upstream="openai") == 1
    assert (await task)[0] == 200
    stream_ex = await rec.wait(1)

    assert (
        await chat(
            proxy,
            {
                "model": "gpt-5-nano",
                "messages": [{"role": "user", "content": "Hello!"}],
            },
        )
    )[0] == 200
    plain_ex = await rec.wait(2)
    # Only the default upstream takes this one: its label is "other", not the name.
    assert (
        await chat(
            proxy,
            {
                "model": "mystery-llm-7b",
                "messages": [{"role": "user", "content": "Hi"}],
            },
        )
    )[0] == 200
    other_ex = await rec.wait(3)
    assert (await chat(proxy, {**CHAT_BODY, "model": "gpt-fail", "stream": False}))[
        0
    ] == 500
    failed_ex = await rec.wait(4)
    assert (
        await chat(
            proxy,
            {
                "model": "gpt-nousage",
                "messages": [{"role": "user", "content": "Hello!"}],
            },
        )
    )[0] == 200
    estimated_ex = await rec.wait(5)
    exchanges = [stream_ex, plain_ex, other_ex, failed_ex, estimated_ex]

    m = await scrape(proxy)
    route = {"upstream": "openai", "endpoint": "chat.completions"}
    assert (
        value(
            m,
            "tollgate_requests_total",
            model="gpt-*",
            status_class="2xx",
            stream="true",
            **route,
        )
        == 1
    )
    assert (
        value(
            m,
            "tollgate_requests_total",
            model="gpt-*",
            status_class="2xx",
            stream="false",
            **route,
        )
        == 2
    )
    assert (
        value(
            m,
            "tollgate_requests_total",
            model="gpt-*",
            status_class="5xx",
            stream="false",
            **route,
        )
        == 1
    )
    assert (
        value(
            m,
            "tollgate_requests_total",
            model="other",
            status_class="2xx",
            stream="false",
            **route,
        )
        == 1
    )
    assert value(m, "tollgate_requests_total") == 5
    assert not any(
        ("model", "mystery-llm-7b") in ls or ("model", MODEL) in ls for _, ls in m
    )
    assert value(m, "tollgate_upstream_errors_total", upstream="openai") == 1

    # Histograms: _count and _sum are exactly the exchanges' values.
    def check_hist(name: str, values: list[float], **labels: str) -> None:
        assert value(m, name + "_count", **labels) == len(values), name
        assert value(m, name + "_sum", **labels) == pytest.approx(
            sum(values), rel=1e-9, abs=1e-12
        ), name

    def durations(exs: list[Exchange]) -> list[float]:
        return [e.duration_s for e in exs if e.duration_s is not None]

    check_hist(
        "tollgate_request_duration_seconds",
        durations([stream_ex]),
        model="gpt-*",
        stream="true",
    )
    check_hist(
        "tollgate_request_duration_seconds",
        durations([plain_ex, failed_ex, estimated_ex]),
        model="gpt-*",
        stream="false",
    )
    check_hist(
        "tollgate_request_duration_seconds", durations([other_ex]), model="other"
    )
    # The fake's sleeps never run short.
    assert stream_ex.ttft_s is not None and stream_ex.ttft_s >= 0.2
    check_hist("tollgate_time_to_first_token_seconds", [stream_ex.ttft_s])
    assert stream_ex.upstream_ttft_s is not None
    check_hist(
        "tollgate_upstream_time_to_first_token_seconds", [stream_ex.upstream_ttft_s]
    )
    assert len(stream_ex.gaps_ns) == 9
    check_hist(
        "tollgate_inter_token_gap_seconds",
        [g / 1e9 for g in stream_ex.gaps_ns],
        model="gpt-*",
    )
    assert stream_ex.tpot_s is not None
    check_hist(
        "tollgate_time_per_output_token_seconds", [stream_ex.tpot_s], model="gpt-*"
    )
    check_hist("tollgate_proxy_overhead_seconds", [e.overhead_s for e in exchanges])
    # The one TTFT observation sits in the right buckets (cumulative).
    buckets = {
        dict(ls)["le"]: v
        for (n, ls), v in m.items()
        if n == "tollgate_time_to_first_token_seconds_bucket"
    }
    assert len(buckets) > 10
    for le, count in buckets.items():
        assert count == (1 if stream_ex.ttft_s <= float(le) else 0), le

    # Tokens by kind and source: stream (USAGE) and chat-basic, both reported upstream.
    assert stream_ex.usage is not None and plain_ex.usage is not None
    tokens = {"model": "gpt-*", "upstream": "openai", "source": "upstream"}
    assert (
        value(m, "tollgate_tokens_total", kind="input", **tokens) == (1500 - 1280) + 8
    )
    assert value(m, "tollgate_tokens_total", kind="cached_input", **tokens) == 1280
    assert value(m, "tollgate_tokens_total", kind="output", **tokens) == (10 - 4) + (
        377 - 320
    )
    assert value(m, "tollgate_tokens_total", kind="reasoning", **tokens) == 4 + 320
    # No usage in the body: estimated, and labelled so.
    est = estimated_ex.usage
    assert est is not None and (est.input_source, est.output_source) == (
        "estimated",
        "estimated",
    )
    assert est.input_tokens > 0 and est.output_tokens > 0
    assert (
        value(
            m, "tollgate_tokens_total", source="estimated", kind="input", model="gpt-*"
        )
        == est.input_tokens
    )
    assert (
        value(
            m, "tollgate_tokens_total", source="estimated", kind="output", model="gpt-*"
        )
        == est.output_tokens
    )
    assert (
        value(m, "tollgate_tokens_total", source="estimated")
        == est.input_tokens + est.output_tokens
    )
    assert value(m, "tollgate_tokens_total", model="other", kind="reasoning") == 320

    # Cost in USD: the Decimal costs, summed.
    gpt_cost = sum(
        (e.cost for e in (stream_ex, plain_ex, estimated_ex) if e.cost is not None),
        Decimal(0),
    )
    assert (
        stream_ex.cost
        == (220 * Decimal("0.15") + 1280 * Decimal("0.075") + 10 * Decimal("0.60"))
        / 10**6
    )
    assert value(
        m, "tollgate_cost_usd_total", model="gpt-*", upstream="openai", key="none"
    ) == pytest.approx(float(gpt_cost))
    # mystery-llm-7b has no price: cost 0, counted.
    assert other_ex.cost == 0 and not other_ex.priced
    assert value(m, "tollgate_unpriced_requests_total", model="other") == 1

    assert value(m, "tollgate_in_flight_requests") == 0
    assert value(m, "tollgate_open_streams") == 0
    assert value(m, "tollgate_build_info") == 1


# --- OpenTelemetry ---------------------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = await OtlpReceiver().start()
    yield r
    await r.stop()


@pytest.fixture
async def tracer_provider(receiver: OtlpReceiver) -> AsyncIterator[TracerProvider]:
    provider = TracerProvider()
    exporter = OTLPSpanExporter(endpoint=receiver.endpoint + "/v1/traces", timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=50))
    yield provider
    # The exporter posts from its own thread to the receiver on this loop: never block the loop.
    await asyncio.to_thread(provider.shutdown)


async def test_trace_span_genai_attributes_first_token_and_traceparent(
    start_proxy: StartProxy,
    fake_openai: FakeUpstream,
    receiver: OtlpReceiver,
    tracer_provider: TracerProvider,
) -> None:
    scripted_openai(fake_openai)
    rec = Recorder()
    proxy = await start_proxy(
        proxy_yaml(fake_openai.api_base),
        observers=[rec],
        tracer_provider=tracer_provider,
    )
    incoming = f"00-{TRACE_ID}-{PARENT_ID}-01"
    status, _, _ = await chat(
        proxy,
        {**CHAT_BODY, "temperature": 0.5, "max_tokens": 64},
        {"traceparent": incoming},
    )
    assert status == 200
    ex = await rec.wait()
    assert await asyncio.to_thread(tracer_provider.force_flush, 5000)
    (span,) = await receiver.wait_for_spans(1)

    assert span.name == f"chat {MODEL}"
    assert span.is_client and not span.is_error
    # Continued: same trace, the caller's span is the parent ...
    assert span.trace_id == TRACE_ID and span.parent_span_id == PARENT_ID
    # ... and passed on: the upstream saw our span as its parent.
    assert (
        fake_openai.requests[0].headers["traceparent"]
        == f"00-{TRACE_ID}-{span.span_id}-01"
    )

    a = span.attributes
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.response.model"] == RESPONSE_MODEL
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.max_tokens"] == 64
    assert a["gen_ai.usage.input_tokens"] == 1500
    assert a["gen_ai.usage.output_tokens"] == 10
    assert a["gen_ai.usage.cache_read.input_tokens"] == 1280
    assert a["gen_ai.usage.reasoning.output_tokens"] == 4
    assert a["gen_ai.response.finish_reasons"] == ["stop"]
    assert a["gen_ai.response.time_to_first_chunk"] == ex.ttft_s
    assert a["tollgate.cost_usd"] == str(ex.cost)
    assert a["tollgate.request_id"] == ex.request_id
    assert "error.type" not in a
    # Set by the production path (forward.send), from the upstream actually called.
    upstream_url = urlsplit(fake_openai.api_base)
    assert (a["server.address"], a["server.port"]) == (upstream_url.hostname, upstream_url.port)

    (event,) = [e for e in span.events if e.name == "tollgate.first_token"]
    assert ex.t_first_token_ns is not None and ex.t_end_ns is not None
    assert (
        event.time_unix_nano - span.start_time_unix_nano
        == ex.t_first_token_ns - ex.t0_ns
    )
    assert span.end_time_unix_nano - span.start_time_unix_nano == ex.t_end_ns - ex.t0_ns


async def test_trace_error_type_on_upstream_failures(
    start_proxy: StartProxy,
    fake_openai: FakeUpstream,
    receiver: OtlpReceiver,
    tracer_provider: TracerProvider,
) -> None:
    scripted_openai(fake_openai)
    rec = Recorder()
    proxy = await start_proxy(
        proxy_yaml(fake_openai.api_base),
        observers=[rec],
        tracer_provider=tracer_provider,
    )
    assert (await chat(proxy, {**CHAT_BODY, "model": "gpt-fail", "stream": False}))[
        0
    ] == 500
    dead = await start_proxy(
        proxy_yaml(f"http://127.0.0.1:{free_port()}/v1"),
        observers=[rec],
        tracer_provider=tracer_provider,
    )
    assert (await chat(dead, CHAT_BODY))[0] == 502
    await rec.wait(2)
    assert await asyncio.to_thread(tracer_provider.force_flush, 5000)
    spans = await receiver.wait_for_spans(2)
    by_status = {s.attributes["http.response.status_code"]: s for s in spans}
    assert set(by_status) == {500, 502}
    assert by_status[500].is_error and by_status[500].attributes["error.type"] == "500"
    assert (
        by_status[502].is_error
        and by_status[502].attributes["error.type"] == "upstream_unreachable"
    )
    assert rec.finished[1].error_type == "upstream_unreachable"


# --- JSON access log -------------------------------------------------------------------------------


async def test_access_log_line_per_request_without_secrets_or_payloads(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    scripted_openai(fake_openai)
    rec = Recorder()
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base), observers=[rec])
    secret_headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    body = {
        **CHAT_BODY,
        "messages": [{"role": "user", "content": f"Secret prompt {PROMPT_MARKER}"}],
    }
    status, relayed, headers = await chat(proxy, body, secret_headers)
    assert status == 200 and COMPLETION_WORD.encode() in relayed
    assert (
        await chat(
            proxy, {**body, "model": "gpt-fail", "stream": False}, secret_headers
        )
    )[0] == 500
    ex, failed = await rec.wait(1), await rec.wait(2)
    # The upstream key really was in play (the proxy sent it), and so was the client's.
    assert (
        fake_openai.requests[0].headers["Authorization"] == "Bearer sk-upstream-secret"
    )

    raw = proxy.access_log.getvalue()
    for secret in (
        CLIENT_KEY.encode(),
        b"sk-upstream-secret",
        b"Bearer",
        PROMPT_MARKER.encode(),
        COMPLETION_WORD.strip().encode(),
    ):
        assert secret not in raw
    lines = proxy.log_lines()
    assert len(lines) == 2
    line = orjson.loads(lines[0])
    gap_mean, gap_p95 = ex.gap_stats_s()
    assert ex.usage is not None
    expected = {
        "request_id": headers["X-Request-Id"],
        "model": MODEL,
        "upstream": "openai",
        "status": 200,
        "stream": True,
        "ttft_s": ex.ttft_s,
        "gap_mean_s": gap_mean,
        "gap_p95_s": gap_p95,
        "duration_s": ex.duration_s,
        "cost_usd": str(ex.cost),
        "error_type": None,
        "tokens": {
            "input": 1500,
            "cached_input": 1280,
            "cache_write": 0,
            "output": 10,
            "reasoning": 4,
            "input_source": "upstream",
            "output_source": "upstream",
        },
    }
    assert {k: line[k] for k in expected} == expected
    assert line["request_id"] == ex.request_id
    assert (
        gap_mean is not None
        and line["ttft_s"] is not None
        and line["duration_s"] > line["ttft_s"]
    )
    bad = orjson.loads(lines[1])
    assert (bad["status"], bad["request_id"], bad["error_type"]) == (
        500,
        failed.request_id,
        failed.error_type,
    )
    assert bad["stream"] is False and bad["ttft_s"] is None


async def test_access_log_payloads_only_when_configured(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    # The contrast that proves the grep above could fail: payloads on, text appears (keys never).
    scripted_openai(fake_openai)
    rec = Recorder()
    extra = "logging:\n  payloads: truncated\n  payload_max_chars: 100\n"
    proxy = await start_proxy(
        proxy_yaml(fake_openai.api_base, extra=extra), observers=[rec]
    )
    body = {
        **CHAT_BODY,
        "messages": [{"role": "user", "content": f"Secret prompt {PROMPT_MARKER}"}],
    }
    assert (await chat(proxy, body, {"Authorization": f"Bearer {CLIENT_KEY}"}))[
        0
    ] == 200
    await rec.wait()
    raw = proxy.access_log.getvalue()
    assert PROMPT_MARKER.encode() in raw and COMPLETION_WORD.strip().encode() in raw
    assert CLIENT_KEY.encode() not in raw and b"sk-upstream-secret" not in raw
    line = orjson.loads(proxy.log_lines()[0])
    assert line["prompt"] == f"user: Secret prompt {PROMPT_MARKER}"
    assert line["completion"] == (COMPLETION_WORD * 10)[:100] + "…"


# --- a failing observer ----------------------------------------------------------------------------


class Boom:
    def on_start(self, ex: Exchange) -> None:
        raise RuntimeError("boom in on_start")

    def on_first_token(self, ex: Exchange) -> None:
        raise RuntimeError("boom in on_first_token")

    def on_finish(self, ex: Exchange) -> None:
        raise RuntimeError("boom in on_finish")


async def test_raising_observer_breaks_nothing(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    cap = openai_capture("chat-streaming")
    fake_openai.route(
        "POST",
        cap.path,
        openai_usage_aware(
            cap,
            {"prompt_tokens": 8, "completion_tokens": 26, "total_tokens": 34},
            gap=0.002,
        ),
    )
    rec = Recorder()
    proxy = await start_proxy(proxy_yaml(fake_openai.api_base), observers=[Boom(), rec])
    direct = await timed_post(
        fake_openai.api_base + "/chat/completions", cap.request_body
    )
    proxied = await timed_post(proxy.base_url + "/chat/completions", cap.request_body)
    assert proxied.status == 200
    assert (
        proxied.body == direct.body == cap.body
    )  # relayed byte for byte, usage still stripped
    ex = await rec.wait()
    # The observers after it ran every hook: the recorder, the metrics and the log line.
    assert rec.started == [ex] and len(rec.first_token_ns) == 1
    assert (
        ex.ttft_s is not None and ex.usage is not None and ex.usage.output_tokens == 26
    )
    assert len(proxy.log_lines()) == 1
    m = await scrape(proxy)
    assert value(m, "tollgate_observer_errors_total", observer="Boom") == 3
    assert value(m, "tollgate_observer_errors_total") == 3
    assert value(m, "tollgate_requests_total", status_class="2xx") == 1
    assert value(m, "tollgate_time_to_first_token_seconds_count") == 1
    assert proxy.runtime.observers.failures == 3


# --- summary -----------------------------------------------------------------------------------------


async def test_summary_after_traffic(
    start_proxy: StartProxy, fake_openai: FakeUpstream
) -> None:
    scripted_openai(fake_openai, ttft=0.05)
    rec = Recorder()
    proxy = await start_proxy(
        proxy_yaml(fake_openai.api_base, default_upstream="openai"), observers=[rec]
    )
    for body in (
        CHAT_BODY,
        CHAT_BODY,
        {**CHAT_BODY, "model": "gpt-fail", "stream": False},
        {"model": "mystery-llm-7b", "messages": [{"role": "user", "content": "Hi"}]},
    ):
        await chat(proxy, body)
    await rec.wait(4)
    async with (
        aiohttp.ClientSession() as s,
        s.get(proxy.base_url + "/tollgate/summary") as r,
    ):
        assert r.status == 200
        summary = json.loads(await r.text())
    assert summary["requests"] == 4 and summary["errors"] == 1
    assert set(summary["models"]) == {"gpt-*", "other"}
    gpt = summary["models"]["gpt-*"]
    assert (gpt["requests"], gpt["errors"], gpt["ttft_samples"]) == (3, 1, 2)
    ttfts = sorted(e.ttft_s for e in rec.finished if e.ttft_s is not None)
    assert len(ttfts) == 2
    # Log buckets: within ~2.2 % of the nearest-rank sample.
    assert gpt["ttft_p50_s"] == pytest.approx(ttfts[0], rel=0.025)
    assert gpt["ttft_p95_s"] == pytest.approx(ttfts[1], rel=0.025)
    assert gpt["tokens"] == {
        "input": 2 * 220,
        "cached_input": 2 * 1280,
        "cache_write": 0,
        "output": 2 * 6,
        "reasoning": 2 * 4,
    }
    gpt_cost = sum(
        (
            e.cost
            for e in rec.finished
            if e.model_label == "gpt-*" and e.cost is not None
        ),
        Decimal(0),
    )
    assert Decimal(gpt["cost_usd"]) == gpt_cost > 0
    other = summary["models"]["other"]
    assert (other["requests"], other["errors"], other["unpriced"]) == (1, 0, 1)
    assert other["tokens"]["reasoning"] == 320
    assert Decimal(summary["cost_usd"]) == gpt_cost

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.exchange import Exchange
from proxy.observers.tracing import (
    FIRST_TOKEN_EVENT,
    CountingBatchSpanProcessor,
    TracingObserver,
    make_tracer_provider,
    provider_name,
)
from proxy.usage import Usage
from tests.support.exchanges import chat_exchange
from tests.support.otlp_receiver import OtlpReceiver

T0 = 7_000_000_000
MS = 1_000_000
WALL = 1_700_000_000.25
INCOMING_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
INCOMING_PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{INCOMING_TRACE}-{INCOMING_PARENT}-01"


def exchange(**kw: Any) -> Exchange:
    endpoint = kw.pop("endpoint", "chat.completions")
    defaults: dict[str, Any] = dict(
        requested_model="gpt-4o-mini",
        route_model="gpt-4o-mini",
        upstream="openai",
        upstream_kind="openai",
        stream=True,
        output_cap=256,
        key_name="team-a",
        body={"model": "gpt-4o-mini", "messages": [], "temperature": 0.2, "max_tokens": 256},
    )
    return chat_exchange("req-1", T0, WALL, {**defaults, **kw}, endpoint)


def finish_ok(ex: Exchange) -> None:
    ex.t_upstream_sent_ns = T0 + 1 * MS
    ex.t_first_byte_ns = T0 + 100 * MS
    ex.t_first_token_ns = T0 + 150 * MS
    ex.t_first_content_ns = T0 + 150 * MS
    ex.t_last_token_ns = T0 + 350 * MS
    ex.t_end_ns = T0 + 400 * MS
    ex.gaps_ns = [100 * MS, 100 * MS]
    ex.status, ex.outcome = 200, "ok"
    ex.response_model = "gpt-4o-mini-2024-07-18"
    ex.response_id = "chatcmpl-abc"
    ex.finish_reasons = ["stop"]
    ex.usage = Usage(
        input_tokens=50,
        cached_input_tokens=10,
        output_tokens=11,
        reasoning_tokens=2,
        input_source="upstream",
        output_source="estimated",
    )
    ex.cost = Decimal("0.0000123")
    ex.upstream_url = "https://api.openai.com/v1"


def run(obs: TracingObserver, ex: Exchange, finish: Any = finish_ok) -> dict[str, str]:
    """Fires the hooks as the proxy does; returns the headers that went upstream."""
    obs.on_start(ex)
    headers: dict[str, str] = {}
    obs.on_request_headers(ex, headers)
    finish(ex)
    if ex.t_first_token_ns is not None:
        obs.on_first_token(ex)
    obs.on_finish(ex)
    return headers


@pytest.fixture
def memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_span_details_in_memory(memory: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = memory
    obs = TracingObserver(provider)
    ex = exchange(traceparent=TRACEPARENT)
    run(obs, ex)

    (span,) = exporter.get_finished_spans()
    assert span.name == "chat gpt-4o-mini"
    assert span.kind == SpanKind.CLIENT
    assert format(span.context.trace_id, "032x") == INCOMING_TRACE
    assert span.parent is not None and format(span.parent.span_id, "016x") == INCOMING_PARENT
    wall0 = int(WALL * 1e9)
    assert span.start_time == wall0
    assert span.end_time == wall0 + 400 * MS
    a = dict(span.attributes or {})
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert a["gen_ai.response.id"] == "chatcmpl-abc"
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("stop",)
    assert a["gen_ai.request.max_tokens"] == 256
    assert a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.stream"] is True
    assert a["gen_ai.usage.input_tokens"] == 50
    assert a["gen_ai.usage.output_tokens"] == 11
    assert a["gen_ai.usage.cache_read.input_tokens"] == 10
    assert a["gen_ai.usage.reasoning.output_tokens"] == 2
    assert a["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.15)
    assert a["server.address"] == "api.openai.com" and a["server.port"] == 443
    assert a["tollgate.ttft_s"] == pytest.approx(0.15)
    assert a["tollgate.duration_s"] == pytest.approx(0.4)
    # 200 ms over 11 output tokens less 2 hidden reasoning tokens, less the first: 8.
    assert a["tollgate.tpot_s"] == pytest.approx(0.2 / 8)
    assert a["tollgate.ttfc_s"] == pytest.approx(0.15)
    assert a["tollgate.gap_mean_s"] == pytest.approx(0.1)
    assert a["tollgate.gap_p95_s"] == pytest.approx(0.1)
    assert a["tollgate.cost_usd"] == "0.0000123"
    assert a["tollgate.request_id"] == "req-1"
    assert a["tollgate.usage.input_source"] == "upstream"
    assert a["tollgate.usage.output_source"] == "estimated"
    assert "error.type" not in a
    assert span.status.status_code == StatusCode.UNSET

    (event,) = span.events
    assert event.name == FIRST_TOKEN_EVENT
    assert event.timestamp == wall0 + 150 * MS
    assert event.attributes["gen_ai.response.time_to_first_chunk"] == pytest.approx(0.15)


def test_trace_headers_carry_our_span(memory: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = memory
    obs = TracingObserver(provider)
    ex = exchange(traceparent=TRACEPARENT)
    ex.tracestate = "vendor=abc"
    obs.on_start(ex)
    headers: dict[str, str] = {}
    obs.on_request_headers(ex, headers)
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", INCOMING_TRACE, "01")
    assert span_id != INCOMING_PARENT  # the upstream continues our span, not the caller's
    assert headers["tracestate"] == "vendor=abc"
    finish_ok(ex)
    obs.on_finish(ex)
    (span,) = exporter.get_finished_spans()
    assert format(span.context.span_id, "016x") == span_id


def test_new_trace_without_traceparent(memory: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = memory
    obs = TracingObserver(provider)
    ex = exchange(traceparent=None, requested_model=None, endpoint="models", stream=False)
    headers = run(obs, ex)
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert span.name == "list_models"  # no model: the operation alone
    assert headers["traceparent"].split("-")[1] == format(span.context.trace_id, "032x")


def test_failure_sets_error_type_and_status(memory: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = memory
    obs = TracingObserver(provider)

    def timeout(ex: Exchange) -> None:
        ex.t_upstream_sent_ns = T0 + MS
        ex.t_end_ns = T0 + 30_000 * MS
        ex.status, ex.outcome = 504, "proxy_error"
        ex.error_type, ex.error_message = "upstream_timeout", "upstream did not answer in 30 s"

    def upstream_429(ex: Exchange) -> None:
        ex.t_end_ns = T0 + 5 * MS
        ex.status, ex.outcome = 429, "upstream_error"

    run(obs, exchange(), timeout)
    run(obs, exchange(endpoint="embeddings", requested_model="text-embedding-3-small"), upstream_429)
    first, second = exporter.get_finished_spans()
    assert first.attributes["error.type"] == "upstream_timeout"
    assert first.status.status_code == StatusCode.ERROR
    assert first.status.description == "upstream did not answer in 30 s"
    assert not first.events  # no first token, no event
    assert second.name == "embeddings text-embedding-3-small"
    assert second.attributes["error.type"] == "429"
    assert second.status.status_code == StatusCode.ERROR


def test_provider_names() -> None:
    assert provider_name("openai") == "openai"
    assert provider_name("llamacpp") == "llama.cpp"
    assert provider_name("vllm") == "vllm"
    assert provider_name(None) is None


def test_make_tracer_provider_off_unless_configured() -> None:
    assert make_tracer_provider(env={}) is None
    assert make_tracer_provider(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "none"}) is None
    assert make_tracer_provider(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}) is None
    with pytest.raises(ValueError, match="unsupported"):
        make_tracer_provider(env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    grpc = make_tracer_provider(
        env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert grpc is not None
    grpc.shutdown()


class _SlowExporter:
    """Blocks every export until released, so the queue fills up."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.entered.set()
        self.release.wait(5)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def test_dropped_spans_are_counted() -> None:
    exporter = _SlowExporter()
    drops: list[int] = []
    processor = CountingBatchSpanProcessor(
        exporter,  # type: ignore[arg-type]
        max_queue_size=4,
        on_drop=lambda: drops.append(1),
        max_export_batch_size=4,
        schedule_delay_millis=60_000,
    )
    assert processor.counting
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for _ in range(4):  # a full batch wakes the worker, which then blocks in export
        tracer.start_span("s").end()
    assert exporter.entered.wait(5)
    for _ in range(26):  # 4 fit in the queue, 22 are dropped
        tracer.start_span("s").end()
    exporter.release.set()
    provider.shutdown()
    assert processor.dropped == 22
    assert len(drops) == 22
    assert exporter.exported == 8


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    r = await OtlpReceiver().start()
    yield r
    await r.stop()


async def test_real_otlp_http_exporter(receiver: OtlpReceiver) -> None:
    provider = make_tracer_provider(
        service_name="tollgate-test",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=t1"},
    )
    assert provider is not None
    obs = TracingObserver(provider)
    run(obs, exchange(traceparent=TRACEPARENT))

    def fail(ex: Exchange) -> None:
        ex.t_upstream_sent_ns = T0 + MS
        ex.t_end_ns = T0 + 2 * MS
        ex.status, ex.outcome, ex.error_type = 502, "proxy_error", "upstream_unreachable"

    run(obs, exchange(requested_model="local-llama", upstream_kind="llamacpp"), fail)

    loop = asyncio.get_running_loop()
    # The exporter is synchronous and talks to a server on this loop: flush off-loop.
    assert await loop.run_in_executor(None, provider.force_flush, 5000)
    spans = await receiver.wait_for_spans(2)
    await loop.run_in_executor(None, provider.shutdown)

    assert receiver.content_types[0] == "application/x-protobuf"
    assert receiver.headers[0]["x-tenant"] == "t1"  # headers come from the injected env
    ok = receiver.by_name("chat gpt-4o-mini")
    assert ok.is_client
    assert ok.trace_id == INCOMING_TRACE and ok.parent_span_id == INCOMING_PARENT
    assert ok.attributes["gen_ai.usage.input_tokens"] == 50
    assert ok.attributes["gen_ai.provider.name"] == "openai"
    assert ok.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert ok.attributes["tollgate.cost_usd"] == "0.0000123"
    assert [e.name for e in ok.events] == [FIRST_TOKEN_EVENT]
    assert ok.end_time_unix_nano - ok.start_time_unix_nano == 400 * MS
    assert ok.resource["service.name"] == "tollgate-test"
    assert not ok.is_error

    bad = receiver.by_name("chat local-llama")
    assert bad.attributes["error.type"] == "upstream_unreachable"
    assert bad.attributes["gen_ai.provider.name"] == "llama.cpp"
    assert bad.is_error
    assert bad.parent_span_id == ""  # no incoming traceparent: a new root
    assert len(spans) == 2


async def test_signal_specific_endpoint_used_as_is(receiver: OtlpReceiver) -> None:
    provider = make_tracer_provider(
        env={
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/v1/traces",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "from-env",
        }
    )
    assert provider is not None
    run(TracingObserver(provider), exchange(endpoint="completions", requested_model="davinci-002"))
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, provider.force_flush, 5000)
    (span,) = await receiver.wait_for_spans(1)
    await loop.run_in_executor(None, provider.shutdown)
    assert span.name == "text_completion davinci-002"
    assert span.resource["service.name"] == "from-env"

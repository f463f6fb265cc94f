"""OpenTelemetry traces: one CLIENT span per exchange, with GenAI semantic-convention attributes.

The span continues the caller's W3C trace (`traceparent`), and its own context is handed to the
relay (the `on_request_headers` hook) so the upstream continues ours. Attribute names follow the
GenAI semantic conventions (v1.41 registry, now in open-telemetry/semantic-conventions-genai);
Tollgate's own measurements go under `tollgate.*`.

The conventions define no event for the first token; they carry the same fact as the span
attribute `gen_ai.response.time_to_first_chunk` (seconds). Both are recorded: the attribute for
queries, and an event named `tollgate.first_token` (in our namespace, as OTel naming rules ask
for names the conventions do not define) so the moment shows on the trace timeline.

Exporting runs in the SDK's BatchSpanProcessor thread, never on the request's task.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers

from proxy.exchange import Exchange
from proxy.observer import Observer
from proxy.observers.otel_env import tracing_requested
from proxy.pricing import plain_usd

log = logging.getLogger("tollgate.tracing")

FIRST_TOKEN_EVENT = "tollgate.first_token"
TRACER_NAME = "tollgate"


_propagator = TraceContextTextMapPropagator()

# gen_ai.provider.name: "openai" is a registered value; llama.cpp has none, and the
# conventions allow a custom value when no registered one applies.
_PROVIDER_NAMES: dict[str, str] = {
    "openai": "openai",
    "llamacpp": "llama.cpp",
    "llama.cpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
    "azure": "azure.ai.openai",
    "azure_openai": "azure.ai.openai",
}

# Request parameters with a registered gen_ai.request.* attribute.
_REQUEST_PARAMS: tuple[tuple[str, str], ...] = (
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
    ("seed", "gen_ai.request.seed"),
    ("n", "gen_ai.request.choice.count"),
)


def provider_name(upstream_kind: str | None) -> str | None:
    if upstream_kind is None:
        return None
    return _PROVIDER_NAMES.get(upstream_kind.lower(), upstream_kind)


def _server_address(value: Any) -> tuple[str | None, int | None]:
    """Accepts (host, port), "host:port" or a URL."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        host, port = value
        return (str(host) if host else None), (int(port) if port is not None else None)
    if isinstance(value, str) and value:
        parts = urlsplit(value if "://" in value else f"//{value}")
        try:
            port = parts.port
        except ValueError:
            port = None
        if port is None and parts.scheme in ("http", "https"):
            port = 443 if parts.scheme == "https" else 80
        return parts.hostname, port
    return None, None


def _wall_ns(ex: Exchange, t_ns: int | None) -> int | None:
    """A perf_counter_ns moment as wall-clock ns, anchored at the exchange's t0."""
    if t_ns is None:
        return None
    return int(ex.wall_start * 1e9) + (t_ns - ex.t0_ns)


class TracingObserver(Observer):
    def __init__(self, tracer_provider: TracerProvider) -> None:
        self.tracer = tracer_provider.get_tracer(TRACER_NAME)
        # The open span of each exchange between on_start and on_finish.
        self._spans: dict[Exchange, Span] = {}

    def on_start(self, ex: Exchange) -> None:
        carrier: dict[str, str] = {}
        if ex.traceparent:
            carrier["traceparent"] = ex.traceparent
            if ex.tracestate:
                carrier["tracestate"] = ex.tracestate
        parent = _propagator.extract(carrier) if carrier else None

        model = ex.requested_model
        name = f"{ex.operation} {model}" if model else ex.operation
        attrs: dict[str, Any] = {"gen_ai.operation.name": ex.operation}
        if model:
            attrs["gen_ai.request.model"] = model
        provider = provider_name(ex.upstream_kind)
        if provider:
            attrs["gen_ai.provider.name"] = provider

        self._spans[ex] = self.tracer.start_span(
            name, context=parent, kind=SpanKind.CLIENT, attributes=attrs, start_time=int(ex.wall_start * 1e9)
        )

    def on_request_headers(self, ex: Exchange, headers: MutableMapping[str, str]) -> None:
        # The upstream continues our trace: its spans become children of this one.
        span = self._spans.get(ex)
        if span is not None:
            _propagator.inject(headers, context=set_span_in_context(span))

    def on_first_token(self, ex: Exchange) -> None:
        span = self._spans.get(ex)
        if span is None:
            return
        ttft = ex.ttft_s
        event_attrs: dict[str, Any] = {}
        if ttft is not None:
            event_attrs["gen_ai.response.time_to_first_chunk"] = ttft
        span.add_event(
            FIRST_TOKEN_EVENT, attributes=event_attrs, timestamp=_wall_ns(ex, ex.t_first_token_ns)
        )

    def on_finish(self, ex: Exchange) -> None:
        span = self._spans.pop(ex, None)
        if span is None:
            return
        if span.is_recording():
            span.set_attributes(self._attributes(ex))
            if ex.outcome != "ok":
                span.set_attribute("error.type", _error_type(ex))
                description = ex.error_message or ex.outcome
                if ex.error_detail:
                    description = f"{description} ({ex.error_detail})"
                span.set_status(Status(StatusCode.ERROR, description))
        span.end(end_time=_wall_ns(ex, ex.t_end_ns))

    def _attributes(self, ex: Exchange) -> dict[str, Any]:
        a: dict[str, Any] = {
            "gen_ai.operation.name": ex.operation,
            "gen_ai.request.stream": ex.stream,
            "tollgate.request_id": ex.request_id,
            "tollgate.endpoint": ex.endpoint,
            "tollgate.model_label": ex.model_label,
        }
        if ex.outcome:
            a["tollgate.outcome"] = ex.outcome
        if ex.requested_model:
            a["gen_ai.request.model"] = ex.requested_model
        provider = provider_name(ex.upstream_kind)
        if provider:
            a["gen_ai.provider.name"] = provider
        if ex.upstream:
            a["tollgate.upstream"] = ex.upstream
        if ex.replica is not None:
            a["tollgate.replica"] = ex.replica
        if ex.replica_failures:
            a["tollgate.replica_connect_failures"] = list(ex.replica_failures)
        if ex.key_name:
            a["tollgate.key"] = ex.key_name
        if ex.status is not None:
            a["http.response.status_code"] = ex.status
        if ex.response_model:
            a["gen_ai.response.model"] = ex.response_model
        if ex.response_id:
            a["gen_ai.response.id"] = ex.response_id
        if ex.finish_reasons:
            a["gen_ai.response.finish_reasons"] = list(ex.finish_reasons)
        if ex.output_cap is not None:
            a["gen_ai.request.max_tokens"] = ex.output_cap
        body = ex.body
        if isinstance(body, dict):
            for key, attr in _REQUEST_PARAMS:
                value = body.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    a[attr] = value

        host, port = _server_address(ex.upstream_url)
        if host:
            a["server.address"] = host
            if port is not None:
                a["server.port"] = port

        usage = ex.usage
        if usage is not None:
            a["gen_ai.usage.input_tokens"] = usage.input_tokens
            a["gen_ai.usage.output_tokens"] = usage.output_tokens
            a["gen_ai.usage.cache_read.input_tokens"] = usage.cached_input_tokens
            a["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if usage.cache_write_tokens:
                a["gen_ai.usage.cache_creation.input_tokens"] = usage.cache_write_tokens
            a["tollgate.usage.input_source"] = usage.input_source
            a["tollgate.usage.output_source"] = usage.output_source

        ttft = ex.ttft_s
        if ttft is not None:
            a["gen_ai.response.time_to_first_chunk"] = ttft
            a["tollgate.ttft_s"] = ttft
        for attr, value in (
            ("tollgate.ttfb_s", ex.ttfb_s),
            ("tollgate.ttfc_s", ex.ttfc_s),
            ("tollgate.upstream_ttft_s", ex.upstream_ttft_s),
            ("tollgate.duration_s", ex.duration_s),
            ("tollgate.tpot_s", ex.tpot_s),
        ):
            if value is not None:
                a[attr] = value
        a["tollgate.overhead_s"] = ex.overhead_s
        gap_mean, gap_p95 = ex.gap_stats_s()
        if gap_mean is not None and gap_p95 is not None:
            a["tollgate.gap_mean_s"] = gap_mean
            a["tollgate.gap_p95_s"] = gap_p95
        if ex.cost is not None:
            # A string keeps the exact Decimal; a float attribute would round it.
            a["tollgate.cost_usd"] = plain_usd(ex.cost)
        a["tollgate.priced"] = ex.priced
        if ex.llamacpp_timings:
            for k, v in ex.llamacpp_timings.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    a[f"tollgate.llamacpp.{k}"] = v
        return a


def _error_type(ex: Exchange) -> str:
    """Low-cardinality error identifier (semconv `error.type`)."""
    if ex.error_type:
        return ex.error_type
    if ex.outcome == "upstream_error" and ex.status is not None:
        return str(ex.status)
    return ex.outcome or "_OTHER"


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that also counts spans dropped on a full queue.

    The SDK reports drops only as its own OTel metric (when a MeterProvider and
    OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED are set up) and a log line, so the count is
    taken here: a span offered while the bounded queue is full is the one the SDK drops.
    This reads the SDK's private queue; if a future SDK moves it, counting stops (the
    `counting` flag turns False) and exporting is unaffected.
    """

    def __init__(
        self,
        span_exporter: SpanExporter,
        max_queue_size: int = 2048,
        on_drop: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(span_exporter, max_queue_size=max_queue_size, **kwargs)
        self.max_queue_size = max_queue_size
        self.dropped = 0
        self.on_drop = on_drop
        inner = getattr(self, "_batch_processor", None)
        self._queue: Any = getattr(inner, "_queue", None)
        self.counting = self._queue is not None and hasattr(self._queue, "__len__")

    def on_end(self, span: ReadableSpan) -> None:
        if (
            self.counting
            and span.context is not None
            and span.context.trace_flags.sampled
            and len(self._queue) >= self.max_queue_size
        ):
            self.dropped += 1
            if self.on_drop is not None:
                try:
                    self.on_drop()
                except Exception:  # noqa: BLE001 - counting must not lose the span path
                    log.exception("span drop callback failed")
        super().on_end(span)


def _resource_attributes(env: Mapping[str, str], service_name: str) -> dict[str, str]:
    attrs: dict[str, str] = {}
    raw = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    for k, v in parse_env_headers(raw, liberal=True).items():
        attrs[k] = v
    attrs["service.name"] = env.get("OTEL_SERVICE_NAME") or attrs.get("service.name") or service_name
    return attrs


def make_tracer_provider(
    service_name: str = "tollgate",
    env: Mapping[str, str] = os.environ,
    *,
    max_queue_size: int = 2048,
    on_drop: Callable[[], None] | None = None,
) -> TracerProvider | None:
    """A TracerProvider exporting over OTLP as the standard OTEL_* variables say, or None
    when tracing is off: no OTLP endpoint configured, OTEL_TRACES_EXPORTER=none, or
    OTEL_SDK_DISABLED=true.

    Protocol (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, else OTEL_EXPORTER_OTLP_PROTOCOL):
    http/protobuf (default) or grpc. Every setting is read from `env` (headers, timeout,
    insecure), so tests and the CLI can pass their own mapping. Spans leave through a
    bounded BatchSpanProcessor; `on_drop` is called for each span dropped on a full queue.
    """
    if not tracing_requested(env):
        return None
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base_endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()

    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    ).strip().lower()
    headers = dict(
        parse_env_headers(
            env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS", ""),
            liberal=True,
        )
    )
    timeout_raw = env.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or env.get("OTEL_EXPORTER_OTLP_TIMEOUT")
    # The spec gives the timeout in milliseconds; the Python exporters take seconds.
    timeout = float(timeout_raw) / 1000.0 if timeout_raw else 10.0

    exporter: SpanExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcSpanExporter,
        )

        endpoint = traces_endpoint or base_endpoint
        insecure_raw = env.get("OTEL_EXPORTER_OTLP_TRACES_INSECURE") or env.get("OTEL_EXPORTER_OTLP_INSECURE")
        insecure = (
            insecure_raw.strip().lower() == "true" if insecure_raw else endpoint.startswith("http://")
        )
        exporter = GrpcSpanExporter(
            endpoint=endpoint, insecure=insecure, headers=headers or None, timeout=timeout
        )
    elif protocol in ("http/protobuf", "http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )

        # A signal-specific endpoint is used as is; the base endpoint gets the signal path.
        endpoint = traces_endpoint or f"{base_endpoint.rstrip('/')}/v1/traces"
        exporter = HttpSpanExporter(endpoint=endpoint, headers=headers or None, timeout=timeout)
    else:
        raise ValueError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported value {protocol!r} "
            "(expected 'http/protobuf' or 'grpc')"
        )

    provider = TracerProvider(resource=Resource.create(_resource_attributes(env, service_name)))
    provider.add_span_processor(
        CountingBatchSpanProcessor(exporter, max_queue_size=max_queue_size, on_drop=on_drop)
    )
    return provider

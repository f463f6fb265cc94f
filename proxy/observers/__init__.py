"""Exporters of a finished exchange: Prometheus metrics, OpenTelemetry spans, JSON access log,
and an in-process summary. Each implements the `proxy.exchange.Observer` hooks."""

from proxy.observers.access_log import AccessLogObserver, iso_utc, prompt_text
from proxy.observers.metrics import (
    MetricsObserver,
    bound_port,
    metrics_handler,
    start_metrics_server,
    status_class,
)
from proxy.observers.summary import LogHistogram, SummaryObserver
from proxy.observers.tracing import (
    FIRST_TOKEN_EVENT,
    CountingBatchSpanProcessor,
    TracingObserver,
    make_tracer_provider,
    provider_name,
)

__all__ = [
    "FIRST_TOKEN_EVENT",
    "AccessLogObserver",
    "CountingBatchSpanProcessor",
    "LogHistogram",
    "MetricsObserver",
    "SummaryObserver",
    "TracingObserver",
    "bound_port",
    "iso_utc",
    "make_tracer_provider",
    "metrics_handler",
    "prompt_text",
    "provider_name",
    "start_metrics_server",
    "status_class",
]

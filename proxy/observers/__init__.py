"""Exporters of a finished exchange: Prometheus metrics, OpenTelemetry spans, JSON access log,
and an in-process summary. Each implements the `proxy.exchange.Observer` hooks.

OpenTelemetry spans live in `proxy.observers.tracing`, imported only when tracing is on
(`otel_env.tracing_requested`): the SDK is too heavy to load for a proxy that exports none."""

from proxy.observers.access_log import AccessLogObserver, prompt_text, wall_iso_ms
from proxy.observers.exposition import bound_port, metrics_handler, start_metrics_server
from proxy.observers.metrics import MetricsObserver, status_class
from proxy.observers.summary import LogHistogram, SummaryObserver

__all__ = [
    "AccessLogObserver",
    "LogHistogram",
    "MetricsObserver",
    "SummaryObserver",
    "bound_port",
    "wall_iso_ms",
    "metrics_handler",
    "prompt_text",
    "start_metrics_server",
    "status_class",
]

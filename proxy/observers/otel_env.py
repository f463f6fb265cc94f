"""Whether the standard OTEL_* variables ask for traces, decided without importing the SDK.

The OpenTelemetry SDK and its exporters take ~0.1 s and several MB to import; a proxy that
exports no traces should pay neither, so this check lives apart from `tracing`.
"""

from __future__ import annotations

from collections.abc import Mapping


def tracing_requested(env: Mapping[str, str]) -> bool:
    """True when an OTLP endpoint is set and neither OTEL_SDK_DISABLED=true nor an
    OTEL_TRACES_EXPORTER without `otlp` (e.g. `none`) turns tracing off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    if "none" in exporters or "otlp" not in exporters:
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )

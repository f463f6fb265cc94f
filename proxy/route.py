"""route: pick the upstream for a model, and shape the body it will receive."""

from __future__ import annotations

from typing import Any

import orjson

from proxy.errors import ModelNotFound
from proxy.exchange import Exchange
from proxy.settings import Settings

# Streams whose usage can be asked for with stream_options.include_usage.
_USAGE_OPTION_ENDPOINTS = frozenset({"chat.completions", "completions"})


def route_exchange(ex: Exchange, settings: Settings) -> None:
    model = ex.requested_model or ""
    resolved = settings.route_for(model)
    if resolved is None:
        raise ModelNotFound(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )
    ex.upstream = resolved.upstream
    ex.upstream_kind = settings.upstreams[resolved.upstream].kind
    ex.upstream_model = resolved.upstream_model
    ex.route_model = resolved.route_label
    # The route's cap for a request that sets none the upstream obeys (which admission
    # decides: a llama.cpp request may carry a max_tokens that its n_predict overrides).
    ex.extra["default_output_cap"] = resolved.default_max_tokens


def outgoing_body(
    ex: Exchange,
    body: bytes,
    payload: dict[str, Any],
    inject_usage: bool,
    cap_override: tuple[str, int] | None = None,
) -> bytes:
    """The bytes sent upstream: the client's own unless a rewrite is needed.

    Re-serialising is avoided when nothing changes, so the upstream sees exactly what the
    client sent (key order, whitespace, numbers).
    """
    changed = False
    if ex.upstream_model is not None and ex.upstream_model != ex.requested_model:
        payload = {**payload, "model": ex.upstream_model}
        changed = True
    if inject_usage and ex.stream and ex.endpoint in _USAGE_OPTION_ENDPOINTS:
        options = payload.get("stream_options")
        # include_usage: false also means "did not ask": the stripped stream looks the same.
        if options is None or (isinstance(options, dict) and options.get("include_usage") is not True):
            payload = {**payload, "stream_options": {**(options or {}), "include_usage": True}}
            ex.usage_injected = True
            changed = True
    if cap_override is not None and payload.get(cap_override[0]) != cap_override[1]:
        payload = {**payload, cap_override[0]: cap_override[1]}
        changed = True
    return orjson.dumps(payload) if changed else body

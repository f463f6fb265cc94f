"""route: pick the upstream for a request (and check the key may use its model), and shape
the body that upstream will receive."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web

from proxy.accept import Accepted
from proxy.errors import ModelNotFound, NotFound, PermissionDenied, UpstreamUnreachable
from proxy.exchange import Exchange
from proxy.keys import KeyRing, VirtualKey, request_user
from proxy.policy import Policy
from proxy.spend.budgets import buckets_for
from proxy.upstream import Upstream

# Streams whose usage can be asked for with stream_options.include_usage.
_USAGE_OPTION_ENDPOINTS = frozenset({"chat.completions", "completions"})


@dataclass(frozen=True, slots=True)
class Routed:
    upstream: Upstream
    # The route's cap for a request that sets none the upstream obeys (which admission
    # decides: a llama.cpp request may carry a max_tokens that its n_predict overrides).
    default_output_cap: int | None = None


def route(ex: Exchange, policy: Policy, accepted: Accepted) -> Routed:
    """The upstream of a model endpoint's request, by its model."""
    model = ex.requested_model or ""
    resolved = policy.settings.route_for(model)
    if resolved is None:
        raise ModelNotFound(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )
    ex.upstream_model = resolved.upstream_model
    ex.route_model = resolved.route_label
    upstream = _upstream(ex, policy, resolved.upstream)
    check_model_allowed(ex, policy.keyring, accepted.key)
    return Routed(upstream, resolved.default_max_tokens)


def route_unmetered(request: web.Request, ex: Exchange, policy: Policy, accepted: Accepted, now: datetime) -> Routed:
    """Any other /v1 path goes to the default upstream, unmetered: only where nothing
    Tollgate guards applies, or where the config lets that path through by name. A body
    that names a model is held to the key's model allow-list all the same."""
    settings = policy.settings
    if settings.default_upstream is None:
        raise NotFound(f"Invalid URL ({request.method} {request.path})")
    upstream = _upstream(ex, policy, settings.default_upstream)
    allowed_by = settings.passthrough.allows(request.path)
    if allowed_by is None:
        header = settings.user_header
        user = request_user(None, request.headers.get(header) if header else None)
        guarded = policy.keyring.enabled or bool(buckets_for(settings.budgets, ex.key_name, user, "", now, ex.team))
        if guarded:
            raise PermissionDenied(
                f"{request.method} {request.path} cannot be metered, and keys or budgets apply to it here, "
                "so it was not forwarded. An operator can let it through unmetered with "
                "passthrough.allow_unmetered.",
                code="unmetered_path",
            )
    if accepted.body and request.content_type == "application/json":
        try:
            payload = orjson.loads(accepted.body)
        except orjson.JSONDecodeError:
            payload = None
        if isinstance(payload, dict) and isinstance(payload.get("model"), str):
            ex.requested_model = payload["model"]
            check_model_allowed(ex, policy.keyring, accepted.key)
    ex.unmetered = allowed_by or "unguarded"
    return Routed(upstream)


def _upstream(ex: Exchange, policy: Policy, name: str) -> Upstream:
    ex.upstream = name
    ex.upstream_kind = policy.settings.upstreams[name].kind
    upstream = policy.upstreams.get(name)
    if upstream is None:
        # Configured but not opened: the app is starting or stopping.
        raise UpstreamUnreachable(f"Upstream '{name}' is not open.")
    ex.upstream_url = upstream.api_base
    return upstream


def check_model_allowed(ex: Exchange, keyring: KeyRing, key: VirtualKey | None) -> None:
    if key is None or ex.requested_model is None:
        return
    if not keyring.allows(key, ex.requested_model):
        raise PermissionDenied(
            f"The key '{key.name}' may not use the model `{ex.requested_model}`.",
            param="model",
            code="model_not_allowed",
        )


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

"""cached: the response cache's stage, between route and admit. A request the cache may
answer is looked up; a hit is replayed to the client (a stream with the chunks it was first
relayed in) without a budget reservation or an upstream call, billed at 0 with what it
saved; a miss goes on with a `Recorder` that the relay fills and `store` files.

README "Response cache" has the rules (proxy/response_cache.py applies them).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any

from aiohttp import web

from proxy.cache_store import Found, ResponseCache
from proxy.client_cost import COST_SOURCE_PRICED, with_usage_cost
from proxy.exchange import Exchange
from proxy.observer import Observers
from proxy.policy import Policy
from proxy.pricing import CostParts, cost, plain_usd, price_of_exchange
from proxy.response_cache import Recorder, cache_key, hit_status, plan, scope_id
from proxy.route import Routed

_FREE = CostParts(Decimal(0), Decimal(0), Decimal(0), Decimal(0))


def _credential(headers: Mapping[str, str]) -> str | None:
    return headers.get("Authorization") or headers.get("api-key")


async def look_up(
    cache: ResponseCache,
    request: web.Request,
    ex: Exchange,
    policy: Policy,
    payload: dict[str, Any],
    routed: Routed,
) -> tuple[Found | None, Recorder | None]:
    """(the entry that answers the request, None) on a hit; (None, the recorder of its
    response) otherwise."""
    settings = cache.settings
    upstream = routed.upstream.name
    inject = policy.settings.upstreams[upstream].inject_stream_usage
    stripped = inject and ex.stream and ex.endpoint in ("chat.completions", "completions")
    scope = scope_id(settings.scope, ex.key_name, _credential(request.headers), ex.user, ex.team)
    key = cache_key(ex.endpoint, upstream, ex.upstream_model, scope, payload, stripped)
    what = plan(ex.endpoint, payload, request.headers, settings.endpoints, key)
    labels = (ex.model_label, upstream, ex.endpoint)
    if not what.lookup:
        # A recorder all the same: it says `fwd=bypass` or `fwd=request` in Cache-Status,
        # and records only what its plan lets it store.
        ex.cache = "bypass"
        return None, Recorder(what, settings.max_entry_bytes)
    found = await cache.get(key)
    if found is not None:
        ex.cache = "hit"
        cache.metrics.hits.labels(*labels).inc()
        return found, None
    ex.cache = "miss"
    cache.metrics.misses.labels(*labels).inc()
    return None, Recorder(what, settings.max_entry_bytes)


def store(cache: ResponseCache, ex: Exchange, recorder: Recorder) -> None:
    """File the recorded response if it is one to keep (`Recorder.keeps`)."""
    if ex.upstream is None or not recorder.keeps(ex.outcome, ex.status, ex.finish_reasons):
        return
    entry = recorder.entry(ex.usage)
    if entry is not None:
        cache.put(recorder.plan.key, entry, (ex.model_label, ex.upstream, ex.endpoint))


def _saved(ex: Exchange, policy: Policy, found: Found) -> Decimal:
    usage = found.entry.usage
    if usage is None:
        return Decimal(0)
    price = price_of_exchange(policy.prices, ex.upstream_model, ex.requested_model)
    return Decimal(0) if price is None else cost(usage, price)


async def replay(
    request: web.Request,
    cache: ResponseCache,
    ex: Exchange,
    policy: Policy,
    found: Found,
    observers: Observers,
    complete: Callable[[], Awaitable[None]],
) -> web.StreamResponse:
    """The stored response, chunk by chunk as first written. `complete` runs before the
    last chunk goes out, as on a forwarded response (the spend row is written first)."""
    entry = found.entry
    ex.status = entry.status
    ex.cost = Decimal(0)
    ex.saved = _saved(ex, policy, found)
    cache.count_saved(ex.model_label, ex.upstream or "none", ex.key_name or "none", ex.saved)
    out = web.StreamResponse(status=entry.status)
    out.headers["Content-Type"] = entry.content_type
    out.headers["Cache-Status"] = hit_status(found.ttl_seconds)
    out.headers["X-Tollgate-Request-Id"] = ex.request_id
    out.headers["X-Request-Id"] = ex.request_id
    if entry.is_sse:
        out.headers["X-Accel-Buffering"] = "no"
        out.headers["Cache-Control"] = "no-cache"
    else:
        out.content_length = entry.size
        out.headers["X-Tollgate-Cost-Source"] = COST_SOURCE_PRICED
        out.headers["X-Tollgate-Cost-Usd"] = "0"
    out.headers["X-Tollgate-Saved-Usd"] = plain_usd(ex.saved)
    observers.on_response_headers(ex, out.headers)
    chunks = entry.chunks
    if ex.include_cost and not entry.is_sse and entry.content_type.startswith("application/json"):
        # The `usage.cost` the client asked for: this answer cost nothing.
        rewritten = with_usage_cost(b"".join(chunks), _FREE)
        if rewritten is not None:
            chunks = (rewritten,)
            out.content_length = len(rewritten)
    await out.prepare(request)
    last = len(chunks) - 1
    for i, chunk in enumerate(chunks):
        if i == last:
            ex.outcome = "ok"
            await complete()
        await out.write(chunk)
        ex.bytes_out += len(chunk)
    await out.write_eof()
    return out

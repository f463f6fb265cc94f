"""The engine's own telemetry, joined to Tollgate's: llama-server's `/metrics` (Prometheus
text, `--metrics`) and `/slots`, scraped per llama.cpp upstream (each of its replicas) for
the app's lifetime. A replicated upstream's gauges add up its replicas' (the KV-cache ratio
is the highest), and each replica's free slots feed the choice of replica.

What each scrape reads (absent from the server's answer: left unset, never 0):
`llamacpp:requests_processing`, `llamacpp:requests_deferred`, `llamacpp:kv_cache_usage_ratio`
(older servers only), and from `/slots` the busy (`is_processing`) and total slot counts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aiohttp

from proxy.upstream import Replica, Upstream

log = logging.getLogger("tollgate.engine")

# Seconds between scrapes of one llama-server; module-level so tests can shorten it.
SCRAPE_INTERVAL = 5.0
_SCRAPE_TIMEOUT = aiohttp.ClientTimeout(total=2)

# llama-server metric → the name of the value kept (gauges of the server's current state).
ENGINE_GAUGES = {
    "llamacpp:requests_processing": "requests_processing",
    "llamacpp:requests_deferred": "requests_deferred",
    "llamacpp:kv_cache_usage_ratio": "kv_cache_usage_ratio",
}


class EngineSink(Protocol):
    def set_llamacpp_engine(self, upstream: str, values: dict[str, float], up: bool) -> None: ...


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition (llama-server exports no labels)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or "{" in parts[0]:
            continue
        try:
            out[parts[0]] = float(parts[1])
        except ValueError:
            continue
    return out


def slot_counts(slots: Any) -> tuple[int, int] | None:
    """(busy, total) from `/slots`: a list of slot objects with `is_processing`."""
    if not isinstance(slots, list):
        return None
    busy = sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing") is True)
    return busy, len(slots)


async def scrape_once(upstream: Upstream, replica: Replica | None = None) -> dict[str, float] | None:
    """One scrape of both endpoints (of `replica`, or the one server); None when neither answered."""
    root = upstream.settings.root_url if replica is None else replica.root_url
    headers = upstream.own_headers(replica)
    values: dict[str, float] = {}
    answered = False
    try:
        async with upstream.session.get(root + "/metrics", headers=headers, timeout=_SCRAPE_TIMEOUT) as resp:
            if resp.status == 200:
                answered = True
                samples = parse_prometheus_text(await resp.text())
                values.update({ours: samples[theirs] for theirs, ours in ENGINE_GAUGES.items() if theirs in samples})
    except (TimeoutError, aiohttp.ClientError, UnicodeDecodeError) as exc:
        log.debug("llama-server %s /metrics: %s", upstream.name, exc)
    try:
        async with upstream.session.get(root + "/slots", headers=headers, timeout=_SCRAPE_TIMEOUT) as resp:
            if resp.status == 200:
                answered = True
                counts = slot_counts(await resp.json(content_type=None))
                if counts is not None:
                    values["slots_busy"], values["slots_total"] = float(counts[0]), float(counts[1])
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        log.debug("llama-server %s /slots: %s", upstream.name, exc)
    return values if answered else None


def combined(scrapes: list[dict[str, float] | None]) -> dict[str, float] | None:
    """A replicated upstream's values from its replicas' scrapes: sums, but the KV-cache
    ratio (a fraction) is the highest; None when no replica answered."""
    answered = [v for v in scrapes if v is not None]
    if not answered:
        return None
    out: dict[str, float] = {}
    for values in answered:
        for name, value in values.items():
            if name == "kv_cache_usage_ratio":
                out[name] = max(out.get(name, value), value)
            else:
                out[name] = out.get(name, 0.0) + value
    return out


async def scrape_llamacpp(upstream: Upstream, sink: EngineSink) -> None:
    """Scrape until cancelled (the app's shutdown) or the upstream is replaced by a reload
    (or its session closed). A server without --metrics or with /slots off just reports less."""
    replicas = upstream.replicas
    while not upstream.stopped:
        if replicas is None:
            values = await scrape_once(upstream)
        else:
            scrapes = await asyncio.gather(*(scrape_once(upstream, r) for r in replicas.replicas))
            for replica, got in zip(replicas.replicas, scrapes, strict=True):
                free = None
                if got is not None and "slots_total" in got:
                    free = int(got["slots_total"] - got["slots_busy"])
                replicas.slots(replica, free)
            values = combined(scrapes)
        sink.set_llamacpp_engine(upstream.name, values or {}, values is not None)
        await asyncio.sleep(SCRAPE_INTERVAL)

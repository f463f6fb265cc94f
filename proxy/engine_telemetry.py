"""The engine's own telemetry, joined to Tollgate's: llama-server's `/metrics` (Prometheus
text, `--metrics`) and `/slots`, scraped per llama.cpp upstream for the app's lifetime.

What each scrape reads (absent from the server's answer: left unset, never 0):
`llamacpp:requests_processing`, `llamacpp:requests_deferred`, `llamacpp:kv_cache_usage_ratio`
(older servers only), and from `/slots` the busy (`is_processing`) and total slot counts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import aiohttp

from proxy.upstream import Upstream

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


async def scrape_once(upstream: Upstream) -> dict[str, float] | None:
    """One scrape of both endpoints; None when neither answered."""
    root = upstream.settings.root_url
    headers = upstream.own_headers()
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


async def scrape_llamacpp(upstream: Upstream, sink: EngineSink) -> None:
    """Scrape until cancelled (the app's shutdown) or the upstream's session is closed (a
    reload replaced it). A server without --metrics or with /slots off just reports less."""
    while not upstream.closed:
        values = await scrape_once(upstream)
        sink.set_llamacpp_engine(upstream.name, values or {}, values is not None)
        await asyncio.sleep(SCRAPE_INTERVAL)

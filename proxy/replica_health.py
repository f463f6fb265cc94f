"""Active health checks of a replicated upstream's replicas, for the app's lifetime.

Each round sends one GET to every replica at once: llama-server's `/health` (503 while it
loads a model), any other kind's `{api base}/models`. An answer under 500 is up, whatever
it says (a 401 still shows a server that answers); a 5xx, a timeout or no connection is
down. A replica checked down stays out of the choice until a check (or a request sent to
it when no replica was eligible) succeeds.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from proxy.upstream import Replica, ReplicaSet, Upstream

log = logging.getLogger("tollgate.forward")


def check_url(upstream: Upstream, replica: Replica) -> str:
    if upstream.settings.kind == "llamacpp":
        return replica.root_url + "/health"
    return replica.api_base + "/models"


async def check_once(upstream: Upstream, replica: Replica, timeout: float) -> bool:
    try:
        async with upstream.session.get(
            check_url(upstream, replica),
            headers=upstream.own_headers(replica),
            timeout=aiohttp.ClientTimeout(total=timeout),
            allow_redirects=False,
        ) as resp:
            await resp.read()
            return resp.status < 500
    except (TimeoutError, aiohttp.ClientError) as exc:
        log.debug("upstream %s: health check of %s failed: %s", upstream.name, replica.name, exc)
        return False


async def check_round(upstream: Upstream, replicas: ReplicaSet) -> None:
    timeout = upstream.settings.health_check.timeout
    verdicts = await asyncio.gather(*(check_once(upstream, r, timeout) for r in replicas.replicas))
    for replica, healthy in zip(replicas.replicas, verdicts, strict=True):
        replicas.verdict(replica, healthy)


async def watch_replicas(upstream: Upstream) -> None:
    """Check every `health_check.interval` seconds until cancelled (the app's shutdown) or
    the upstream is replaced by a reload."""
    replicas = upstream.replicas
    cfg = upstream.settings.health_check
    if replicas is None or not cfg.enabled:
        return
    while not upstream.stopped:
        await check_round(upstream, replicas)
        await asyncio.sleep(cfg.interval)

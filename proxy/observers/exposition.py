"""Serving the metrics: the text exposition on its own port, merged across worker processes
in multiprocess mode."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector


def _scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """The registry to expose: the given one, or, with several worker processes, a fresh
    one that aggregates every worker's mmap files (prometheus_client's documented way)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"):
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # prometheus_client is untyped here
        return merged
    return registry


def metrics_handler(registry: CollectorRegistry) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(_scrape_registry(registry))
        # content_type carries its own charset parameter; set the raw header so aiohttp
        # does not try to split it.
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handle


async def start_metrics_server(
    registry: CollectorRegistry,
    host: str = "127.0.0.1",
    port: int = 9464,
    path: str = "/metrics",
    *,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Serve the text exposition on the running loop. Port 0 picks a free port; read it
    back with `bound_port(runner)`. Stop with `await runner.cleanup()`. `reuse_port` lets
    several worker processes share the port (SO_REUSEPORT)."""
    app = web.Application()
    app.router.add_get(path, metrics_handler(registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # SO_REUSEADDR said out loud rather than left to the event loop's default: without it a
    # restart right after SIGTERM cannot bind the port while the scrape connections the old
    # process closed sit in TIME_WAIT.
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=True if reuse_port else None)
    await site.start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The TCP port the metrics server actually listens on."""
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("metrics server is not listening on a TCP socket")

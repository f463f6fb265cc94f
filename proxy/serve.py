"""Running the app as a server process: listen, wait for a signal, shut down cleanly."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiohttp import web

from proxy.settings import Settings

log = logging.getLogger("tollgate")


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(settings: Settings, started_at: float) -> None:
    from proxy.app import make_app
    from proxy.observers import make_tracer_provider

    tracer_provider = make_tracer_provider()
    app = make_app(settings, tracer_provider=tracer_provider)
    # handler_cancellation: a client that disconnects cancels its handler at once, which is
    # how the upstream request gets cancelled while the upstream is still thinking.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port, reuse_address=True)
    await site.start()
    log.info(
        "tollgate ready on http://%s:%d/v1 in %.0f ms (metrics: %s)",
        settings.server.host,
        settings.server.port,
        (time.perf_counter() - started_at) * 1000,
        f"http://{settings.metrics.host}:{settings.metrics.port}{settings.metrics.path}"
        if settings.metrics.enabled
        else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    if tracer_provider is not None:
        tracer_provider.shutdown()

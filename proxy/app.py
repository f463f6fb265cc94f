"""The whole product on one page: what the application holds, serves and runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import IO

from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from proxy import handlers
from proxy.exchange import Observer, Observers
from proxy.forward import open_upstream, read_llamacpp_context
from proxy.keys import KeyRing
from proxy.ledger import open_ledger
from proxy.observers import (
    AccessLogObserver,
    MetricsObserver,
    SummaryObserver,
    TracingObserver,
    start_metrics_server,
)
from proxy.pricing import Price, PriceTable
from proxy.settings import Settings
from proxy.webhook import WebhookSender
from proxy.observers.budget_metrics import BudgetMetrics
from proxy.state import RUNTIME, Runtime, utc_now
from proxy.tokens import warm

log = logging.getLogger("tollgate")

METRICS: web.AppKey[MetricsObserver] = web.AppKey("metrics", MetricsObserver)
SUMMARY: web.AppKey[SummaryObserver] = web.AppKey("summary", SummaryObserver)
METRICS_RUNNER: web.AppKey[web.AppRunner] = web.AppKey("metrics_runner", web.AppRunner)


def make_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
    access_log: IO[bytes] | None = None,
    extra_observers: list[Observer] | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    registry = registry if registry is not None else CollectorRegistry()

    # What every request is measured by (metrics, traces, the log line, the summary).
    metrics = MetricsObserver(registry)
    summary = SummaryObserver()
    observers = Observers([metrics, summary])
    if tracer_provider is not None:
        observers.add(TracingObserver(tracer_provider))
    if settings.logging.access_log:
        observers.add(
            AccessLogObserver(
                access_log if access_log is not None else sys.stdout.buffer,
                payloads=settings.logging.payloads,
                payload_max_chars=settings.logging.payload_max_chars,
            )
        )
    for extra in extra_observers or []:
        observers.add(extra)
    observers.on_failure.append(metrics.count_observer_error)

    # Who may ask, and what they may spend.
    app[RUNTIME] = Runtime(
        settings=settings,
        prices=PriceTable.shipped().merged(price_overrides(settings)),
        observers=observers,
        keyring=KeyRing(settings.keys),
        budget_metrics=BudgetMetrics(registry),
        webhook=WebhookSender(settings.webhook),
        clock=clock,
    )
    app[METRICS] = metrics
    app[SUMMARY] = summary

    # Lifecycle: the ledger, upstream sessions, tokenizers, the metrics port, draining
    # background work (settlements) before the ledger closes.
    app.cleanup_ctx.append(spend_ledger)
    app.cleanup_ctx.append(upstream_sessions)
    app.cleanup_ctx.append(tokenizers)
    if settings.metrics.enabled:
        app.cleanup_ctx.append(metrics_port)
    app.cleanup_ctx.append(background_work)

    # The API the applications call.
    for path, endpoint in handlers.MODEL_PATHS.items():
        app.router.add_post(path, handlers.model_endpoint(endpoint))
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/v1/tollgate/summary", summary_endpoint)
    app.router.add_get("/v1/tollgate/budgets", handlers.budgets_report)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.passthrough)

    # Probes, and OpenAI-shaped 404s for everything else.
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_route("*", "/{tail:.*}", handlers.not_found)
    return app


def price_overrides(settings: Settings) -> dict[str, Price]:
    return {
        pattern: Price(
            input=p.input, output=p.output, cached_input=p.cached_input, cache_write=p.cache_write
        )
        for pattern, p in settings.pricing.models.items()
    }


async def spend_ledger(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    rt._ledger = await open_ledger(rt.settings.ledger, rt.clock())
    chores = asyncio.get_running_loop().create_task(ledger_chores(rt))
    yield
    chores.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await chores
    await rt.webhook.close()
    await rt.ledger.close()


async def ledger_chores(rt: Runtime, every: float = 2.0) -> None:
    """Free reservations whose lease ran out (a crashed instance's), and refresh the budget
    gauges from the ledger, so every instance's scrape shows the shared truth."""
    while True:
        try:
            now = rt.clock()
            expired = await rt.ledger.expire(now)
            if expired:
                log.warning("released %d reservations whose lease had expired", expired)
            if rt.settings.budgets:
                rt.budget_metrics.refresh(rt.settings.budgets, await rt.ledger.budget_report(now), now)
        except Exception:  # noqa: BLE001 - a chore failing must not stop the next one
            log.exception("ledger chores failed")
        await asyncio.sleep(every)


async def upstream_sessions(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    for name, upstream in rt.settings.upstreams.items():
        rt.upstreams[name] = open_upstream(name, upstream, rt.settings)
        if upstream.kind == "llamacpp":
            # In the background: a llama-server still loading must not delay readiness.
            rt.spawn(read_llamacpp_context(rt.upstreams[name], app[METRICS]), f"{name} /props")
    yield
    await asyncio.gather(*(u.session.close() for u in rt.upstreams.values()))


async def tokenizers(app: web.Application) -> AsyncIterator[None]:
    # Building a BPE table holds the GIL for ~0.5 s: do it off the request path at start,
    # and report ready only once the default encoding is loaded, so no stream stalls on it.
    rt = app[RUNTIME]

    async def load() -> None:
        # o200k_base (also the unknown-model default) and cl100k_base.
        await asyncio.to_thread(warm, ("gpt-4o", "gpt-4"))
        rt.tokenizers_ready.set()

    rt.spawn(load(), "warming tokenizers")
    yield


async def metrics_port(app: web.Application) -> AsyncIterator[None]:
    cfg = app[RUNTIME].settings.metrics
    runner = await start_metrics_server(app[METRICS].registry, cfg.host, cfg.port, cfg.path)
    app[METRICS_RUNNER] = runner
    yield
    await runner.cleanup()


async def background_work(app: web.Application) -> AsyncIterator[None]:
    yield
    rt = app[RUNTIME]
    if rt.background:
        await asyncio.wait(rt.background, timeout=10)


async def summary_endpoint(request: web.Request) -> web.Response:
    return web.json_response(request.app[SUMMARY].snapshot())

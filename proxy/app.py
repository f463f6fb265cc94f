"""The whole product on one page: what the application holds, serves and runs."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import IO, TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import handlers
from proxy.cache_store import ResponseCache
from proxy.encodings import load_in_background, verify
from proxy.engine_telemetry import scrape_llamacpp
from proxy.errors import HttpError, install_openai_shaped_protocol_errors
from proxy.faults import FaultMetrics
from proxy.observer import Observers
from proxy.observers import AccessLogObserver, MetricsObserver, SummaryObserver, start_metrics_server
from proxy.observers.otel_env import tracing_requested
from proxy.policy import Policy
from proxy.ratelimit.limiter import Limiter
from proxy.replica_health import watch_replicas
from proxy.settings import Settings
from proxy.spend.lifecycle import Spend
from proxy.state import RUNTIME, Runtime, utc_now
from proxy.upstream import Upstream, open_upstream, read_llamacpp_context

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("tollgate")

METRICS: web.AppKey[MetricsObserver] = web.AppKey("metrics", MetricsObserver)
SUMMARY: web.AppKey[SummaryObserver] = web.AppKey("summary", SummaryObserver)
METRICS_RUNNER: web.AppKey[web.AppRunner] = web.AppKey("metrics_runner", web.AppRunner)


def make_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    tracer_provider: TracerProvider | None = None,
    trace_from_env: bool = False,
    reuse_port: bool = False,
    access_log: IO[bytes] | None = None,
    extra_observers: list[object] | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> web.Application:
    """`tracer_provider`, else (with `trace_from_env`) one built from the OTEL_* variables
    when they ask for tracing. `reuse_port`: several worker processes share the ports."""
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    install_openai_shaped_protocol_errors()
    registry = registry if registry is not None else CollectorRegistry()

    # What every request is measured by (metrics, traces, the log line, the summary).
    metrics = MetricsObserver(registry)
    summary = SummaryObserver()
    observers = Observers([metrics, summary])
    if tracer_provider is None and trace_from_env and tracing_requested(os.environ):
        from proxy.observers.tracing import make_tracer_provider  # the SDK only when tracing is on

        tracer_provider = make_tracer_provider(on_drop=metrics.count_dropped_span)
        if tracer_provider is not None:
            app.cleanup_ctx.append(_shut_down(tracer_provider))
    if tracer_provider is not None:
        from proxy.observers.tracing import TracingObserver

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

    # Who may ask and how requests are routed and priced (the policy), what they may spend.
    faults = FaultMetrics(registry)
    spend = Spend(settings.ledger, settings.webhook, registry, faults, clock)
    limiter = Limiter(registry, faults, clock, settings.ledger.lease_seconds)
    # The response cache, only when enabled: off, the request path never touches it.
    cache = ResponseCache(settings.response_cache, registry) if settings.response_cache.enabled else None
    app[RUNTIME] = Runtime(
        policy=Policy.of(settings), spend=spend, observers=observers, faults=faults, limiter=limiter, clock=clock,
        response_cache=cache,
    )
    app[METRICS] = metrics
    app[SUMMARY] = summary

    # Lifecycle, unwound in reverse: the spend ledger (closed last, after settlements in
    # flight drained), upstream sessions, tokenizers, the metrics port, the event-loop
    # sampler and what a reload retired.
    app.cleanup_ctx.append(spend_ledger)
    if cache is not None:
        app.cleanup_ctx.append(response_cache)
    app.cleanup_ctx.append(upstream_sessions)
    app.cleanup_ctx.append(tokenizers)
    if settings.metrics.enabled:
        app.cleanup_ctx.append(metrics_port(reuse_port))
    app.cleanup_ctx.append(housekeeping)

    # The API the applications call.
    for path, endpoint in handlers.MODEL_PATHS.items():
        app.router.add_post(path, handlers.model_endpoint(endpoint))
    app.router.add_get("/v1/models", handlers.list_models)
    # Ids may hold '/' (llama-server's "models/x.gguf"), hence the greedy match.
    app.router.add_get("/v1/models/{model:.+}", handlers.retrieve_model)
    app.router.add_get("/v1/tollgate/summary", summary_endpoint)
    app.router.add_get("/v1/tollgate/budgets", handlers.budgets_report)
    app.router.add_route("*", "/v1/{tail:.*}", handlers.passthrough)
    # Azure OpenAI's layout, for AzureOpenAI(azure_endpoint=<tollgate>) clients.
    app.router.add_route("*", "/openai/deployments/{deployment}/{tail:.*}", handlers.azure_deployment)
    app.router.add_route("*", "/openai/v1/{tail:.*}", handlers.azure_v1)

    # Probes, and OpenAI-shaped 404s for everything else.
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_route("*", "/{tail:.*}", handlers.not_found)
    return app


def _shut_down(provider: TracerProvider) -> Callable[[web.Application], AsyncIterator[None]]:
    async def tracing(app: web.Application) -> AsyncIterator[None]:
        yield
        provider.shutdown()  # exports what the batch processor still holds

    return tracing


async def spend_ledger(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    async with rt.spend.running(lambda: rt.policy.settings.budgets), rt.limiter.running(rt.spend.ledger):
        yield


async def response_cache(app: web.Application) -> AsyncIterator[None]:
    yield
    cache = app[RUNTIME].response_cache
    if cache is not None:
        await cache.close()  # after the writes in flight


async def upstream_sessions(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    metrics = app[METRICS]
    opened = {
        name: open_upstream(name, upstream, rt.settings, metrics) for name, upstream in rt.settings.upstreams.items()
    }
    rt.policy = rt.policy.with_upstreams(opened)
    for upstream in opened.values():
        watch_upstream(rt, upstream, metrics)
    yield
    await rt.cancel_probes()
    await asyncio.gather(*(u.session.close() for u in rt.upstreams.values()))


def watch_upstream(rt: Runtime, upstream: Upstream, metrics: MetricsObserver) -> None:
    """What runs beside an upstream for as long as it is in use, as probes (cancelled at
    shutdown; a reload that replaces the upstream stops them)."""
    if upstream.settings.kind == "llamacpp":
        # In the background: a llama-server still loading must not delay readiness.
        rt.probe(read_llamacpp_context(upstream, metrics))
        rt.probe(scrape_llamacpp(upstream, metrics))
    if upstream.replicas is not None:
        rt.probe(watch_replicas(upstream))


async def tokenizers(app: web.Application) -> AsyncIterator[None]:
    # A BPE table is ~43 MB of RSS and only a request that needs an estimate (a budget's
    # reservation, a response without usage) needs one: tables are built on a worker
    # thread when such a request first comes (`encoding_ready`), never on the event loop.
    # What is checked before the server listens is that the fallback's data (o200k_base,
    # also every unknown model's) is there and intact, so bad data still stops the start.
    await asyncio.to_thread(verify)
    load_in_background()
    yield


def metrics_port(reuse_port: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def serving(app: web.Application) -> AsyncIterator[None]:
        cfg = app[RUNTIME].settings.metrics
        runner = await start_metrics_server(app[METRICS].registry, cfg.host, cfg.port, cfg.path, reuse_port=reuse_port)
        app[METRICS_RUNNER] = runner
        yield
        await runner.cleanup()

    return serving


async def housekeeping(app: web.Application, every: float = 2.0) -> AsyncIterator[None]:
    """Sample the event loop's task count and close what a reload retired once its time
    is up; at shutdown, close everything retired (upstream_sessions stops the probes)."""
    rt = app[RUNTIME]

    async def housekeeping_rounds() -> None:
        while True:
            rt.faults.tasks.set(len(asyncio.all_tasks()))
            await close_retired(rt)
            await asyncio.sleep(every)

    task = asyncio.get_running_loop().create_task(housekeeping_rounds())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await close_retired(rt, everything=True)


# How long a session replaced by a reload stays open for the requests still using it.
RETIRE_AFTER_S = 900.0


async def close_retired(rt: Runtime, *, everything: bool = False) -> None:
    now = time.monotonic()
    due = [c for c in rt.retired if everything or c[0] <= now]
    rt.retired = [c for c in rt.retired if c not in due]
    for _, close in due:
        try:
            await close()
        except Exception:  # noqa: BLE001 - closing an old session must not stop the chores
            log.exception("closing a retired resource failed")


# Sections a reload cannot change in a running process (they hold sockets, files or
# registered metrics): a reload that changes them keeps the old values and says so.
RESTART_ONLY = ("server", "metrics", "logging", "ledger", "response_cache")


async def reconfigure(app: web.Application, new: Settings) -> list[str]:
    """Apply a new configuration to a running app, for requests that start from now on.

    Requests in flight keep what they started with: the upstream sessions a reload replaces
    stay open for RETIRE_AFTER_S (or until shutdown). Returns the restart-only sections
    whose changes were not applied.
    """
    rt = app[RUNTIME]
    old = rt.settings
    kept = [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]
    if kept:
        data = new.model_dump()
        for name in kept:
            data[name] = old.model_dump()[name]
        new = Settings.model_validate(data)
    upstreams = dict(rt.upstreams)
    for name, upstream in rt.upstreams.items():
        if name not in new.upstreams or new.upstreams[name] != old.upstreams.get(name) or new.timeouts != old.timeouts:
            rt.retired.append((time.monotonic() + RETIRE_AFTER_S, upstream.session.close))
            upstream.retired = True
            del upstreams[name]
    for name, upstream_settings in new.upstreams.items():
        if name not in upstreams:
            upstreams[name] = open_upstream(name, upstream_settings, new, app[METRICS])
            watch_upstream(rt, upstreams[name], app[METRICS])
    close_old_webhook = rt.spend.set_webhook(new.webhook)
    if close_old_webhook is not None:
        rt.retired.append((time.monotonic() + RETIRE_AFTER_S, close_old_webhook))
    # One assignment: a request sees the old policy or the new one, never a mix.
    rt.policy = Policy.of(new, upstreams)
    return kept


async def summary_endpoint(request: web.Request) -> web.Response:
    """Per-model figures since start. They name models and traffic, so once keys exist
    they are for key holders (or the admin alone, by config), not for anyone on the port."""
    try:
        handlers.require_summary_reader(request, request.app[RUNTIME])
    except HttpError as err:
        return handlers.error_response(err)
    return web.json_response(request.app[SUMMARY].snapshot())

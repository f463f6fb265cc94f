"""The whole product on one page: what the application holds, serves and runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import IO, TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import handlers
from proxy.errors import HttpError, install_openai_shaped_protocol_errors
from proxy.exchange import Observer, Observers
from proxy.finish import retry_unsettled
from proxy.forward import open_upstream, read_llamacpp_context
from proxy.keys import KeyRing
from proxy.ledger import LedgerError, open_ledger
from proxy.observers import (
    AccessLogObserver,
    MetricsObserver,
    SummaryObserver,
    start_metrics_server,
)
from proxy.observers.budget_metrics import BudgetMetrics
from proxy.pricing import Price, PriceTable
from proxy.settings import Settings
from proxy.state import RUNTIME, FaultMetrics, Runtime, utc_now
from proxy.encodings import load_in_background, warm
from proxy.webhook import WebhookSender

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
    access_log: IO[bytes] | None = None,
    extra_observers: list[Observer] | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> web.Application:
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    install_openai_shaped_protocol_errors()
    registry = registry if registry is not None else CollectorRegistry()

    # What every request is measured by (metrics, traces, the log line, the summary).
    metrics = MetricsObserver(registry)
    summary = SummaryObserver()
    observers = Observers([metrics, summary])
    if tracer_provider is not None:
        from proxy.observers.tracing import TracingObserver  # the SDK only when tracing is on

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
        faults=FaultMetrics(registry),
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
    # Azure OpenAI's layout, for AzureOpenAI(azure_endpoint=<tollgate>) clients.
    app.router.add_route("*", "/openai/deployments/{deployment}/{tail:.*}", handlers.azure_deployment)
    app.router.add_route("*", "/openai/v1/{tail:.*}", handlers.azure_v1)

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
    try:
        rt._ledger = await open_ledger(rt.settings.ledger, rt.clock())
    except LedgerError:
        raise
    except Exception as exc:  # noqa: BLE001 - one clear line instead of sqlite's or redis's
        raise LedgerError(f"cannot open the ledger at {rt.settings.ledger.path}: {exc}") from exc
    chores = asyncio.get_running_loop().create_task(ledger_chores(rt))
    yield
    chores.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await chores
    await rt.webhook.close()
    await rt.ledger.close()


async def ledger_chores(rt: Runtime, every: float = 2.0) -> None:
    """Renew the leases of this process's live reservations (a third of a lease at a time,
    in one batch), free reservations whose lease ran out (a crashed instance's), and refresh
    the budget gauges from the ledger, so every instance's scrape shows the shared truth.
    Also: charge settlements kept while the ledger was down, close what a reload retired,
    and sample the event loop's task count."""
    renew_at = 0.0
    while True:
        lease = rt.lease_seconds
        if rt.live_reservations and time.monotonic() >= renew_at:
            renew_at = time.monotonic() + lease / 3
            try:
                await rt.ledger.renew(list(rt.live_reservations), lease, rt.clock())
            except Exception:  # noqa: BLE001 - retried at the next round; a lease lasts 3 rounds
                log.exception("renewing %d leases failed", len(rt.live_reservations))
        if rt.faults is not None:
            rt.faults.tasks.set(len(asyncio.all_tasks()))
        await close_retired(rt)
        if rt.unsettled:
            await retry_unsettled(rt)
        if rt.abandoned:
            await abandon_refused(rt)
        try:
            now = rt.clock()
            interrupted_before = rt.ledger.interrupted
            expired = await rt.ledger.expire(now)
            if expired:
                interrupted = rt.ledger.interrupted - interrupted_before
                log.warning(
                    "%d reservations outlived their process (lease expired); %d settled as interrupted",
                    expired, interrupted,
                )
                if rt.faults is not None:
                    rt.faults.interrupted.inc(interrupted)
            if rt.settings.budgets:
                rt.budget_metrics.refresh(rt.settings.budgets, await rt.ledger.budget_report(now), now)
        except Exception:  # noqa: BLE001 - a chore failing must not stop the next one
            log.exception("ledger chores failed")
        await asyncio.sleep(min(every, lease / 3))


async def abandon_refused(rt: Runtime) -> None:
    """Abandon the reservations of requests refused while the ledger failed; stops at the
    first failure (still down) and tries again at the next round."""
    for ledger_id in list(rt.abandoned):
        try:
            if await rt.ledger.abandon(ledger_id, rt.clock()):
                log.warning("released reservation %s that the ledger made after refusing its request", ledger_id)
        except Exception:  # noqa: BLE001 - the ledger is still down: next round
            return
        rt.abandoned.discard(ledger_id)


async def upstream_sessions(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    for name, upstream in rt.settings.upstreams.items():
        rt.upstreams[name] = open_upstream(name, upstream, rt.settings)
        if upstream.kind == "llamacpp":
            # In the background: a llama-server still loading must not delay readiness.
            rt.probe(read_llamacpp_context(rt.upstreams[name], app[METRICS]))
    yield
    await asyncio.gather(*(u.session.close() for u in rt.upstreams.values()))


async def tokenizers(app: web.Application) -> AsyncIterator[None]:
    # Building a BPE table holds the GIL for ~0.3 s, which would stall every stream if a
    # request triggered it: the fallback encoding (o200k_base, also every unknown model's)
    # is built before the server listens. Any other is built in the background when a
    # request first needs it.
    await asyncio.to_thread(warm, ())
    load_in_background()
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
    await rt.cancel_probes()
    if rt.background:
        await asyncio.wait(rt.background, timeout=10)
    if rt.unsettled:
        # Last chance for settlements kept while the ledger was down.
        await retry_unsettled(rt)
    if rt.unsettled:
        log.error(
            "%d settlements could not reach the ledger before shutdown and are lost: %s",
            len(rt.unsettled),
            ", ".join(f"{p.row.request_id} ${p.row.cost}" for p in list(rt.unsettled)[:50]),
        )
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
RESTART_ONLY = ("server", "metrics", "logging", "ledger")


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
            del upstreams[name]
    for name, upstream_settings in new.upstreams.items():
        if name not in upstreams:
            upstreams[name] = open_upstream(name, upstream_settings, new)
            if upstream_settings.kind == "llamacpp":
                rt.probe(read_llamacpp_context(upstreams[name], app[METRICS]))
    if new.webhook != old.webhook:
        rt.retired.append((time.monotonic() + RETIRE_AFTER_S, rt.webhook.close))
        rt.webhook = WebhookSender(new.webhook)
    # One assignment each, no await in between: a request sees the old set or the new one.
    rt.prices = PriceTable.shipped().merged(price_overrides(new))
    rt.keyring = KeyRing(new.keys)
    rt.upstreams = upstreams
    rt.settings = new
    return kept


async def summary_endpoint(request: web.Request) -> web.Response:
    """Per-model figures since start. They name models and traffic, so once keys exist
    they are for key holders (or the admin alone, by config), not for anyone on the port."""
    try:
        handlers.require_summary_reader(request, request.app[RUNTIME])
    except HttpError as err:
        return handlers.error_response(err)
    return web.json_response(request.app[SUMMARY].snapshot())

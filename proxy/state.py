"""What the running app holds, under typed AppKeys (one Runtime per application)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.exchange import Observers
from proxy.forward import Upstream
from proxy.keys import KeyRing
from proxy.ledger import Ledger
from proxy.observers.budget_metrics import BudgetMetrics
from proxy.pricing import PriceTable
from proxy.settings import Settings
from proxy.webhook import WebhookSender

log = logging.getLogger("tollgate")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class FaultMetrics:
    """What the proxy counts about its own dependencies and lifecycle."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ledger_unavailable = Counter(
            "tollgate_ledger_unavailable_total",
            "Ledger operations that failed because the ledger (Redis, the SQLite file) was "
            "unavailable; mode is what admission did about it (fail_open, fail_closed, or "
            "deferred for a settlement kept for retry).",
            ("operation", "mode"),
            registry=registry,
        )
        self.unsettled = Gauge(
            "tollgate_ledger_unsettled",
            "Settlements waiting for the ledger to come back (charged when it does).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.reconciled = Counter(
            "tollgate_ledger_reconciled_total",
            "Settlements charged late, after the ledger came back.",
            registry=registry,
        )
        self.interrupted = Counter(
            "tollgate_ledger_interrupted_total",
            "Reservations whose process died with the request in flight (the lease ran out), "
            "settled at their estimated input cost as outcome=interrupted spend rows.",
            registry=registry,
        )
        self.reloads = Counter(
            "tollgate_config_reloads_total",
            "Configuration reloads (SIGHUP), by result (applied or rejected).",
            ("result",),
            registry=registry,
        )
        self.tasks = Gauge(
            "tollgate_event_loop_tasks",
            "Tasks alive on the event loop at the last scrape (flat under steady load; "
            "growth means a leak).",
            registry=registry,
            multiprocess_mode="livesum",
        )


@dataclass(eq=False)
class Runtime:
    settings: Settings
    prices: PriceTable
    observers: Observers
    keyring: KeyRing
    budget_metrics: BudgetMetrics
    webhook: WebhookSender
    clock: Callable[[], datetime] = utc_now
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    _ledger: Ledger | None = None
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # Start-up look-ups (llama-server's /props) that nothing waits on: cancelled at
    # shutdown, where `background` is drained.
    probes: set[asyncio.Task[Any]] = field(default_factory=set)
    # Ledger ids of this process's reservations not yet settled: their leases are renewed
    # while they run, so a lease runs out only when the process holding it is gone.
    live_reservations: set[str] = field(default_factory=set)
    # Ledger ids of reservations refused because the ledger failed (timed out) mid-call:
    # a hung Redis may still run them later, so they are abandoned once it answers.
    abandoned: set[str] = field(default_factory=set)
    unpriced_warned: set[str] = field(default_factory=set)
    measure_failures: int = 0
    # Settlements the ledger could not take (storage down): retried until it can, so a
    # request that was served is charged once the ledger is back (see finish.settle).
    unsettled: deque[Any] = field(default_factory=deque)
    # Resources a config reload replaced (old upstream sessions): closed at `deadline`
    # (monotonic), once requests still using them have had time to finish, or at shutdown.
    retired: list[tuple[float, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    faults: FaultMetrics | None = None
    # Set (monotonic) when SIGTERM starts a drain: requests still running at this moment
    # are cancelled by the server, and recorded as the proxy's doing, not the client's.
    drain_deadline: float | None = None

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise RuntimeError("the ledger is opened in the app's startup")
        return self._ledger

    @property
    def lease_seconds(self) -> float:
        return self.settings.ledger.lease_seconds

    @property
    def ready(self) -> bool:
        return (
            self._ledger is not None
            and bool(self.upstreams)
            and not any(u.closed for u in self.upstreams.values())
        )

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """Run work that must outlive the request (e.g. after a client disconnect) and is
        awaited at shutdown, so nothing is lost when the process drains."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background %s failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task


    def probe(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a look-up that only informs (metrics) and may be cut short at shutdown: an
        idle proxy must stop at once, not wait out a retry loop against a server that is
        not there."""
        task = asyncio.get_running_loop().create_task(coro)
        self.probes.add(task)
        task.add_done_callback(self.probes.discard)

    async def cancel_probes(self) -> None:
        for task in self.probes:
            task.cancel()
        await asyncio.gather(*self.probes, return_exceptions=True)


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)

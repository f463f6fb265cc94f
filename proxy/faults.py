"""What the proxy counts about its own dependencies and lifecycle (ledger outages, late
settlements, reloads, event-loop tasks)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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

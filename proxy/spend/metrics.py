"""Budget series for Prometheus: spent, limit, remaining and reset per budget rule.

Labels are rule names only (bounded by the config). A per-user or per-key template rule has
one bucket per user or key; its series aggregate them: spent is the sum over them, limit and
remaining are per bucket (remaining: the least any has left), and `bucket_spent_max` is the
spend of the bucket that spent most. Compare a limit with `bucket_spent_max`, never with the
sum: five users at 40% of a per-user limit have not spent 200% of anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.spend.budgets import TEMPLATE, BudgetRule, window


class BudgetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.spent = Gauge(
            "tollgate_budget_spent_usd",
            "Settled spend in the budget's current window, USD (per-user budgets: all users).",
            ["budget"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.bucket_spent_max = Gauge(
            "tollgate_budget_bucket_spent_max_usd",
            "Settled spend of the budget's fullest bucket in its current window, USD (per-user "
            "and per-key budgets: the user or key that spent most; else equal to spent): what "
            "compares with tollgate_budget_limit_usd.",
            ["budget"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.reserved = Gauge(
            "tollgate_budget_reserved_usd",
            "Reserved by requests in flight in the budget's current window, USD.",
            ["budget"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.limit = Gauge(
            "tollgate_budget_limit_usd",
            "The budget's limit, USD (per-user budgets: each user's limit).",
            ["budget"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.remaining = Gauge(
            "tollgate_budget_remaining_usd",
            "Limit minus spent and reserved, USD (per-user budgets: the least any user has left).",
            ["budget"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.reset = Gauge(
            "tollgate_budget_reset_timestamp_seconds",
            "Unix time at which the budget's current window ends (absent for `total` budgets).",
            ["budget"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.period = Gauge(
            "tollgate_budget_period_seconds",
            "Length of the budget's current window, seconds (absent for `total` budgets): "
            "what burn-rate rules divide the limit by.",
            ["budget"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.rejections = Counter(
            "tollgate_budget_rejections_total",
            "Requests refused with 429 budget_exceeded, by the budget that refused them.",
            ["budget"],
            registry=registry,
        )
        self.crossings = Counter(
            "tollgate_budget_threshold_crossings_total",
            "Warning thresholds crossed (first time in a window), by budget and threshold.",
            ["budget", "threshold"],
            registry=registry,
        )

    def rejected(self, budget: str) -> None:
        self.rejections.labels(budget).inc()

    def crossed(self, budget: str, threshold: float) -> None:
        self.crossings.labels(budget, f"{threshold:g}").inc()

    def refresh(self, rules: Sequence[BudgetRule], report: Iterable[Mapping[str, Any]], now: datetime) -> None:
        """Set every rule's gauges from the ledger's view of the current windows."""
        rows: dict[str, list[Mapping[str, Any]]] = {}
        for row in report:
            rows.setdefault(str(row["name"]), []).append(row)
        for rule in rules:
            mine = rows.get(rule.name, [])
            spent = sum((Decimal(r["spent"]) for r in mine), Decimal(0))
            reserved = sum((Decimal(r["reserved"]) for r in mine), Decimal(0))
            self.spent.labels(rule.name).set(float(spent))
            fullest = max((Decimal(r["spent"]) for r in mine), default=Decimal(0))
            self.bucket_spent_max.labels(rule.name).set(float(fullest))
            self.reserved.labels(rule.name).set(float(reserved))
            start, end = window(rule.period, now, rule.timezone)
            if end is not None:
                self.reset.labels(rule.name).set(end.timestamp())
                self.period.labels(rule.name).set((end - start).total_seconds())
            if rule.limit_usd is None:
                continue
            self.limit.labels(rule.name).set(float(rule.limit_usd))
            per_bucket = [rule.limit_usd - Decimal(r["spent"]) - Decimal(r["reserved"]) for r in mine]
            templated = TEMPLATE in (rule.scope.user, rule.scope.key, rule.scope.team)
            if templated:
                left = min(per_bucket) if per_bucket else rule.limit_usd
            else:
                left = rule.limit_usd - spent - reserved
            self.remaining.labels(rule.name).set(float(max(Decimal(0), left)))

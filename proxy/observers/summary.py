"""An in-process summary per model label since start (for a status page or `/tollgate/summary`).

Memory is bounded: the label set is bounded (configured route names plus "other"), and each
latency distribution is a sparse log-bucket histogram. Buckets grow by a factor of 2**(1/16)
(about 4.4 %) from 1 microsecond; a quantile is reported as the geometric middle of the bucket
that holds the nearest-rank sample, so it is within about 2.2 % of the exact value. Everything
from 1 µs to about 2 days fits in at most 600 buckets (a few kB per model); values outside are
clamped to the edge buckets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from proxy.exchange import Exchange
from proxy.observer import Observer
from proxy.observers.access_log import wall_iso_ms
from proxy.pricing import plain_usd


class LogHistogram:
    """Sparse histogram with logarithmic buckets, for quantiles with bounded relative error."""

    BUCKETS_PER_DOUBLING = 16
    MIN_VALUE = 1e-6
    MAX_INDEX = 600

    __slots__ = ("counts", "count")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0

    def _index(self, value: float) -> int:
        if value <= self.MIN_VALUE:
            return 0
        i = int(math.log2(value / self.MIN_VALUE) * self.BUCKETS_PER_DOUBLING) + 1
        return min(i, self.MAX_INDEX)

    def _representative(self, index: int) -> float:
        if index == 0:
            return self.MIN_VALUE
        lo = self.MIN_VALUE * 2 ** ((index - 1) / self.BUCKETS_PER_DOUBLING)
        hi = self.MIN_VALUE * 2 ** (index / self.BUCKETS_PER_DOUBLING)
        return math.sqrt(lo * hi)

    def add(self, value: float) -> None:
        i = self._index(value)
        self.counts[i] = self.counts.get(i, 0) + 1
        self.count += 1

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile, q in [0, 1]; None when empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i in sorted(self.counts):
            seen += self.counts[i]
            if seen >= rank:
                return self._representative(i)
        return self._representative(max(self.counts))


@dataclass(slots=True)
class ModelSummary:
    requests: int = 0
    errors: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    ttft: LogHistogram = field(default_factory=LogHistogram)
    duration: LogHistogram = field(default_factory=LogHistogram)
    tokens: dict[str, int] = field(
        default_factory=lambda: {
            "input": 0, "cached_input": 0, "cache_write": 0, "output": 0, "reasoning": 0,
        }
    )  # fmt: skip
    cost: Decimal = Decimal(0)
    unpriced: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "outcomes": dict(self.outcomes),
            "ttft_p50_s": self.ttft.quantile(0.50),
            "ttft_p95_s": self.ttft.quantile(0.95),
            "ttft_samples": self.ttft.count,
            "duration_p50_s": self.duration.quantile(0.50),
            "duration_p95_s": self.duration.quantile(0.95),
            "tokens": dict(self.tokens),
            "cost_usd": plain_usd(self.cost),
            "unpriced": self.unpriced,
        }


class SummaryObserver(Observer):
    """Per model label: requests, errors (any outcome but "ok"), TTFT and duration
    p50/p95, tokens by kind, cost. Token kinds follow `tollgate_tokens_total`: they
    partition the total (input is uncached, output excludes reasoning)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.models: dict[str, ModelSummary] = {}

    def on_finish(self, ex: Exchange) -> None:
        label = ex.model_label
        s = self.models.get(label)
        if s is None:
            s = self.models[label] = ModelSummary()
        s.requests += 1
        outcome = ex.outcome or "unknown"
        s.outcomes[outcome] = s.outcomes.get(outcome, 0) + 1
        if outcome != "ok":
            s.errors += 1
        ttft = ex.ttft_s
        if ttft is not None:
            s.ttft.add(ttft)
        duration = ex.duration_s
        if duration is not None:
            s.duration.add(duration)
        usage = ex.usage
        if usage is not None:
            cached, written = usage.cached_input_tokens, usage.cache_write_tokens
            t = s.tokens
            t["input"] += max(0, usage.input_tokens - cached - written)
            t["cached_input"] += cached
            t["cache_write"] += written
            t["output"] += max(0, usage.output_tokens - usage.reasoning_tokens)
            t["reasoning"] += usage.reasoning_tokens
        if ex.cost is not None:
            s.cost += ex.cost
        if not ex.priced:
            s.unpriced += 1

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready: Decimals as strings, latencies in seconds (None when no samples)."""
        total_cost = sum((s.cost for s in self.models.values()), Decimal(0))
        return {
            "since": wall_iso_ms(self.started),
            "uptime_s": time.time() - self.started,
            "requests": sum(s.requests for s in self.models.values()),
            "errors": sum(s.errors for s in self.models.values()),
            "cost_usd": plain_usd(total_cost),
            "models": {label: s.snapshot() for label, s in sorted(self.models.items())},
        }

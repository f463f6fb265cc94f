from __future__ import annotations

import math
import random
from decimal import Decimal
from typing import Any

import orjson
import pytest

from proxy.exchange import Exchange
from proxy.observers.summary import LogHistogram, SummaryObserver
from proxy.usage import Usage

T0 = 1_000_000_000
MS = 1_000_000


def exchange(ttft_ms: float | None, **kw: Any) -> Exchange:
    ex = Exchange(request_id="r", endpoint="chat.completions", method="POST", path="/", t0_ns=T0)
    ex.route_model = kw.pop("route_model", "gpt-4o-mini")
    ex.outcome = kw.pop("outcome", "ok")
    ex.t_first_token_ns = None if ttft_ms is None else T0 + int(ttft_ms * MS)
    ex.t_end_ns = T0 + 2000 * MS
    for k, v in kw.items():
        setattr(ex, k, v)
    return ex


def feed(obs: SummaryObserver, ex: Exchange) -> None:
    obs.on_start(ex)
    obs.on_first_token(ex)
    obs.on_finish(ex)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_log_histogram_quantiles_within_bound() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-1.0, 1.2) for _ in range(5000)]
    h = LogHistogram()
    for v in values:
        h.add(v)
    for q in (0.5, 0.9, 0.95, 0.99):
        got = h.quantile(q)
        assert got is not None
        assert got == pytest.approx(nearest_rank(values, q), rel=0.023)
    # Bounded memory: buckets, not samples.
    assert len(h.counts) < 200
    assert h.count == 5000


def test_log_histogram_edges() -> None:
    h = LogHistogram()
    assert h.quantile(0.5) is None
    h.add(0.0)
    h.add(1e12)  # clamped into the last bucket
    assert h.quantile(0.0) == LogHistogram.MIN_VALUE
    assert max(h.counts) == LogHistogram.MAX_INDEX
    assert h.quantile(1.0) is not None and h.quantile(1.0) > 1e5  # type: ignore[operator]


def test_summary_per_model() -> None:
    obs = SummaryObserver()
    ttfts = [100.0, 200.0, 300.0, 400.0, 1000.0]
    for t in ttfts:
        feed(
            obs,
            exchange(
                t,
                usage=Usage(input_tokens=100, cached_input_tokens=20, output_tokens=10, reasoning_tokens=3),
                cost=Decimal("0.10"),
            ),
        )
    feed(obs, exchange(None, outcome="upstream_error", cost=None))
    feed(obs, exchange(50.0, route_model=None, priced=False, cost=Decimal(0)))

    snap = obs.snapshot()
    orjson.dumps(snap)  # JSON-ready
    m = snap["models"]["gpt-4o-mini"]
    assert m["requests"] == 6 and m["errors"] == 1
    assert m["outcomes"] == {"ok": 5, "upstream_error": 1}
    assert m["ttft_samples"] == 5
    assert m["ttft_p50_s"] == pytest.approx(0.3, rel=0.023)
    assert m["ttft_p95_s"] == pytest.approx(1.0, rel=0.023)
    assert m["duration_p50_s"] == pytest.approx(2.0, rel=0.023)
    assert m["tokens"] == {"input": 400, "cached_input": 100, "cache_write": 0, "output": 35, "reasoning": 15}
    assert m["cost_usd"] == "0.50"
    other = snap["models"]["other"]
    assert other["requests"] == 1 and other["unpriced"] == 1 and other["cost_usd"] == "0"
    assert snap["requests"] == 7 and snap["errors"] == 1
    assert snap["cost_usd"] == "0.50"
    assert snap["since"].endswith("Z")


def test_empty_snapshot() -> None:
    snap = SummaryObserver().snapshot()
    assert snap["models"] == {} and snap["requests"] == 0 and snap["cost_usd"] == "0"
    orjson.dumps(snap)

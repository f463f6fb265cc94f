from __future__ import annotations

import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.exchange import Exchange
from proxy.observer import Observers
from proxy.observers.exposition import bound_port, start_metrics_server
from proxy.observers.metrics import (
    DURATION_BUCKETS,
    GAP_BUCKETS,
    TTFT_BUCKETS,
    MetricsObserver,
    observe_ns_many,
    status_class,
)
from proxy.usage import Usage
from tests.support.exchanges import chat_exchange

T0 = 5_000_000_000
MS = 1_000_000


def exchange(**kw: Any) -> Exchange:
    endpoint = kw.pop("endpoint", "chat.completions")
    defaults: dict[str, Any] = dict(
        requested_model="gpt-4o-mini-2024-07-18",
        route_model="gpt-4o-mini",
        upstream="openai",
        upstream_kind="openai",
        stream=True,
        key_name="team-a",
        user="alice@example.com",
    )
    return chat_exchange("req-secret-id-123", T0, 1_700_000_000.0, {**defaults, **kw}, endpoint)


def finished_stream(**kw: Any) -> Exchange:
    """A streamed chat: sent at 1 ms, first byte 200 ms, tokens 300 ms..500 ms, end 510 ms."""
    base: dict[str, Any] = dict(
        t_upstream_sent_ns=T0 + 1 * MS,
        t_first_byte_ns=T0 + 200 * MS,
        t_first_token_ns=T0 + 300 * MS,
        t_first_content_ns=T0 + 350 * MS,
        t_last_token_ns=T0 + 500 * MS,
        t_end_ns=T0 + 510 * MS,
        gaps_ns=[50 * MS, 50 * MS, 100 * MS],
        overhead_ns=300_000,
        status=200,
        outcome="ok",
        usage=Usage(
            input_tokens=100,
            cached_input_tokens=40,
            output_tokens=21,
            reasoning_tokens=5,
            input_source="upstream",
            output_source="upstream",
        ),
        cost=Decimal("0.000123"),
        priced=True,
    )
    base.update(kw)
    return exchange(**base)


def families(registry: CollectorRegistry) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    text = generate_latest(registry).decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def samples(registry: CollectorRegistry, name: str) -> list[Any]:
    text = generate_latest(registry).decode()
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def run(obs: MetricsObserver, ex: Exchange) -> None:
    obs.on_start(ex)
    obs.on_first_token(ex)
    obs.on_finish(ex)


def test_metric_names_types_and_build_info() -> None:
    reg = CollectorRegistry()
    MetricsObserver(reg, version="9.9.9")
    fams = families(reg)
    expected = {
        "tollgate_requests": "counter",
        "tollgate_request_duration_seconds": "histogram",
        "tollgate_time_to_first_byte_seconds": "histogram",
        "tollgate_time_to_first_token_seconds": "histogram",
        "tollgate_upstream_time_to_first_token_seconds": "histogram",
        "tollgate_inter_token_gap_seconds": "histogram",
        "tollgate_time_per_output_token_seconds": "histogram",
        "tollgate_proxy_overhead_seconds": "histogram",
        "tollgate_tokens": "counter",
        "tollgate_cost_usd": "counter",
        "tollgate_unpriced_requests": "counter",
        "tollgate_in_flight_requests": "gauge",
        "tollgate_open_streams": "gauge",
        "tollgate_upstream_errors": "counter",
        "tollgate_observer_errors": "counter",
        "tollgate_llamacpp_prompt_eval_seconds": "histogram",
        "tollgate_llamacpp_generation_tokens_per_second": "histogram",
        "tollgate_llamacpp_context_size": "gauge",
        "tollgate_build_info": "gauge",
    }
    for name, typ in expected.items():
        assert name in fams, name
        assert fams[name].type == typ, name
    info = samples(reg, "tollgate_build_info")
    assert len(info) == 1 and info[0].value == 1.0
    assert info[0].labels["version"] == "9.9.9"
    assert info[0].labels["python"].count(".") == 2


def test_buckets_follow_semconv_and_reach_minutes() -> None:
    semconv_duration = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
    assert DURATION_BUCKETS[: len(semconv_duration)] == semconv_duration
    assert DURATION_BUCKETS[-1] >= 600
    assert TTFT_BUCKETS[:3] == (0.001, 0.005, 0.01) and TTFT_BUCKETS[-1] >= 300
    obs = MetricsObserver(CollectorRegistry())
    run(obs, finished_stream())
    les = [s.labels["le"] for s in samples(obs.registry, "tollgate_inter_token_gap_seconds_bucket")]
    assert float(les[0]) < 0.001  # sub-millisecond resolution for gaps


def test_one_streamed_request_all_histograms() -> None:
    reg = CollectorRegistry()
    obs = MetricsObserver(reg)
    run(obs, finished_stream())

    route = dict(model="gpt-4o-mini", upstream="openai", endpoint="chat.completions", stream="true")
    assert sample(reg, "tollgate_requests_total", status_class="2xx", **route) == 1.0
    assert sample(reg, "tollgate_request_duration_seconds_count", **route) == 1.0
    assert sample(reg, "tollgate_request_duration_seconds_sum", **route) == pytest.approx(0.51)
    # 0.51 s falls in the 0.64 bucket, not in 0.32.
    assert sample(reg, "tollgate_request_duration_seconds_bucket", le="0.32", **route) == 0.0
    assert sample(reg, "tollgate_request_duration_seconds_bucket", le="0.64", **route) == 1.0
    assert sample(reg, "tollgate_time_to_first_byte_seconds_sum", **route) == pytest.approx(0.2)
    assert sample(reg, "tollgate_time_to_first_token_seconds_sum", **route) == pytest.approx(0.3)
    mu = dict(model="gpt-4o-mini", upstream="openai")
    assert sample(reg, "tollgate_upstream_time_to_first_token_seconds_sum", **mu) == pytest.approx(0.299)
    assert sample(reg, "tollgate_inter_token_gap_seconds_count", **mu) == 3.0
    assert sample(reg, "tollgate_inter_token_gap_seconds_sum", **mu) == pytest.approx(0.2)
    assert sample(reg, "tollgate_time_to_first_content_seconds_sum", **route) == pytest.approx(0.35)
    # TPOT = (500 - 300) ms / (21 - 5 - 1): the 5 reasoning tokens were never streamed
    # (hidden), so they came before the first chunk and are not in the divisor.
    assert sample(reg, "tollgate_time_per_output_token_seconds_sum", **mu) == pytest.approx(0.2 / 15)
    assert sample(
        reg, "tollgate_proxy_overhead_seconds_sum", upstream="openai", endpoint="chat.completions", stream="true"
    ) == pytest.approx(0.0003)


def test_token_kinds_partition_the_total_and_cost() -> None:
    reg = CollectorRegistry()
    obs = MetricsObserver(reg)
    run(obs, finished_stream())
    run(obs, finished_stream(usage=Usage(input_tokens=10, output_tokens=3), key_name=None, cost=Decimal("0.5")))

    mu = dict(model="gpt-4o-mini", upstream="openai")
    assert sample(reg, "tollgate_tokens_total", kind="input", source="upstream", **mu) == 60.0
    assert sample(reg, "tollgate_tokens_total", kind="cached_input", source="upstream", **mu) == 40.0
    assert sample(reg, "tollgate_tokens_total", kind="output", source="upstream", **mu) == 16.0
    assert sample(reg, "tollgate_tokens_total", kind="reasoning", source="upstream", **mu) == 5.0
    assert sample(reg, "tollgate_tokens_total", kind="input", source="estimated", **mu) == 10.0
    assert sample(reg, "tollgate_tokens_total", kind="output", source="estimated", **mu) == 3.0
    total = sum(s.value for s in samples(reg, "tollgate_tokens_total"))
    assert total == 100 + 21 + 10 + 3  # no double counting across kinds

    assert sample(reg, "tollgate_cost_usd_total", key="team-a", **mu) == pytest.approx(0.000123)
    assert sample(reg, "tollgate_cost_usd_total", key="none", **mu) == pytest.approx(0.5)
    assert sample(reg, "tollgate_unpriced_requests_total", **mu) is None


def test_unpriced_and_errors() -> None:
    reg = CollectorRegistry()
    obs = MetricsObserver(reg)
    run(obs, finished_stream(priced=False, cost=Decimal(0), route_model="local-llama", upstream="llama"))
    run(
        obs,
        exchange(
            t_upstream_sent_ns=T0 + MS,
            t_end_ns=T0 + 30 * MS,
            status=502,
            outcome="proxy_error",
            error_type="upstream_unreachable",
            stream=False,
        ),
    )
    run(obs, exchange(t_upstream_sent_ns=T0 + MS, t_end_ns=T0 + 9 * MS, status=429, outcome="upstream_error"))
    run(obs, exchange(t_end_ns=T0 + MS, status=404, outcome="rejected", error_type="model_not_found"))

    assert sample(reg, "tollgate_unpriced_requests_total", model="local-llama", upstream="llama") == 1.0
    assert sample(reg, "tollgate_upstream_errors_total", upstream="openai", error_type="upstream_unreachable") == 1.0
    assert sample(reg, "tollgate_upstream_errors_total", upstream="openai", error_type="upstream_error") == 1.0
    # A request the proxy refused never went upstream: not an upstream error, no overhead sample.
    assert sum(s.value for s in samples(reg, "tollgate_upstream_errors_total")) == 2.0
    assert sample(reg, "tollgate_requests_total", status_class="4xx", stream="true") == 2.0
    assert sample(reg, "tollgate_requests_total", status_class="5xx", stream="false") == 1.0
    overhead_counts = sum(s.value for s in samples(reg, "tollgate_proxy_overhead_seconds_count"))
    assert overhead_counts == 3.0


def test_status_class() -> None:
    assert status_class(None) == "none"
    assert status_class(200) == "2xx"
    assert status_class(499) == "4xx"
    assert status_class(503) == "5xx"
    assert status_class(0) == "none"


def test_in_flight_and_open_streams_return_to_zero() -> None:
    reg = CollectorRegistry()
    obs = MetricsObserver(reg)
    a = exchange(upstream=None, stream=True)  # upstream not yet routed at on_start
    b = exchange(stream=False)
    obs.on_start(a)
    obs.on_start(b)
    assert sample(reg, "tollgate_in_flight_requests", upstream="none") == 1.0
    assert sample(reg, "tollgate_in_flight_requests", upstream="openai") == 1.0
    assert sample(reg, "tollgate_open_streams", upstream="none") == 1.0
    a.upstream = "openai"  # routed after start: the gauge still comes down on the same series
    a.status, a.outcome, a.t_end_ns = 200, "ok", T0 + MS
    obs.on_finish(a)
    b.status, b.outcome, b.t_end_ns = None, "client_gone", T0 + MS
    obs.on_finish(b)
    for s in samples(reg, "tollgate_in_flight_requests") + samples(reg, "tollgate_open_streams"):
        assert s.value == 0.0, s
    assert sample(reg, "tollgate_requests_total", status_class="none") == 1.0


def test_labels_are_bounded() -> None:
    """Model comes from model_label only; ids, users and prompts never reach a label."""
    reg = CollectorRegistry()
    obs = MetricsObserver(reg)
    ex = finished_stream(
        route_model=None,
        requested_model="my-unlisted-model-xyz",
        body={"messages": [{"role": "user", "content": "prompt-text-zzz"}], "user": "alice@example.com"},
    )
    run(obs, ex)
    text = generate_latest(reg).decode()
    for forbidden in ("my-unlisted-model-xyz", "req-secret-id-123", "alice@example.com", "prompt-text-zzz"):
        assert forbidden not in text
    assert sample(reg, "tollgate_requests_total", model="other") == 1.0


def test_llamacpp_timings_context_and_observer_errors() -> None:
    reg = CollectorRegistry()
    obs = MetricsObserver(reg)
    timings = {
        "prompt_n": 20.0,
        "cache_n": 3.0,
        "predicted_n": 9.0,
        "prompt_ms": 250.0,
        "predicted_ms": 300.0,
        "predicted_per_second": 30.0,
    }
    run(obs, finished_stream(upstream="llama", upstream_kind="llamacpp", llamacpp_timings=timings))
    assert sample(reg, "tollgate_llamacpp_prompt_eval_seconds_sum", upstream="llama") == pytest.approx(0.25)
    assert sample(reg, "tollgate_llamacpp_generation_tokens_per_second_sum", upstream="llama") == 30.0
    assert sample(reg, "tollgate_llamacpp_generation_tokens_per_second_bucket", upstream="llama", le="20.0") == 0.0
    obs.set_llamacpp_context("llama", 8192)
    assert sample(reg, "tollgate_llamacpp_context_size", upstream="llama") == 8192.0

    class Broken:
        def on_start(self, ex: Exchange) -> None:
            raise RuntimeError("boom")

        def on_first_token(self, ex: Exchange) -> None:
            return None

        def on_finish(self, ex: Exchange) -> None:
            return None

    fan = Observers([Broken(), obs])
    fan.on_failure.append(obs.count_observer_error)
    fan.on_start(exchange())
    assert sample(reg, "tollgate_observer_errors_total", observer="Broken") == 1.0
    obs.count_dropped_span()
    assert sample(reg, "tollgate_trace_spans_dropped_total") == 1.0


def test_children_are_cached() -> None:
    obs = MetricsObserver(CollectorRegistry())
    run(obs, finished_stream())
    run(obs, finished_stream())
    key = ("gpt-4o-mini", "openai", "chat.completions", "true")
    child = obs.duration.get(*key)
    assert obs.duration.get(*key) is child
    assert sample(obs.registry, "tollgate_request_duration_seconds_count", model="gpt-4o-mini") == 2.0


async def test_metrics_server_serves_exposition() -> None:
    reg = CollectorRegistry()
    obs = MetricsObserver(reg)
    run(obs, finished_stream())
    runner = await start_metrics_server(reg, "127.0.0.1", 0, "/metrics")
    try:
        port = bound_port(runner)
        assert port > 0
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                body = await resp.text()
            async with session.get(
                f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text"}
            ) as resp:
                assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
                assert (await resp.text()).rstrip().endswith("# EOF")
            async with session.get(f"http://127.0.0.1:{port}/other") as resp:
                assert resp.status == 404
        fams = {f.name: f for f in text_string_to_metric_families(body)}
        assert "tollgate_build_info" in fams
        assert sample(reg, "tollgate_requests_total") == 1.0
        assert 'tollgate_requests_total{endpoint="chat.completions"' in body
    finally:
        await runner.cleanup()


def test_multiprocess_mode_aggregates_worker_files(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set (before prometheus_client is imported, hence a
    subprocess), the scrape merges the workers' files and the gauge modes are accepted."""
    script = textwrap.dedent(
        """
        from prometheus_client import CollectorRegistry, generate_latest
        from proxy.exchange import Exchange
        from proxy.observers.exposition import _scrape_registry
        from proxy.observers.metrics import MetricsObserver
        obs = MetricsObserver(CollectorRegistry(), version="1.0")
        ex = Exchange(request_id="r", endpoint="chat.completions", method="POST", path="/", t0_ns=0)
        ex.upstream, ex.route_model, ex.stream = "openai", "m", True
        obs.on_start(ex)
        obs.set_llamacpp_context("llama", 4096)
        ex.status, ex.outcome, ex.t_end_ns = 200, "ok", 1_000_000
        obs.on_finish(ex)
        obs.on_start(ex)
        print(generate_latest(_scrape_registry(obs.registry)).decode())
        """
    )
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert list(tmp_path.iterdir())  # the worker wrote its mmap files
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(out)
        for s in fam.samples
    }
    assert got[("tollgate_in_flight_requests", (("upstream", "openai"),))] == 1.0
    assert got[("tollgate_open_streams", (("upstream", "openai"),))] == 1.0
    assert got[("tollgate_llamacpp_context_size", (("upstream", "llama"),))] == 4096.0
    assert any(name == "tollgate_build_info" and v == 1.0 for (name, _), v in got.items())
    assert got[
        (
            "tollgate_requests_total",
            (("endpoint", "chat.completions"), ("model", "m"), ("status_class", "2xx"),
             ("stream", "true"), ("upstream", "openai")),
        )
    ] == 1.0


def _gap_histograms() -> tuple[Any, Any, CollectorRegistry, CollectorRegistry]:
    from prometheus_client import Histogram

    import proxy.observers.metrics as m

    regs = CollectorRegistry(), CollectorRegistry()
    a, b = (Histogram("gap_seconds", "gaps", ("model",), buckets=GAP_BUCKETS, registry=r) for r in regs)
    at_once = m._fast(b.labels("m"))
    assert isinstance(at_once, m._FastHistogram)
    return a.labels("m"), at_once, regs[0], regs[1]


def _buckets(registry: CollectorRegistry) -> dict[str, float]:
    return {
        f"{s.name}{s.labels.get('le', '')}": s.value
        for fam in registry.collect()
        for s in fam.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_observing_gaps_at_once_counts_as_observing_each(seed: int) -> None:
    import random

    rng = random.Random(seed)
    # Every bound exactly (a value equal to a bound falls in that bound's bucket), around
    # each bound, and the tails: 0 and past the last finite bound.
    values = [round(b * 1e9) for b in GAP_BUCKETS] + [0, 20 * 10**9]
    values += [max(0, round(b * 1e9) + rng.choice((-1, 1))) for b in GAP_BUCKETS]
    values += [rng.randrange(0, 3 * 10**9) for _ in range(200)]
    one_by_one, at_once, reg_a, reg_b = _gap_histograms()
    for v in values:
        one_by_one.observe(v / 1e9)
    observe_ns_many(at_once, values)
    a, b = _buckets(reg_a), _buckets(reg_b)
    assert a.keys() == b.keys()
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=1e-12), name


def test_observing_gaps_falls_back_to_observe_without_the_histogram_internals() -> None:
    seen: list[float] = []

    class Plain:
        def observe(self, amount: float) -> None:
            seen.append(amount)

    observe_ns_many(Plain(), [1_000_000, 2_500_000])
    assert seen == [0.001, 0.0025]


def test_the_fast_counters_and_histograms_expose_what_prometheus_clients_own_do(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The observer's children are stand-ins for prometheus_client's (no per-call checks,
    buckets by bisection): the same exchanges give the same exposition either way."""
    import proxy.observers.metrics as m

    rows = []
    for i in range(40):
        # Durations on and around the bucket bounds, and far past the last.
        duration_ms = [1, 5, 10, 25, 50, 100, 250, 1000, 2500, 700_000][i % 10] + (i % 3) - 1
        rows.append(finished_stream(t_end_ns=T0 + duration_ms * MS, gaps_ns=[MS * (i % 4), 250_000 * (i % 5)],
                                    status=[200, 429, 500][i % 3], overhead_ns=50_000 * (i % 7),
                                    cost=Decimal(i) / 1000, key_name=f"k{i % 2}"))

    def exposition(fast: bool) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        if not fast:
            monkeypatch.setattr(m, "_fast", lambda child: child)
        registry = CollectorRegistry()
        observer = MetricsObserver(registry=registry)
        for ex in rows:
            observer.on_start(ex)
            observer.on_finish(ex)
        monkeypatch.undo()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in registry.collect()
            for s in fam.samples
            if not s.name.endswith("_created") and fam.name != "tollgate_build_info"
        }

    fast, plain = exposition(True), exposition(False)
    assert fast.keys() == plain.keys()
    assert any(name.endswith("_bucket") for name, _ in fast)
    for key, value in plain.items():
        assert fast[key] == pytest.approx(value, rel=1e-12), key


def test_a_fast_counter_refuses_a_negative_amount_as_prometheus_client_does() -> None:
    from prometheus_client import Counter

    import proxy.observers.metrics as m

    child = m._fast(Counter("c_total", "c", registry=CollectorRegistry()))
    assert isinstance(child, m._FastCounter)
    with pytest.raises(ValueError):
        child.inc(-1)

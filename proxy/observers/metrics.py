"""Prometheus metrics for every finished exchange, and the scrape endpoint that serves them.

Metric names are a contract with dashboards and alert rules: base units (seconds, USD),
counters end in `_total`, and every label value comes from a bounded set (configured route
names, configured upstreams and keys, fixed endpoint names). Request ids, users and prompts
never become labels.

Histogram buckets follow the OpenTelemetry GenAI semantic conventions where they name one
(`gen_ai.client.operation.duration`, `gen_ai.server.time_to_first_token`,
`gen_ai.server.time_per_output_token`) and extend them: streams of reasoning models run for
minutes, so duration and TTFT reach 600 s; gaps and proxy overhead need sub-millisecond
resolution that the semconv sets do not have.
"""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from proxy.exchange import Exchange, llamacpp_phases
from proxy.observer import Observer

# gen_ai.client.operation.duration (doubling from 10 ms to 81.92 s), extended for long
# reasoning streams.
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
    120.0, 300.0, 600.0,
)  # fmt: skip
# gen_ai.server.time_to_first_token (1 ms to 10 s), extended: a reasoning model can think
# for minutes before its first visible token.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 81.92, 120.0, 300.0, 600.0,
)  # fmt: skip
# gen_ai.server.time_per_output_token (10 ms to 2.5 s), with finer steps below 10 ms
# because fast models and local GPUs emit a token every few milliseconds.
TPOT_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
# Inter-token gaps: chunks can arrive back to back (sub-ms, several in one TCP read) or
# stall for seconds.
GAP_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# The proxy's own time per request: should stay well under a millisecond or two.
OVERHEAD_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
)  # fmt: skip
# llama.cpp prompt evaluation (prefill) time: milliseconds for a cached prompt, minutes for
# a long context on CPU.
PROMPT_EVAL_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 81.92, 120.0,
    300.0,
)  # fmt: skip
# llama.cpp generation speed, tokens per second: from a slow CPU to a fast GPU.
TOKENS_PER_SECOND_BUCKETS: tuple[float, ...] = (
    1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0,
    500.0, 1000.0,
)  # fmt: skip

_FAILED_UPSTREAM_OUTCOMES = frozenset({"proxy_error", "upstream_error"})


M = TypeVar("M", Counter, Gauge, Histogram)


class _Children(Generic[M]):
    """A metric family with its labelled children cached per label tuple.

    `labels()` validates and looks up under a lock on every call; the set of label tuples
    is small and bounded, so a dict lookup on the hot path is cheaper.
    """

    __slots__ = ("family", "_cache")

    def __init__(self, family: M) -> None:
        self.family: M = family
        self._cache: dict[tuple[str, ...], Any] = {}

    def get(self, *values: str) -> Any:
        child = self._cache.get(values)
        if child is None:
            child = _fast(self.family.labels(*values))
            self._cache[values] = child
        return child


class _FastCounter:
    """A Counter child's `inc`, without the checks prometheus_client makes on every call
    (that the metric has no label left to give, that there is no exemplar): a request
    increments a dozen counters. Made by `_fast`, only for a child that has its value."""

    __slots__ = ("_value",)

    def __init__(self, value: Any) -> None:
        self._value = value

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._value.inc(amount)


class _FastHistogram:
    """A Histogram child's `observe`: its bucket found by bisection rather than a walk over
    the bounds, and no per-call checks. The same attributes as the child, for
    `observe_ns_many`. Made by `_fast`, only for a child that has them."""

    __slots__ = ("_buckets", "_sum", "_upper_bounds")

    def __init__(self, child: Any) -> None:
        self._upper_bounds = child._upper_bounds
        self._buckets = child._buckets
        self._sum = child._sum

    def observe(self, amount: float) -> None:
        self._sum.inc(amount)
        if amount == amount:  # as `observe`: a NaN goes in the sum and in no bucket
            # The first bound >= amount, the bucket `observe` picks (the last bound is +Inf).
            self._buckets[bisect_left(self._upper_bounds, amount)].inc(1)


def _fast(child: Any) -> Any:
    """`child`, or its fast stand-in where prometheus_client's child has the parts it needs
    (tests/unit/test_metrics.py checks both give the same exposition)."""
    if isinstance(child, Counter) and hasattr(child, "_value"):
        return _FastCounter(child._value)
    if isinstance(child, Histogram) and all(hasattr(child, a) for a in _FastHistogram.__slots__):
        return _FastHistogram(child)
    return child


def observe_ns_many(child: Any, values_ns: Sequence[int]) -> None:
    """`child.observe(v / 1e9)` for each value: a stream's gaps, one per chunk.

    `Histogram.observe` takes two locks and walks the bucket bounds for each value; a
    64-chunk stream's gaps cost more that way than the rest of its metrics together.
    Counted here into their buckets first, each bucket and the sum are added to once, on
    a `_FastHistogram` (`_fast` decides whether prometheus_client's child has the parts);
    any other child observes each value (tests/unit/test_metrics.py compares the two)."""
    if not isinstance(child, _FastHistogram):
        for v in values_ns:
            child.observe(v / 1e9)
        return
    bounds, buckets, total = child._upper_bounds, child._buckets, child._sum
    counts: dict[int, int] = {}
    seconds = 0.0
    for v in values_ns:
        amount = v / 1e9
        seconds += amount
        # The first bound >= amount: the bucket `observe` increments (bounds end in +Inf).
        i = bisect_left(bounds, amount)
        counts[i] = counts.get(i, 0) + 1
    total.inc(seconds)
    for i, n in counts.items():
        buckets[i].inc(n)


def status_class(status: int | None) -> str:
    """`2xx`..`5xx`, or `none` when no status was ever sent."""
    if status is None or not 100 <= status <= 599:
        return "none"
    return f"{status // 100}xx"


def _build_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tollgate")
    except PackageNotFoundError:
        return "unknown"


class MetricsObserver(Observer):
    """Records every exchange into a Prometheus registry (injected, so tests use fresh ones)."""

    def __init__(self, registry: CollectorRegistry, version: str | None = None) -> None:
        self.registry = registry
        # The in-flight (and open-stream) children each started exchange raised: lowered at
        # on_finish on the same series, whatever the exchange learned in between.
        self._raised: dict[Exchange, tuple[Any, Any]] = {}

        def counter(name: str, doc: str, labels: Sequence[str]) -> _Children[Counter]:
            return _Children(Counter(name, doc, labels, registry=registry))

        def histogram(
            name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
        ) -> _Children[Histogram]:
            return _Children(Histogram(name, doc, labels, registry=registry, buckets=buckets))

        route = ("model", "upstream", "endpoint", "stream")
        self.requests = counter(
            "tollgate_requests_total",
            "Finished requests. status_class is 2xx..5xx of the status sent to the client, "
            "or none when the client left before one was sent.",
            ("model", "upstream", "endpoint", "status_class", "stream"),
        )
        self.duration = histogram(
            "tollgate_request_duration_seconds",
            "Request received to last byte written to the client (or failure). "
            "Buckets: gen_ai.client.operation.duration, extended to 600 s.",
            route,
            DURATION_BUCKETS,
        )
        self.ttfb = histogram(
            "tollgate_time_to_first_byte_seconds",
            "Request received to first upstream response byte relayed.",
            route,
            TTFT_BUCKETS,
        )
        self.ttft = histogram(
            "tollgate_time_to_first_token_seconds",
            "Request received to first output-carrying chunk relayed, any channel: content, "
            "refusal, reasoning, a tool or function call (from its first chunk), audio; "
            "role-only chunks do not count. Buckets: gen_ai.server.time_to_first_token, "
            "extended to 600 s.",
            route,
            TTFT_BUCKETS,
        )
        self.ttfc = histogram(
            "tollgate_time_to_first_content_seconds",
            "Request received to first visible output chunk relayed: content, refusal, a "
            "tool or function call, audio; not reasoning. Equals TTFT unless a reasoning "
            "model streamed its reasoning first. Buckets as TTFT.",
            route,
            TTFT_BUCKETS,
        )
        self.upstream_ttft = histogram(
            "tollgate_upstream_time_to_first_token_seconds",
            "Upstream request sent to first output-carrying chunk received.",
            ("model", "upstream"),
            TTFT_BUCKETS,
        )
        self.gaps = histogram(
            "tollgate_inter_token_gap_seconds",
            "Time between successive output-carrying chunks; one observation per gap.",
            ("model", "upstream"),
            GAP_BUCKETS,
        )
        self.tpot = histogram(
            "tollgate_time_per_output_token_seconds",
            "(last output chunk - first output chunk) / (output tokens emitted after the "
            "first chunk), per request; hidden reasoning tokens, produced before the first "
            "chunk, are not in the divisor. "
            "Buckets: gen_ai.server.time_per_output_token, refined below 10 ms.",
            ("model", "upstream"),
            TPOT_BUCKETS,
        )
        self.overhead = histogram(
            "tollgate_proxy_overhead_seconds",
            "Latency the proxy added for the client on a forwarded request: received to "
            "upstream request sent (parse, admit, reserve), plus upstream read to client "
            "write done for the first output chunk of a stream (the first chunk if none "
            "carries output), or a plain body's end read to its accounting. Not a sum over "
            "chunks.",
            ("upstream", "endpoint", "stream"),
            OVERHEAD_BUCKETS,
        )
        self.tokens = counter(
            "tollgate_tokens_total",
            "Tokens by kind; the kinds partition the total, so summing them never double "
            "counts: input = uncached prompt tokens (excluding cache reads and writes), "
            "cached_input = prompt tokens read from cache, cache_write = prompt tokens "
            "written to cache, output = completion tokens excluding reasoning, reasoning = "
            "reasoning tokens. source is upstream (reported usage) or estimated (tiktoken).",
            ("model", "upstream", "kind", "source"),
        )
        self.cost = counter(
            "tollgate_cost_usd_total",
            "Cost in USD from the price table; key is the configured key name or none.",
            ("model", "upstream", "key"),
        )
        self.unpriced = counter(
            "tollgate_unpriced_requests_total",
            "Requests whose model has no price (counted at cost 0).",
            ("model", "upstream"),
        )
        self.upstream_errors = counter(
            "tollgate_upstream_errors_total",
            "Requests that ended with an upstream error status or a proxy-side failure "
            "(unreachable, timeout, broken stream).",
            ("upstream", "error_type"),
        )
        self.unmetered = counter(
            "tollgate_unmetered_requests_total",
            "Requests forwarded on a path Tollgate cannot meter: `allowed_by` is the "
            "passthrough.allow_unmetered pattern that let it through, or `unguarded` where "
            "no key or budget applied.",
            ("allowed_by",),
        )
        self.observer_errors = counter(
            "tollgate_observer_errors_total",
            "Exceptions raised inside observers (measuring never breaks forwarding).",
            ("observer",),
        )
        self.spans_dropped = Counter(
            "tollgate_trace_spans_dropped_total",
            "Spans dropped because the trace export queue was full.",
            registry=registry,
        )
        self.in_flight = _Children(
            Gauge(
                "tollgate_in_flight_requests",
                "Requests received and not yet finished.",
                ("upstream",),
                registry=registry,
                multiprocess_mode="livesum",
            )
        )
        self.open_streams = _Children(
            Gauge(
                "tollgate_open_streams",
                "Streaming requests received and not yet finished.",
                ("upstream",),
                registry=registry,
                multiprocess_mode="livesum",
            )
        )
        self.llamacpp_prompt_eval = histogram(
            "tollgate_llamacpp_prompt_eval_seconds",
            "llama.cpp prompt evaluation time (timings.prompt_ms).",
            ("upstream",),
            PROMPT_EVAL_BUCKETS,
        )
        self.llamacpp_tps = histogram(
            "tollgate_llamacpp_generation_tokens_per_second",
            "llama.cpp generation speed (timings.predicted_per_second).",
            ("upstream",),
            TOKENS_PER_SECOND_BUCKETS,
        )
        # Every worker sees the same n_ctx for an upstream, so the max across live workers
        # is the value.
        self.llamacpp_context = _Children(
            Gauge(
                "tollgate_llamacpp_context_size",
                "Context size (n_ctx) reported by a llama.cpp upstream.",
                ("upstream",),
                registry=registry,
                multiprocess_mode="livemax",
            )
        )
        # Per request, where a llama.cpp request's time went, from the server's `timings`
        # joined with Tollgate's clock (README "llama.cpp engine telemetry").
        self.llamacpp_phase = histogram(
            "tollgate_llamacpp_request_phase_seconds",
            "Time of a llama.cpp request by phase: queue_network (upstream TTFT, or body time, "
            "minus the server's own prompt_ms and predicted_ms), prompt_eval, generation.",
            ("upstream", "phase"),
            PROMPT_EVAL_BUCKETS,
        )

        def engine_gauge(name: str, doc: str) -> _Children[Gauge]:
            # The server's state as last scraped; every worker scrapes the same server.
            return _Children(Gauge(name, doc, ("upstream",), registry=registry, multiprocess_mode="livemax"))

        self.llamacpp_engine = {
            "slots_busy": engine_gauge("tollgate_llamacpp_slots_busy", "Slots processing a request (/slots)."),
            "slots_total": engine_gauge("tollgate_llamacpp_slots_total", "Slots of the server (/slots)."),
            "requests_processing": engine_gauge(
                "tollgate_llamacpp_requests_processing", "llamacpp:requests_processing as last scraped."
            ),
            "requests_deferred": engine_gauge(
                "tollgate_llamacpp_requests_deferred", "llamacpp:requests_deferred as last scraped (waiting for a slot)."
            ),
            "kv_cache_usage_ratio": engine_gauge(
                "tollgate_llamacpp_kv_cache_usage_ratio",
                "llamacpp:kv_cache_usage_ratio as last scraped (only servers that still export it).",
            ),
        }
        self.llamacpp_scrape_up = engine_gauge(
            "tollgate_llamacpp_scrape_up", "1 when the last scrape of /metrics or /slots answered, else 0."
        )
        # Replicated upstreams (README "Replicated upstreams"): `replica` is the configured
        # name or host:port, from a bounded, configured set.
        self.replica_requests = counter(
            "tollgate_replica_requests_total",
            "Requests a replica of a replicated upstream took, by outcome (ok, upstream_error, "
            "proxy_error, client_gone).",
            ("upstream", "replica", "outcome"),
        )
        self.replica_connect_failures = counter(
            "tollgate_replica_connect_failures_total",
            "Connects to a replica that failed; the request went on to another replica "
            "unless none was left.",
            ("upstream", "replica"),
        )
        self.replica_in_flight_gauge = _Children(
            Gauge(
                "tollgate_replica_in_flight_requests",
                "Requests sent to a replica and not yet finished.",
                ("upstream", "replica"),
                registry=registry,
                multiprocess_mode="livesum",
            )
        )
        # Each worker checks on its own; the lowest says whether any of them sees it down.
        self.replica_up_gauge = _Children(
            Gauge(
                "tollgate_replica_up",
                "1 while a replica is taken to be up (health checks, connects), else 0.",
                ("upstream", "replica"),
                registry=registry,
                multiprocess_mode="livemin",
            )
        )
        build_info = Gauge(
            "tollgate_build_info",
            "Always 1; labels carry the Tollgate version and the Python version.",
            ("version", "python"),
            registry=registry,
            multiprocess_mode="max",
        )
        build_info.labels(version or _build_version(), platform.python_version()).set(1)

    # Observer hooks

    def on_start(self, ex: Exchange) -> None:
        upstream = ex.upstream or "none"
        # Remember the exact child that was raised: the upstream may only be known (or may
        # change) after on_start, and the gauge must come back down on the same series.
        g = self.in_flight.get(upstream)
        g.inc()
        s = None
        if ex.stream:
            s = self.open_streams.get(upstream)
            s.inc()
        self._raised[ex] = (g, s)

    def on_finish(self, ex: Exchange) -> None:
        raised = self._raised.pop(ex, None)
        if raised is not None:
            g, s = raised
            g.dec()
            if s is not None:
                s.dec()

        model = ex.model_label
        upstream = ex.upstream or "none"
        endpoint = ex.endpoint
        stream = "true" if ex.stream else "false"

        self.requests.get(model, upstream, endpoint, status_class(ex.status), stream).inc()
        unmetered = ex.unmetered
        if unmetered is not None:
            self.unmetered.get(unmetered).inc()

        duration = ex.duration_s
        if duration is not None:
            self.duration.get(model, upstream, endpoint, stream).observe(duration)
        ttfb = ex.ttfb_s
        if ttfb is not None:
            self.ttfb.get(model, upstream, endpoint, stream).observe(ttfb)
        ttft = ex.ttft_s
        if ttft is not None:
            self.ttft.get(model, upstream, endpoint, stream).observe(ttft)
        ttfc = ex.ttfc_s
        if ttfc is not None:
            self.ttfc.get(model, upstream, endpoint, stream).observe(ttfc)
        up_ttft = ex.upstream_ttft_s
        if up_ttft is not None:
            self.upstream_ttft.get(model, upstream).observe(up_ttft)
        if ex.gaps_ns:
            observe_ns_many(self.gaps.get(model, upstream), ex.gaps_ns)
        tpot = ex.tpot_s
        if tpot is not None:
            self.tpot.get(model, upstream).observe(tpot)
        # Overhead only means something for a request that was actually forwarded.
        if ex.t_upstream_sent_ns is not None:
            self.overhead.get(upstream, endpoint, stream).observe(ex.overhead_s)

        usage = ex.usage
        if usage is not None:
            cached = usage.cached_input_tokens
            written = usage.cache_write_tokens
            reasoning = usage.reasoning_tokens
            parts = (
                ("input", max(0, usage.input_tokens - cached - written), usage.input_source),
                ("cached_input", cached, usage.input_source),
                ("cache_write", written, usage.input_source),
                ("output", max(0, usage.output_tokens - reasoning), usage.output_source),
                ("reasoning", reasoning, usage.output_source),
            )
            for kind, n, source in parts:
                if n > 0:
                    self.tokens.get(model, upstream, kind, source).inc(n)

        if ex.cost is not None:
            self.cost.get(model, upstream, ex.key_name or "none").inc(float(ex.cost))
        if not ex.priced:
            self.unpriced.get(model, upstream).inc()

        if ex.outcome in _FAILED_UPSTREAM_OUTCOMES:
            self.upstream_errors.get(upstream, ex.error_type or ex.outcome).inc()

        replica = ex.replica
        if replica is not None:
            self.replica_requests.get(upstream, replica, ex.outcome or "none").inc()
        for failed in ex.replica_failures:
            self.replica_connect_failures.get(upstream, failed).inc()

        timings = ex.llamacpp_timings
        if timings:
            prompt_ms = timings.get("prompt_ms")
            if prompt_ms is not None:
                self.llamacpp_prompt_eval.get(upstream).observe(prompt_ms / 1000.0)
            tps = timings.get("predicted_per_second")
            if tps is not None and tps > 0:
                self.llamacpp_tps.get(upstream).observe(tps)
            for phase, seconds in llamacpp_phases(ex).items():
                self.llamacpp_phase.get(upstream, phase).observe(seconds)

    # Called from outside the hooks

    def count_observer_error(self, name: str) -> None:
        """Wire to `Observers.on_failure`; `name` is an observer class name (bounded)."""
        self.observer_errors.get(name).inc()

    def count_dropped_span(self) -> None:
        """Wire to `make_tracer_provider(on_drop=...)`. Called from the exporter's thread;
        prometheus_client values are thread-safe."""
        self.spans_dropped.inc()

    def set_llamacpp_context(self, upstream: str, n_ctx: int) -> None:
        self.llamacpp_context.get(upstream).set(n_ctx)

    def set_llamacpp_engine(self, upstream: str, values: dict[str, float], up: bool) -> None:
        """Wire to `proxy.engine_telemetry.scrape_llamacpp`: one scrape's values."""
        self.llamacpp_scrape_up.get(upstream).set(1 if up else 0)
        for name, value in values.items():
            gauge = self.llamacpp_engine.get(name)
            if gauge is not None:
                gauge.get(upstream).set(value)

    def replica_in_flight(self, upstream: str, replica: str, delta: int) -> None:
        """Wire to `proxy.upstream.ReplicaSet` (a ReplicaSink)."""
        self.replica_in_flight_gauge.get(upstream, replica).inc(delta)

    def replica_up(self, upstream: str, replica: str, up: bool) -> None:
        self.replica_up_gauge.get(upstream, replica).set(1 if up else 0)

"""`tollgate demo`'s data and report: the kinds of request it sends, what Tollgate measured
next to what the synthetic upstream did, and the tables it prints. Pure."""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from proxy.exchange import Exchange
from proxy.pricing import plain_usd

if TYPE_CHECKING:
    # Not at run time: the CLI imports the demo for every command (see proxy/demo.py).
    from proxy.synthetic_truth import Truth

CHAT_MODEL = "demo-model"
EMBEDDING_MODEL = "demo-embedding"
# USD per 1M tokens, written into the demo's YAML so cost is non-zero and checkable by hand.
PRICES: dict[str, tuple[Decimal, Decimal]] = {
    CHAT_MODEL: (Decimal("0.50"), Decimal("2.00")),
    EMBEDDING_MODEL: (Decimal("0.02"), Decimal("0.02")),
}
DEFAULT_METRICS_PORT = 9464
ONE_MILLION = Decimal(1_000_000)
FINISH_WAIT_S = 5.0  # the proxy finishes an exchange just after the client saw its last byte


@dataclass(frozen=True, slots=True)
class Kind:
    name: str
    endpoint: str  # chat.completions, completions, embeddings
    stream: bool
    client_usage: bool = False  # the client itself asks for stream usage


# The burst cycles through these; the first four already mix streams, bodies and embeddings.
KINDS: tuple[Kind, ...] = (
    Kind("chat stream", "chat.completions", True),
    Kind("chat", "chat.completions", False),
    Kind("completions stream", "completions", True),
    Kind("embeddings", "embeddings", False),
    Kind("chat stream +usage", "chat.completions", True, client_usage=True),
    Kind("completions", "completions", False),
)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    requests: int = 12
    ttft_ms: float = 100.0
    gap_ms: float = 10.0
    tokens: int = 16
    # One at a time by default: the SDK, the proxy and the synthetic upstream share one event
    # loop here, and requests in parallel would make each wait on the others' work, on both
    # the measured and the "true" side.
    concurrency: int = 1
    port: int = 0
    metrics_port: int = DEFAULT_METRICS_PORT
    keep_running: bool = False


@dataclass(slots=True)
class RequestResult:
    request_id: str
    kind: str
    endpoint: str
    stream: bool
    # Tollgate's measurements (from the Exchange the proxy finished)
    outcome: str | None
    ttft_s: float | None  # client-facing: first output relayed, since the request arrived
    first_output_s: float | None  # streams: upstream TTFT; bodies: upstream time to first byte
    gap_mean_s: float | None
    gap_count: int
    input_tokens: int | None
    output_tokens: int | None
    input_source: str | None
    output_source: str | None
    cost: Decimal | None
    overhead_s: float
    # The synthetic upstream's truth
    truth_first_output_s: float | None
    truth_gap_mean_s: float | None
    truth_gap_count: int
    truth_input_tokens: int
    truth_output_tokens: int
    expected_cost: Decimal
    first_token_lag_s: float | None  # proxy read the first token this long after it was written
    arrival_lag_s: float | None  # the upstream had the request this long after the proxy sent it
    client_text_ok: bool  # what the SDK received is exactly what the upstream generated

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = str(value) if isinstance(value, Decimal) else value
        return out


@dataclass(slots=True)
class DemoReport:
    options: DemoOptions
    proxy_base_url: str
    metrics_url: str
    summary_url: str
    models_listed: list[str]
    results: list[RequestResult]
    summary: dict[str, Any]
    log_line: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "options": {f.name: getattr(self.options, f.name) for f in fields(self.options)},
            "proxy_base_url": self.proxy_base_url,
            "metrics_url": self.metrics_url,
            "summary_url": self.summary_url,
            "models_listed": self.models_listed,
            "requests": [r.as_json() for r in self.results],
            "kinds": kind_rows(self.results),
            "summary": self.summary,
        }


def expected_cost(model: str, input_tokens: int, output_tokens: int) -> Decimal:
    """The hand computation: tokens times the demo's price per 1M."""
    inp, out = PRICES[model]
    return (input_tokens * inp + output_tokens * out) / ONE_MILLION


def compare(rid: str, kind: Kind, ex: Exchange | None, truth: Truth, client_text: str | None) -> RequestResult:
    model = EMBEDDING_MODEL if kind.endpoint == "embeddings" else CHAT_MODEL
    if kind.stream:
        truth_first = truth.ttft_s
        measured_first = ex.upstream_ttft_s if ex is not None else None
        lag = (
            (ex.t_first_token_ns - truth.token_times_ns[0]) / 1e9
            if ex is not None and ex.t_first_token_ns is not None and truth.token_times_ns
            else None
        )
    else:
        truth_first = truth.time_to_body_s
        measured_first = (
            (ex.t_first_byte_ns - ex.t_upstream_sent_ns) / 1e9
            if ex is not None and ex.t_first_byte_ns is not None and ex.t_upstream_sent_ns is not None
            else None
        )
        lag = (
            (ex.t_first_byte_ns - truth.t_body_ns) / 1e9
            if ex is not None and ex.t_first_byte_ns is not None and truth.t_body_ns is not None
            else None
        )
    usage = ex.usage if ex is not None else None
    gap_mean = ex.gap_stats_s()[0] if ex is not None else None
    arrival_lag = (
        (truth.t_received_ns - ex.t_upstream_sent_ns) / 1e9
        if ex is not None and ex.t_upstream_sent_ns is not None
        else None
    )
    return RequestResult(
        request_id=rid,
        kind=kind.name,
        endpoint=kind.endpoint,
        stream=kind.stream,
        outcome=ex.outcome if ex is not None else None,
        ttft_s=ex.ttft_s if ex is not None else None,
        first_output_s=measured_first,
        gap_mean_s=gap_mean,
        gap_count=len(ex.gaps_ns) if ex is not None else 0,
        input_tokens=usage.input_tokens if usage else None,
        output_tokens=usage.output_tokens if usage else None,
        input_source=usage.input_source if usage else None,
        output_source=usage.output_source if usage else None,
        cost=ex.cost if ex is not None else None,
        overhead_s=ex.overhead_s if ex is not None else 0.0,
        truth_first_output_s=truth_first,
        truth_gap_mean_s=truth.mean_gap_s,
        truth_gap_count=len(truth.gaps_s),
        truth_input_tokens=truth.prompt_tokens,
        truth_output_tokens=truth.completion_tokens,
        expected_cost=expected_cost(model, truth.prompt_tokens, truth.completion_tokens),
        first_token_lag_s=lag,
        arrival_lag_s=arrival_lag,
        client_text_ok=client_text == truth.text,
    )


# ----------------------------------------------------------------------------- output


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _max_abs_diff(pairs: list[tuple[float | None, float | None]]) -> float | None:
    diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    return max(diffs) if diffs else None


def kind_rows(results: list[RequestResult]) -> list[dict[str, Any]]:
    """Per kind, in the order first sent: means, worst differences, token and cost totals."""
    order: list[str] = []
    for r in results:
        if r.kind not in order:
            order.append(r.kind)
    rows = []
    for name in order:
        rs = [r for r in results if r.kind == name]
        # "upstream" when input and output agree on their source, else "input/output".
        sources = sorted(
            {(r.input_source or "none") if r.input_source == r.output_source else f"{r.input_source}/{r.output_source}" for r in rs}
        )
        rows.append(
            {
                "kind": name,
                "stream": rs[0].stream,
                "requests": len(rs),
                "ok": sum(r.outcome == "ok" for r in rs),
                "ttft_s": _mean([r.ttft_s for r in rs if r.ttft_s is not None]),
                "first_output_s": _mean([r.first_output_s for r in rs if r.first_output_s is not None]),
                "truth_first_output_s": _mean([r.truth_first_output_s for r in rs if r.truth_first_output_s is not None]),
                "first_output_max_error_s": _max_abs_diff([(r.first_output_s, r.truth_first_output_s) for r in rs]),
                "gap_mean_s": _mean([r.gap_mean_s for r in rs if r.gap_mean_s is not None]),
                "truth_gap_mean_s": _mean([r.truth_gap_mean_s for r in rs if r.truth_gap_mean_s is not None]),
                "gap_max_error_s": _max_abs_diff([(r.gap_mean_s, r.truth_gap_mean_s) for r in rs]),
                "input_tokens": sum(r.input_tokens or 0 for r in rs),
                "output_tokens": sum(r.output_tokens or 0 for r in rs),
                "token_sources": sources,
                "truth_input_tokens": sum(r.truth_input_tokens for r in rs),
                "truth_output_tokens": sum(r.truth_output_tokens for r in rs),
                "cost_usd": plain_usd(sum((r.cost or Decimal(0) for r in rs), Decimal(0))),
                "expected_cost_usd": plain_usd(sum((r.expected_cost for r in rs), Decimal(0))),
                "client_text_ok": all(r.client_text_ok for r in rs),
            }
        )
    return rows


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 1000:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]]


def render(report: DemoReport) -> str:
    o = report.options
    rows = kind_rows(report.results)
    n_ok = sum(r.outcome == "ok" for r in report.results)
    out = [
        "",
        f"Tollgate demo: {len(report.results)} requests (official openai SDK -> Tollgate -> synthetic upstream), "
        f"{n_ok} ok",
        f"Synthetic upstream: TTFT {o.ttft_ms:g} ms, {o.gap_ms:g} ms between tokens, {o.tokens} tokens per completion; "
        "truth = when it actually wrote each chunk.",
        "",
    ]
    header = [
        "kind", "n", "TTFT", "upstream TTFT*", "truth", "max err",
        "gap mean", "truth", "max err", "tokens in/out (source)", "truth", "cost USD",
    ]  # fmt: skip
    table_rows = []
    for row in rows:
        sources = ",".join(row["token_sources"])
        table_rows.append(
            [
                row["kind"],
                str(row["requests"]),
                _ms(row["ttft_s"]),
                _ms(row["first_output_s"]),
                _ms(row["truth_first_output_s"]),
                _ms(row["first_output_max_error_s"], 2),
                _ms(row["gap_mean_s"], 2),
                _ms(row["truth_gap_mean_s"], 2),
                _ms(row["gap_max_error_s"], 3),
                f"{row['input_tokens']}/{row['output_tokens']} ({sources})",
                f"{row['truth_input_tokens']}/{row['truth_output_tokens']}",
                f"{Decimal(row['cost_usd']):f}",
            ]
        )
    out += _table(header, table_rows, right={1, 2, 3, 4, 5, 6, 7, 8, 11})
    total_cost = sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0))
    expected = sum((Decimal(r["expected_cost_usd"]) for r in rows), Decimal(0))
    lags = [r.first_token_lag_s for r in report.results if r.first_token_lag_s is not None]
    overheads = [r.overhead_s for r in report.results]
    text_ok = all(r.client_text_ok for r in report.results)
    out += [
        "",
        "Times in ms, means per kind. TTFT: first output relayed, from the moment Tollgate had the request.",
        "* upstream TTFT: from the moment Tollgate sent the request upstream (non-streaming rows: time to the",
        "  first byte of the body); truth: from the moment the upstream received it to when it wrote that chunk.",
        "max err = the request's trip to the upstream + Tollgate reading a chunk after it was written;",
        f"  the reading alone was at most {_ms(max(lags) if lags else None, 2)} ms. "
        f"Tollgate's own overhead per request: {_ms(_mean(overheads), 2)} ms mean.",
        f"Cost {total_cost:f} USD (by hand at the demo's prices: {expected:f}); "
        f"the SDK received exactly the generated text: {'yes' if text_ok else 'NO'}.",
        "Prices (USD per 1M tokens, input/output): "
        + ", ".join(f"{m} {i}/{p}" for m, (i, p) in PRICES.items()),
        "",
        f"Models listed through Tollgate:  {', '.join(report.models_listed)}",
        f"Prometheus metrics:              {report.metrics_url}",
        f"Summary (JSON):                  {report.summary_url}",
        f"   -> {report.summary.get('requests')} requests, {report.summary.get('errors')} errors, "
        f"cost {report.summary.get('cost_usd')} USD since start",
    ]
    if report.log_line:
        out += ["One JSON log line per request, e.g.:", "  " + report.log_line]
    out += [
        "",
        "Point a real app at Tollgate:",
        "  tollgate serve --config config/tollgate.yaml      # proxy on :8080, metrics on :9464",
        "  export OPENAI_BASE_URL=http://127.0.0.1:8080/v1   # then run your app unchanged",
        "  scrape http://127.0.0.1:9464/metrics with Prometheus (see README for every metric)",
        "",
    ]
    return "\n".join(out)

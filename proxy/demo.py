"""`tollgate demo`: the whole product in a few seconds, with no key and no network.

Starts a synthetic upstream (proxy/synthetic.py: known tokens, known timing) and Tollgate in
front of it, in this process; sends a short burst of mixed streaming and non-streaming
requests through the official openai SDK; then prints, per kind of request, what Tollgate
measured next to what the synthetic upstream actually did, plus where to scrape.

Measured values come from the proxy itself (an extra observer handed to make_app, and
GET /v1/tollgate/summary), never from client-side timing. Truth values are the synthetic
upstream's own write timestamps on the same perf_counter_ns clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import signal
import os
import socket
import tempfile
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from proxy.exchange import Exchange
from proxy.pricing import plain_usd
from proxy.settings import Settings, parse_settings

if TYPE_CHECKING:
    from proxy.synthetic import SyntheticUpstream, Truth

# The CLI imports this module to build its parser for every command, so what only the demo
# itself needs (the app, the synthetic upstream and its tokenizer, the openai SDK) is
# imported inside the functions that use it.

log = logging.getLogger("tollgate.demo")

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


class Recorder:
    """An extra observer: keeps each finished Exchange by request id."""

    def __init__(self) -> None:
        self.finished: dict[str, Exchange] = {}
        self._changed = asyncio.Event()

    def on_start(self, ex: Exchange) -> None:
        return None

    def on_first_token(self, ex: Exchange) -> None:
        return None

    def on_finish(self, ex: Exchange) -> None:
        self.finished[ex.request_id] = ex
        self._changed.set()

    async def wait_for(self, request_ids: list[str], timeout: float) -> None:
        async def all_in() -> None:
            while not all(rid in self.finished for rid in request_ids):
                self._changed.clear()
                await self._changed.wait()

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in(), timeout)


# ----------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = DemoOptions()
    parser.add_argument("--requests", type=_positive_int, default=d.requests, help=f"requests to send (default {d.requests})")
    parser.add_argument("--ttft-ms", type=_non_negative_float, default=d.ttft_ms, help=f"synthetic time to first token (default {d.ttft_ms:g})")
    parser.add_argument("--gap-ms", type=_non_negative_float, default=d.gap_ms, help=f"synthetic gap between tokens (default {d.gap_ms:g})")
    parser.add_argument("--tokens", type=_positive_int, default=d.tokens, help=f"tokens per completion (default {d.tokens})")
    parser.add_argument("--concurrency", type=_positive_int, default=d.concurrency, help=f"requests in flight at once (default {d.concurrency}; more adds event-loop noise to every timing)")
    parser.add_argument("--port", type=_port, default=d.port, help="proxy port (default: any free port)")
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=d.metrics_port,
        help=f"Prometheus port (default {d.metrics_port}; a free port if that one is taken)",
    )
    parser.add_argument("--keep-running", action="store_true", help="stay up afterwards so you can curl /metrics; Ctrl-C to stop")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} must be a port (0 = any free port)")
    return value


def run(args: argparse.Namespace) -> int:
    options = DemoOptions(
        requests=args.requests,
        ttft_ms=args.ttft_ms,
        gap_ms=args.gap_ms,
        tokens=args.tokens,
        concurrency=args.concurrency,
        port=args.port,
        metrics_port=args.metrics_port,
        keep_running=args.keep_running,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    as_json: bool = args.json

    async def show(report: DemoReport) -> None:
        if as_json:
            sys.stdout.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            sys.stdout.write(render(report))
        sys.stdout.flush()
        if options.keep_running:
            await wait_for_signal(report)

    try:
        report = asyncio.run(run_demo(options, on_report=show))
    except OSError as exc:
        print(f"tollgate demo: {exc}", file=sys.stderr)
        return 1
    return 0 if all(r.outcome == "ok" for r in report.results) else 1


async def wait_for_signal(report: DemoReport) -> None:
    print(
        f"\nStill running. Try:  curl {report.metrics_url}\n"
        f"                     curl {report.summary_url}\n"
        "Ctrl-C to stop.",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


# ----------------------------------------------------------------------------- the run


def demo_yaml(upstream_base: str, port: int, metrics_port: int, ledger_path: str) -> str:
    prices = "\n".join(
        f"    {model}: {{input: {inp}, output: {out}}}" for model, (inp, out) in PRICES.items()
    )
    return f"""
server:
  host: 127.0.0.1
  port: {port}
upstreams:
  synthetic:
    kind: openai
    base_url: {upstream_base}
    api_key: sk-synthetic-not-a-real-key
routes:
  - models: ["{CHAT_MODEL}", "{EMBEDDING_MODEL}"]
    upstream: synthetic
pricing:
  models:
{prices}
metrics:
  host: 127.0.0.1
  port: {metrics_port}
logging:
  level: warning
ledger:
  path: {ledger_path}
"""


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def start_proxy(
    upstream_base: str, options: DemoOptions, recorder: Recorder, access_log: io.BytesIO
) -> tuple[web.AppRunner, web.Application]:
    """Tollgate on 127.0.0.1, metrics on the preferred port or, if that is taken, any free one."""
    from proxy.app import make_app

    metrics_ports = [options.metrics_port]
    if options.metrics_port != 0:
        if not port_is_free("127.0.0.1", options.metrics_port):
            metrics_ports = []
        metrics_ports.append(0)
    last_error: OSError | None = None
    # The demo's spend is not real spend: keep its ledger out of ./data.
    ledger_path = os.path.join(tempfile.mkdtemp(prefix="tollgate-demo-"), "ledger.db")
    for metrics_port in metrics_ports:
        settings: Settings = parse_settings(
            demo_yaml(upstream_base, options.port, metrics_port, ledger_path), env={}, source="<demo>"
        )
        app = make_app(settings, access_log=access_log, extra_observers=[recorder])
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        try:
            await runner.setup()  # starts the metrics port too
            site = web.TCPSite(runner, settings.server.host, settings.server.port)
            await site.start()
        except OSError as exc:
            # Lost a race for the metrics port (or --port is taken): try the next choice.
            await runner.cleanup()
            last_error = exc
            continue
        return runner, app
    assert last_error is not None
    raise last_error


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("not listening on a TCP socket")


async def run_demo(
    options: DemoOptions,
    on_report: Callable[[DemoReport], Awaitable[None]] | None = None,
) -> DemoReport:
    """Start everything, send the burst, gather the report; `on_report` runs while it is all up."""
    from proxy.app import METRICS_RUNNER

    from proxy.synthetic import SyntheticUpstream

    recorder = Recorder()
    access_log = io.BytesIO()
    upstream = SyntheticUpstream(
        ttft_s=options.ttft_ms / 1000,
        gap_s=options.gap_ms / 1000,
        tokens=options.tokens,
        models=(CHAT_MODEL, EMBEDDING_MODEL),
    )
    async with upstream as synthetic:
        runner, app = await start_proxy(synthetic.base_url, options, recorder, access_log)
        try:
            root = f"http://127.0.0.1:{_bound_port(runner)}"
            metrics_url = f"http://127.0.0.1:{_bound_port(app[METRICS_RUNNER])}/metrics"
            report = await burst(root, metrics_url, options, recorder, synthetic)
            lines = [line for line in access_log.getvalue().splitlines() if line]
            report.log_line = lines[0].decode() if lines else None
            if on_report is not None:
                await on_report(report)
        finally:
            await runner.cleanup()
    return report


async def burst(
    root: str, metrics_url: str, options: DemoOptions, recorder: Recorder, synthetic: SyntheticUpstream
) -> DemoReport:
    from openai import APIError, AsyncOpenAI

    client = AsyncOpenAI(base_url=root + "/v1", api_key="sk-demo-no-key-needed", max_retries=0, timeout=60)
    try:
        models = [m.id async for m in client.models.list()]
        plan = [(f"demo-{i:03d}", KINDS[i % len(KINDS)], i) for i in range(options.requests)]
        gate = asyncio.Semaphore(options.concurrency)

        async def one(rid: str, kind: Kind, i: int) -> str | None:
            async with gate:
                try:
                    return await send(client, rid, kind, i)
                except APIError as exc:
                    # Shown in the table as a failed request rather than ending the demo.
                    log.warning("request %s (%s) failed: %s", rid, kind.name, exc)
                    return None

        texts = await asyncio.gather(*(one(rid, kind, i) for rid, kind, i in plan))
    finally:
        await client.close()
    await recorder.wait_for([rid for rid, _, _ in plan], FINISH_WAIT_S)
    await synthetic.wait_done([rid for rid, _, _ in plan], FINISH_WAIT_S)
    results = []
    for (rid, kind, _), text in zip(plan, texts, strict=True):
        truth = synthetic.truth_for(rid)
        if truth is None:
            raise RuntimeError(f"the synthetic upstream never saw request {rid}")
        results.append(compare(rid, kind, recorder.finished.get(rid), truth, text))
    summary_url = root + "/v1/tollgate/summary"
    async with aiohttp.ClientSession() as session, session.get(summary_url) as resp:
        summary = await resp.json()
    return DemoReport(
        options=options,
        proxy_base_url=root + "/v1",
        metrics_url=metrics_url,
        summary_url=summary_url,
        models_listed=models,
        results=results,
        summary=summary,
        log_line=None,
    )


def _prompt(i: int) -> str:
    return f"Request {i}: describe a quiet morning by the river in a few words."


async def send(client: Any, rid: str, kind: Kind, i: int) -> str:
    """One request through the SDK; returns the output text the client received."""
    headers = {"x-request-id": rid}
    if kind.endpoint == "embeddings":
        await client.embeddings.create(model=EMBEDDING_MODEL, input=_prompt(i), extra_headers=headers)
        return ""
    if kind.endpoint == "chat.completions":
        messages = [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": _prompt(i)},
        ]
        if not kind.stream:
            chat = await client.chat.completions.create(model=CHAT_MODEL, messages=messages, extra_headers=headers)
            return chat.choices[0].message.content or ""
        extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if kind.client_usage else {}
        stream = await client.chat.completions.create(
            model=CHAT_MODEL, messages=messages, stream=True, extra_headers=headers, **extra
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return "".join(parts)
    if not kind.stream:
        done = await client.completions.create(model=CHAT_MODEL, prompt=_prompt(i), extra_headers=headers)
        return done.choices[0].text
    stream = await client.completions.create(model=CHAT_MODEL, prompt=_prompt(i), stream=True, extra_headers=headers)
    return "".join([c.choices[0].text async for c in stream if c.choices])


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
        f"Prices (USD per 1M tokens, input/output): "
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

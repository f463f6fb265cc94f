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
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web

from proxy.config_file import parse_settings
from proxy.demo_report import (
    CHAT_MODEL,
    EMBEDDING_MODEL,
    FINISH_WAIT_S,
    KINDS,
    PRICES,
    DemoOptions,
    DemoReport,
    Kind,
    compare,
    render,
)
from proxy.exchange import Exchange
from proxy.settings import Settings

if TYPE_CHECKING:
    from proxy.synthetic import SyntheticUpstream

# The CLI imports this module to build its parser for every command, so what only the demo
# itself needs (the app, the synthetic upstream and its tokenizer, the openai SDK) is
# imported inside the functions that use it.

log = logging.getLogger("tollgate.demo")

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
        return str(done.choices[0].text)
    stream = await client.completions.create(model=CHAT_MODEL, prompt=_prompt(i), stream=True, extra_headers=headers)
    return "".join([c.choices[0].text async for c in stream if c.choices])

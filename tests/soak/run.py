"""A bounded soak: steady mixed traffic through a `tollgate serve` process, with injected
faults, watching for leaks and checking the ledger to the nano-dollar.

    python -m tests.soak.run --minutes 10            # the documented run
    python -m tests.soak.run --minutes 0.5 --json    # what tests/integration/test_soak_short.py runs

Traffic, at `--rate` requests a second, in a fixed cycle of 20 slots:
  9 streams (SSE, usage from upstream), 4 plain completions and 1 with a gzip-compressed
  request body, 2 upstream 500s and 1 upstream 429 with retry-after (injected upstream
  errors), 2 clients that hang up mid-stream and 1 that hangs up while the upstream is still
  thinking (injected client faults).
Every `--burst-every` seconds: a pause in traffic longer than the proxy's idle timeout (pooled
upstream connections sit idle past it; no request may then get a 504 for that time), then a
burst of `--burst-streams` concurrent `--burst-mb` MB streams; the proxy's RSS before the
burst and once it is over must agree within 10%.
Every `--sample` seconds: the proxy's RSS (/proc/<pid>/status VmRSS), open descriptors
(/proc/<pid>/fd) and event-loop tasks (the tollgate_event_loop_tasks gauge).
At the end: errors beyond the injected ones (client side: any status or exception a slot
did not ask for; proxy side: any access-log outcome but ok/upstream_error/client_gone), and
reconciliation: the budget bucket's spent == the spend log's sum == the sum of the access
log's per-request costs (each rounded to nano-USD as the ledger stores it).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from proxy.spend.budgets import spend_nanos
from tests.integration.faults_common import (
    ServerProcess,
    server_yaml,
    start_server_process,
)
from tests.support.fake_upstream import RecordedRequest, Reply
from tests.support.tollgate_process import UpstreamThread

SSE = (("Content-Type", "text/event-stream"),)
USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}
CYCLE = (
    "stream", "plain", "stream", "stream", "upstream_500", "stream", "gzip_plain", "gone_mid_stream",
    "stream", "plain", "stream", "upstream_429", "stream", "plain", "gone_thinking", "stream",
    "upstream_500", "plain", "gone_mid_stream", "stream",
)
EXPECTED_STATUS = {"stream": 200, "plain": 200, "gzip_plain": 200, "upstream_500": 500, "upstream_429": 429}
# The proxy's idle timeout in the soak: the pause before each burst outlasts it.
IDLE_TIMEOUT_S = 2.0
BIG_CHUNK_BYTES = 1 << 17
# RSS once a burst is over may exceed RSS before it by this fraction at most.
BURST_RSS_SLACK = 0.10
OK_OUTCOMES = {"ok", "upstream_error", "client_gone"}
BUDGET = """
budgets:
  - name: soak-total
    period: total
    limit_usd: 1000000
"""


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _stream_reply(words: int, gap: float, first: float = 0.0) -> Reply:
    chunks = [_event({"id": "s", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}) for i in range(words)]
    chunks += [_event({"id": "s", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}), b"data: [DONE]\n\n"]
    return Reply(headers=SSE, chunks=chunks, delays=[first] + [gap] * (len(chunks) - 1))


_BIG: dict[int, list[bytes]] = {}


def _big_stream(mb: int) -> Reply:
    """An `mb` MB stream of content events in 128 KiB reads, built once per size."""
    if mb not in _BIG:
        event = _event({"id": "b", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "big " * 50}}]})
        piece = event * (BIG_CHUNK_BYTES // len(event))
        _BIG[mb] = [piece] * (mb * (1 << 20) // len(piece))
    chunks = [*_BIG[mb], _event({"id": "b", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}), b"data: [DONE]\n\n"]
    return Reply(headers=SSE, chunks=chunks)


def upstream_reply(request: RecordedRequest) -> Reply:
    fault = request.headers.get("x-soak-fault", "")
    if fault.startswith("big:"):
        return _big_stream(int(fault[4:]))
    if fault == "500":
        return Reply.json({"error": {"message": "injected", "type": "server_error", "param": None, "code": None}}, status=500)
    if fault == "429":
        return Reply.json(
            {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
            status=429,
            headers=[("retry-after", "1")],
        )
    if fault == "thinking":
        return _stream_reply(4, 0.01, first=2.0)
    if isinstance(request.json, dict) and request.json.get("stream"):
        return _stream_reply(12, 0.01 if fault != "long" else 0.1)
    return Reply.json({"id": "p", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}], "usage": USAGE})


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    tasks: int


@dataclass
class Report:
    minutes: float
    rate: float
    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    ledger_spent_nanos: int = 0
    spend_log_nanos: int = 0
    access_log_nanos: int = 0
    spend_rows: int = 0
    access_lines: int = 0
    exit_code: int | None = None
    bursts: list[dict[str, float]] = field(default_factory=list)

    @property
    def reconciled(self) -> bool:
        return (
            self.ledger_spent_nanos == self.spend_log_nanos == self.access_log_nanos
            and self.spend_rows == self.access_lines == self.requests
        )

    def steady(self) -> tuple[Sample, Sample]:
        """Start and end of the steady state: medians of the samples in the second tenth and
        the last tenth of the run (the first tenth is warm-up: pools, tokenizer caches)."""
        n = len(self.samples)
        k = max(1, n // 10)
        head = self.samples[k : 2 * k] or self.samples[:1]
        tail = self.samples[-k:]

        def med(xs: list[Sample]) -> Sample:
            return Sample(
                xs[-1].t,
                int(statistics.median(s.rss_kib for s in xs)),
                int(statistics.median(s.fds for s in xs)),
                int(statistics.median(s.tasks for s in xs)),
            )

        return med(head), med(tail)

    def summary(self) -> dict[str, Any]:
        first, last = self.samples[0], self.samples[-1]
        start, end = self.steady()
        return {
            "minutes": self.minutes,
            "rate": self.rate,
            "requests": self.requests,
            "by_kind": self.by_kind,
            "outcomes": self.outcomes,
            "unexpected_errors": len(self.unexpected),
            "unexpected_examples": self.unexpected[:10],
            "rss_mib": {"first": first.rss_kib / 1024, "steady_start": start.rss_kib / 1024, "steady_end": end.rss_kib / 1024, "last": last.rss_kib / 1024, "max": max(s.rss_kib for s in self.samples) / 1024},
            "fds": {"first": first.fds, "steady_start": start.fds, "steady_end": end.fds, "last": last.fds, "max": max(s.fds for s in self.samples)},
            "tasks": {"first": first.tasks, "steady_start": start.tasks, "steady_end": end.tasks, "last": last.tasks, "max": max(s.tasks for s in self.samples)},
            "ledger": {
                "bucket_spent_usd": str(Decimal(self.ledger_spent_nanos) / Decimal(10**9)),
                "spend_log_usd": str(Decimal(self.spend_log_nanos) / Decimal(10**9)),
                "access_log_usd": str(Decimal(self.access_log_nanos) / Decimal(10**9)),
                "spend_rows": self.spend_rows,
                "access_lines": self.access_lines,
                "reconciled": self.reconciled,
            },
            "exit_code": self.exit_code,
            "bursts": self.bursts,
            "samples": [asdict(s) for s in self.samples],
        }


async def one_request(session: aiohttp.ClientSession, url: str, kind: str, report: Report) -> None:
    stream = kind in ("stream", "gone_mid_stream", "gone_thinking")
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "soak " + kind}], "stream": stream})
    headers = {"Content-Type": "application/json"}
    if kind == "gzip_plain":
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    fault = {"upstream_500": "500", "upstream_429": "429", "gone_thinking": "thinking", "gone_mid_stream": "long"}.get(kind)
    if fault:
        headers["x-soak-fault"] = fault
    try:
        if kind == "gone_thinking":
            task = asyncio.ensure_future(session.post(url, data=body, headers=headers))
            await asyncio.sleep(0.3)
            task.cancel()
            try:
                resp = await task
                resp.close()  # the upstream answered first after all: hang up now
            except asyncio.CancelledError:
                pass
            return
        async with session.post(url, data=body, headers=headers) as resp:
            if kind == "gone_mid_stream":
                if resp.status != 200:
                    report.unexpected.append(f"{kind}: status {resp.status}")
                    return
                await resp.content.readany()
                resp.close()
                return
            data = await resp.read()
            if resp.status != EXPECTED_STATUS[kind]:
                report.unexpected.append(f"{kind}: status {resp.status} {data[:200]!r}")
            elif kind == "stream" and not data.endswith(b"data: [DONE]\n\n"):
                report.unexpected.append(f"{kind}: stream not closed properly")
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, counted
        report.unexpected.append(f"{kind}: {type(exc).__name__}: {exc}")


async def big_stream(session: aiohttp.ClientSession, url: str, mb: int, report: Report) -> None:
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "soak big"}], "stream": True})
    headers = {"Content-Type": "application/json", "x-soak-fault": f"big:{mb}"}
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            size, last = 0, b""
            async for piece in resp.content.iter_any():
                size += len(piece)
                last = (last + piece)[-64:]
            if resp.status != 200 or size < mb * (1 << 20) * 0.9 or not last.endswith(b"data: [DONE]\n\n"):
                report.unexpected.append(f"big stream: status {resp.status}, {size} bytes, ends {last[-20:]!r}")
    except Exception as exc:  # noqa: BLE001 - every failure is a finding, counted
        report.unexpected.append(f"big stream: {type(exc).__name__}: {exc}")


async def burst(
    session: aiohttp.ClientSession, server: ServerProcess, url: str, streams: int, mb: int, report: Report
) -> None:
    """Idle past the idle timeout, then `streams` concurrent big streams; RSS around it."""
    await asyncio.sleep(IDLE_TIMEOUT_S * 1.25)
    before = server.rss_kib()
    await asyncio.gather(*(big_stream(session, url, mb, report) for _ in range(streams)))
    await asyncio.sleep(2.0)  # settlements written, buffers released
    after = server.rss_kib()
    report.bursts.append({"rss_before_mib": before / 1024, "rss_after_mib": after / 1024})
    if after > before * (1 + BURST_RSS_SLACK):
        report.unexpected.append(f"burst: RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after")


async def tasks_gauge(session: aiohttp.ClientSession, server: ServerProcess) -> int:
    async with session.get(server.metrics_url) as r:
        for line in (await r.text()).splitlines():
            if line.startswith("tollgate_event_loop_tasks "):
                return int(float(line.split()[1]))
    return -1


async def soak(
    minutes: float, rate: float, sample_every: float, workdir: Path, *, log: bool = True,
    burst_every: float = 60.0, burst_streams: int = 2, burst_mb: int = 50,
) -> Report:
    report = Report(minutes=minutes, rate=rate)
    ledger = workdir / "ledger.db"
    with UpstreamThread() as upstream:
        upstream.route("POST", "/v1/chat/completions", upstream_reply)
        config = workdir / "tollgate.yaml"
        config.write_text(server_yaml(upstream.api_base, ledger, BUDGET, idle=IDLE_TIMEOUT_S))
        server = await start_server_process(config, workdir)
        try:
            url = server.base_url + "/chat/completions"
            in_flight: set[asyncio.Task[None]] = set()
            kinds: Counter[str] = Counter()
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session, aiohttp.ClientSession() as probe:
                t0 = time.monotonic()
                end = t0 + minutes * 60
                next_sample = t0
                next_burst = t0 + burst_every
                i = 0
                while True:
                    now = time.monotonic()
                    if now >= next_burst and now < end:
                        if in_flight:
                            await asyncio.wait(in_flight, timeout=30)
                        await burst(session, server, url, burst_streams, burst_mb, report)
                        kinds["big_stream"] += burst_streams
                        paused = time.monotonic() - now
                        t0 += paused  # pace on from here, without a catch-up rush
                        end += paused
                        next_sample += paused
                        next_burst = time.monotonic() + burst_every
                        if log:
                            b = report.bursts[-1]
                            print(f"burst: rss {b['rss_before_mib']:.1f} -> {b['rss_after_mib']:.1f} MiB", file=sys.stderr)
                        continue
                    if now >= next_sample:
                        report.samples.append(Sample(now - t0, server.rss_kib(), server.fds(), await tasks_gauge(probe, server)))
                        next_sample += sample_every
                        if log:
                            s = report.samples[-1]
                            print(f"[{s.t:7.1f}s] requests={i} rss={s.rss_kib / 1024:.1f}MiB fds={s.fds} tasks={s.tasks} unexpected={len(report.unexpected)}", file=sys.stderr)
                    if now >= end:
                        break
                    kind = CYCLE[i % len(CYCLE)]
                    kinds[kind] += 1
                    task = asyncio.ensure_future(one_request(session, url, kind, report))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    i += 1
                    await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
                if in_flight:
                    await asyncio.wait(in_flight, timeout=30)
                # Let settlements and the gauges catch up, then the last sample.
                await asyncio.sleep(3.0)
                report.samples.append(Sample(time.monotonic() - t0, server.rss_kib(), server.fds(), await tasks_gauge(probe, server)))
            report.requests = i + kinds["big_stream"]
            report.by_kind = dict(kinds)
            report.exit_code = await asyncio.to_thread(server.stop, 60)
        finally:
            server.kill()
    lines = server.access_log()
    report.access_lines = len(lines)
    report.outcomes = dict(Counter(str(r["outcome"]) for r in lines))
    for r in lines:
        if r["outcome"] not in OK_OUTCOMES:
            report.unexpected.append(f"proxy: outcome {r['outcome']} ({r['error_type']}) for {r['request_id']}")
        if r["cost_usd"] is not None:
            report.access_log_nanos += spend_nanos(Decimal(r["cost_usd"]))
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        report.spend_log_nanos, report.spend_rows = conn.execute("SELECT COALESCE(SUM(cost_nanos), 0), COUNT(*) FROM spend_log").fetchone()
        (report.ledger_spent_nanos,) = conn.execute("SELECT COALESCE(SUM(spent_nanos), 0) FROM buckets").fetchone()
        (reserved,) = conn.execute("SELECT COUNT(*) FROM reservations").fetchone()
        if reserved:
            report.unexpected.append(f"ledger: {reserved} reservations left after shutdown")
    finally:
        conn.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--burst-every", type=float, default=60.0, help="seconds between bursts of big streams")
    parser.add_argument("--burst-streams", type=int, default=2, help="concurrent big streams per burst")
    parser.add_argument("--burst-mb", type=int, default=50, help="size of each big stream in MB")
    parser.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tollgate-soak-") as tmp:
        report = asyncio.run(soak(
            args.minutes, args.rate, args.sample, Path(tmp),
            burst_every=args.burst_every, burst_streams=args.burst_streams, burst_mb=args.burst_mb,
        ))
    summary = report.summary()
    if args.json:
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        summary.pop("samples")
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    ok = not report.unexpected and report.reconciled and report.exit_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

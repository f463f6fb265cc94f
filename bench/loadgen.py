"""An async load generator: fixed concurrency, bounded by a request count and by time.

Each of `concurrency` workers sends requests back to back on a pooled keep-alive session
until `max_requests` have been started or `max_seconds` have passed; requests in flight at the
deadline finish (bounded by the per-request timeout). Streams are timed per read: TTFT is the
first read holding a content delta (the role-only first chunk does not count), chunk gaps are
the times between successive reads.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

# A content delta; the role-only first chunk has `"delta":{"role":...}` and does not match.
_CONTENT = b'"delta":{"content":"'
_MAX_SAMPLES = 200_000
# The bearer token of every request (LiteLLM's master key in the bench).
CLIENT_KEY = "sk-bench-client"


def has_content_delta(piece: bytes) -> bool:
    return _CONTENT in piece


def request_body(stream: bool, model: str = "gpt-4o-mini", max_tokens: int = 256) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Explain in one paragraph what a reverse proxy does."},
            ],
            "max_tokens": max_tokens,
            "stream": stream,
        }
    )


@dataclass
class LoadResult:
    completed: int = 0
    errors: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "completed": self.completed,
            "errors": self.errors,
            "elapsed_s": round(self.elapsed_s, 3),
            "rps": round(self.rps, 1),
            "latency_p50_ms": percentile(self.latencies_ms, 50),
            "latency_p99_ms": percentile(self.latencies_ms, 99),
            "ttft_p50_ms": percentile(self.ttft_ms, 50),
            "ttft_p99_ms": percentile(self.ttft_ms, 99),
            "gap_p50_ms": percentile(self.gaps_ms, 50),
            "gap_p99_ms": percentile(self.gaps_ms, 99),
            "error_samples": self.error_samples[:3],
        }


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    # Inclusive method: p50 of an odd-length list is its median, p99 never exceeds the max.
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1] if p < 100 else max(values)


async def run_load(
    url: str,
    *,
    stream: bool,
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    timeout_s: float = 60.0,
    body: bytes | None = None,
) -> LoadResult:
    payload = body if body is not None else request_body(stream)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
    result = LoadResult()
    started = 0
    perf = time.perf_counter

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        t_start = perf()
        deadline = t_start + max_seconds

        async def one() -> None:
            t0 = perf()
            ttft: float | None = None
            last: float | None = None
            gaps: list[float] = []
            async with session.post(url, data=payload, headers=headers) as resp:
                if stream:
                    async for piece in resp.content.iter_any():
                        now = perf()
                        if last is not None:
                            gaps.append((now - last) * 1000)
                        last = now
                        if ttft is None and has_content_delta(piece):
                            ttft = (now - t0) * 1000
                else:
                    await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
            if stream and ttft is None:
                raise RuntimeError("stream carried no content")
            result.latencies_ms.append((perf() - t0) * 1000)
            if ttft is not None:
                result.ttft_ms.append(ttft)
            if len(result.gaps_ms) < _MAX_SAMPLES:
                result.gaps_ms.extend(gaps)
            result.completed += 1

        async def worker() -> None:
            nonlocal started
            while started < max_requests and perf() < deadline:
                started += 1
                try:
                    await one()
                except Exception as exc:  # noqa: BLE001 - counted and sampled, the run goes on
                    result.errors += 1
                    if len(result.error_samples) < 10:
                        result.error_samples.append(f"{type(exc).__name__}: {exc}"[:200])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.elapsed_s = perf() - t_start
    return result

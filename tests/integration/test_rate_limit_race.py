"""300 requests at once against three limits, across processes: (a) two worker processes of
`tollgate serve --workers 2` on one SQLite ledger file, (b) two `tollgate serve` instances
on one Redis.

The requests are split over three models, each under one limit: `gpt-rpm` 12 requests per
minute, `gpt-tpm` 10 worst cases' worth of tokens per minute, `gpt-flight` 7 in flight. The
upstream holds every admitted request open until all 300 have been admitted or refused,
so nothing finishes mid-race: only the atomic acquire on the shared store stands between
100 requests and each limit. A per-minute limit admits its burst at once and then refills,
so over a race of E seconds it may admit at most burst + E x rate (and at least the burst).
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from proxy.estimate import estimate_prompt_tokens
from proxy.spend.admission import INPUT_MARGIN, INPUT_MARGIN_TOKENS
from tests.integration.budget_common import CAP, capped_reply, serve_config
from tests.support.redis_server import RedisServer
from tests.support.tollgate_process import Tollgate, UpstreamThread, start_tollgate

REQUESTS = 300
MODELS = ("gpt-rpm", "gpt-tpm", "gpt-flight")
RPM, IN_FLIGHT, TPM_REQUESTS = 12, 7, 10
RACE_TIMEOUT_S = 60.0
MESSAGES = [{"role": "user", "content": "Hello!"}]


def body(model: str) -> dict[str, object]:
    return {"model": model, "messages": MESSAGES, "max_tokens": CAP}


def tpm_cost() -> int:
    """The worst case one gpt-tpm request is charged."""
    prompt = estimate_prompt_tokens("chat.completions", body("gpt-tpm"), "gpt-tpm")
    return math.ceil(prompt * INPUT_MARGIN) + INPUT_MARGIN_TOKENS + CAP


def config(upstream: str, ledger: str) -> str:
    return serve_config(upstream, f"""limits:
  - name: rpm
    scope: {{model: gpt-rpm}}
    requests_per_minute: {RPM}
  - name: tpm
    scope: {{model: gpt-tpm}}
    tokens_per_minute: {TPM_REQUESTS * tpm_cost()}
  - name: flight
    scope: {{model: gpt-flight}}
    max_in_flight: {IN_FLIGHT}
{ledger}""", wait_s=90)


async def race(upstream: UpstreamThread, urls: Sequence[str]) -> tuple[dict[str, list[int]], float]:
    """Fire all requests at once (models and proxies alternating); release the upstream the
    moment every request is at the upstream or refused; statuses by model, and seconds."""
    upstream.route("POST", "/v1/chat/completions", capped_reply("chatcmpl-rl-race"))
    upstream.hold()
    refused = 0
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=RACE_TIMEOUT_S)) as s:

        async def one(i: int) -> tuple[str, int]:
            nonlocal refused
            model = MODELS[i % len(MODELS)]
            async with s.post(urls[(i // len(MODELS)) % len(urls)] + "/chat/completions", json=body(model)) as r:
                payload = await r.json()
                if r.status == 429:
                    refused += 1
                    assert payload["error"]["type"] == "rate_limit_exceeded"
                    assert r.headers["x-tollgate-ratelimit-name"] == model.removeprefix("gpt-")
                return model, r.status

        async def gatekeeper() -> None:
            deadline = time.monotonic() + RACE_TIMEOUT_S
            while upstream.received + refused < REQUESTS:
                assert time.monotonic() < deadline, (upstream.received, refused)
                await asyncio.sleep(0.005)
            upstream.release()

        started = time.monotonic()
        keeper = asyncio.create_task(gatekeeper())
        results = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        elapsed = time.monotonic() - started
        await keeper
    by_model: dict[str, list[int]] = {m: [] for m in MODELS}
    for model, status in results:
        by_model[model].append(status)
    return by_model, elapsed


def check(by_model: dict[str, list[int]], elapsed: float) -> str:
    for statuses in by_model.values():
        assert set(statuses) <= {200, 429} and len(statuses) == REQUESTS // len(MODELS)
    admitted = {m: s.count(200) for m, s in by_model.items()}
    # Every request in flight was held at the upstream until all were decided: exactly 7.
    assert admitted["gpt-flight"] == IN_FLIGHT
    # The burst, plus what refilled while the race ran: never more.
    assert RPM <= admitted["gpt-rpm"] <= RPM + math.floor(elapsed * RPM / 60)
    assert TPM_REQUESTS <= admitted["gpt-tpm"] <= math.floor(TPM_REQUESTS + elapsed * TPM_REQUESTS / 60)
    return f"{admitted} admitted of {REQUESTS // len(MODELS)} each in {elapsed:.2f} s"


async def test_race_sqlite_two_worker_processes(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    cfg = tmp_path / "tollgate.yaml"
    proxy: Tollgate | None = None
    with UpstreamThread() as upstream:
        cfg.write_text(config(upstream.api_base, f"ledger: {{backend: sqlite, path: {db}}}"))
        try:
            proxy = await start_tollgate(cfg, tmp_path / "serve.log", workers=2)
            by_model, elapsed = await race(upstream, [proxy.base_url])
        finally:
            if proxy is not None:
                assert proxy.stop() == 0
    summary = check(by_model, elapsed)
    # Every slot was given back once its request finished.
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM in_flight").fetchone()[0] == 0
    print(f"sqlite, 2 workers: {summary}")


async def test_race_redis_two_instances(tmp_path: Path) -> None:
    proxies: list[Tollgate] = []
    async with RedisServer() as redis:
        with UpstreamThread() as upstream:
            try:
                for i in range(2):
                    cfg = tmp_path / f"tollgate-{i}.yaml"
                    ledger = f"ledger: {{backend: redis, redis_url: '{redis.url}', path: {tmp_path / f'spend-{i}.db'}}}"
                    cfg.write_text(config(upstream.api_base, ledger))
                    proxies.append(await start_tollgate(cfg, tmp_path / f"serve-{i}.log"))
                by_model, elapsed = await race(upstream, [p.base_url for p in proxies])
            finally:
                for p in proxies:
                    p.stop()
        summary = check(by_model, elapsed)
        client = aioredis.Redis.from_url(redis.url, decode_responses=True)
        try:
            # The per-minute counters are there (not yet drained); no slot is held any more.
            assert len([k async for k in client.scan_iter(match="{tollgate}:rl:r:*")]) == 2
            slots = [k async for k in client.scan_iter(match="{tollgate}:rl:f:*")]
            assert [await client.zcard(k) for k in slots] == [0] * len(slots)
        finally:
            await client.aclose()
    print(f"redis, 2 instances: {summary}")

"""500 requests at once against a $1 budget that fits exactly 40 of them, across processes.

Every request is capped at 25 output tokens of `gpt-test` ($1000 per 1M output tokens, input
free), so its worst case is exactly $0.025 and $1 holds exactly 40. The upstream holds every
admitted request open until all 500 have been admitted or refused, so no settlement can
free room mid-race: the only thing standing between 500 and 40 is the ledger's atomic
reserve, shared by (a) two worker processes of `tollgate serve --workers 2` on one SQLite
file, (b) two separate `tollgate serve` instances on one Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.spend.budgets import LedgerSettings
from proxy.spend.ledger import open_ledger
from tests.integration.budget_common import BODY, budget_config, capped_reply
from tests.support.redis_server import RedisServer
from tests.support.tollgate_process import Tollgate, UpstreamThread, start_tollgate

REQUESTS = 500
ADMITS = 40  # $1 / (25 tokens x $0.001)
RACE_TIMEOUT_S = 30.0
REPLY = capped_reply("chatcmpl-race")


def race_config(upstream: str, ledger: str) -> str:
    return budget_config(upstream, "one-dollar", 1, ledger)


async def race(upstream: UpstreamThread, urls: Sequence[str], exact: bool = True) -> list[int]:
    """Fire all requests at once (alternating between `urls`); release the upstream's gate
    the moment every request is either at the upstream or refused; return the statuses.
    `exact`: exactly ADMITS reach the upstream (else at most ADMITS)."""
    upstream.route("POST", "/v1/chat/completions", REPLY)
    upstream.hold()
    refused = 0
    released = asyncio.Event()

    # One connection per request: with SO_REUSEPORT the kernel spreads connections.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=RACE_TIMEOUT_S)) as s:

        async def one(i: int) -> int:
            nonlocal refused
            async with s.post(urls[i % len(urls)] + "/chat/completions", json=BODY) as r:
                await r.read()
                if r.status == 429:
                    refused += 1
                return r.status

        async def gatekeeper() -> None:
            deadline = time.monotonic() + RACE_TIMEOUT_S
            while upstream.received + refused < REQUESTS:
                assert time.monotonic() < deadline, (upstream.received, refused)
                await asyncio.sleep(0.005)
            # Every request is accounted for and the admitted ones are all still open.
            assert upstream.received == ADMITS if exact else upstream.received <= ADMITS
            upstream.release()
            released.set()

        keeper = asyncio.create_task(gatekeeper())
        statuses = await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        await keeper
    assert released.is_set()
    return list(statuses)


async def final_state(settings: LedgerSettings, timeout: float = 10.0, admitted: int = ADMITS) -> dict[str, Any]:
    """The budget's row once every admitted request has settled (and leases are back)."""
    deadline = time.monotonic() + timeout
    ledger = await open_ledger(settings)
    try:
        while True:
            rows = await ledger.budget_report(datetime.now(UTC))
            if rows and rows[0]["requests"] == admitted and rows[0]["reserved"] == 0:
                return rows[0]
            assert time.monotonic() < deadline, rows
            await asyncio.sleep(0.05)
    finally:
        await ledger.close()


# With quota leasing each process admits from slices of the headroom it leased, sized down
# to per-request reservations at the edge. Nothing is ever admitted beyond the limit; near
# it, one process may refuse while the other still holds an unused slice (given back once
# idle), so across processes "exactly 40" becomes "at most 40, and nearly all of them".
LEASED_AT_LEAST = 36
LEASING = ", leasing: {enabled: true, idle_seconds: 0.5}"


def check(statuses: list[int], row: dict[str, Any], leasing: bool) -> None:
    admitted = statuses.count(200)
    if leasing:
        assert LEASED_AT_LEAST <= admitted <= ADMITS, admitted
    else:
        assert admitted == ADMITS
    assert statuses.count(429) == REQUESTS - admitted
    assert row["spent"] == admitted * Decimal("0.025") <= row["limit_usd"]
    assert row["requests"] == admitted and row["reserved_requests"] == 0


@pytest.mark.parametrize("leasing", [False, True], ids=["reservations", "leasing"])
async def test_race_sqlite_two_worker_processes(tmp_path: Path, leasing: bool) -> None:
    db = tmp_path / "ledger.db"
    config = tmp_path / "tollgate.yaml"
    proxy: Tollgate | None = None
    with UpstreamThread() as upstream:
        ledger = f"ledger: {{backend: sqlite, path: {db}{LEASING if leasing else ''}}}"
        config.write_text(race_config(upstream.api_base, ledger))
        try:
            proxy = await start_tollgate(config, tmp_path / "serve.log", workers=2)
            started = time.monotonic()
            statuses = await race(upstream, [proxy.base_url], exact=not leasing)
            elapsed = time.monotonic() - started
            # Idle leases are given back while the proxy runs, not only when it stops.
            row = await final_state(LedgerSettings(backend="sqlite", path=str(db)), admitted=statuses.count(200))
        finally:
            if proxy is not None:
                proxy.stop()
    check(statuses, row, leasing)
    print(f"sqlite, 2 workers{', leasing' if leasing else ''}: {REQUESTS} requests, {statuses.count(200)} admitted, "
          f"{statuses.count(429)} refused, spent ${row['spent']} in {elapsed:.2f} s")


@pytest.mark.parametrize("leasing", [False, True], ids=["reservations", "leasing"])
async def test_race_redis_two_instances(tmp_path: Path, leasing: bool) -> None:
    proxies: list[Tollgate] = []
    async with RedisServer() as redis:
        with UpstreamThread() as upstream:
            try:
                for i in range(2):
                    config = tmp_path / f"tollgate-{i}.yaml"
                    ledger = (
                        f"ledger: {{backend: redis, redis_url: '{redis.url}', path: {tmp_path / f'spend-{i}.db'}"
                        f"{LEASING if leasing else ''}}}"
                    )
                    config.write_text(race_config(upstream.api_base, ledger))
                    proxies.append(await start_tollgate(config, tmp_path / f"serve-{i}.log"))
                started = time.monotonic()
                statuses = await race(upstream, [p.base_url for p in proxies], exact=not leasing)
                elapsed = time.monotonic() - started
                row = await final_state(
                    LedgerSettings(backend="redis", redis_url=redis.url, path=str(tmp_path / "report.db")),
                    admitted=statuses.count(200),
                )
            finally:
                for p in proxies:
                    p.stop()
    check(statuses, row, leasing)
    # Each instance logged its own share of the 40 settled requests.
    shares = []
    for i in range(2):
        log = await open_ledger(LedgerSettings(path=str(tmp_path / f"spend-{i}.db")))
        try:
            total = await log.spend_report(datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC), [])
            shares.append(int(total[0]["requests"]) if total else 0)
        finally:
            await log.close()
    # Which instance wins each reservation is up to timing (one may win all 40); the
    # ledger's totals above are what must hold.
    assert sum(shares) == statuses.count(200), shares
    print(f"redis, 2 instances{', leasing' if leasing else ''}: {REQUESTS} requests, {statuses.count(200)} admitted "
          f"({shares[0]} + {shares[1]}), {statuses.count(429)} refused, spent ${row['spent']} in {elapsed:.2f} s")

"""The limit store's contract on both backends: the ledger's SQLite file, and a real Redis.

The SQLite store decides at the `now` it is given; the Redis store reads Redis's clock,
which moves while a test runs, so its figures are checked within the drain that a few
hundred milliseconds allow.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.ratelimit.gcra import SCALE, remaining
from proxy.ratelimit.store import LimitStore, Want, open_store
from proxy.spend.budgets import LedgerSettings
from proxy.spend.ledger import Ledger, open_ledger
from proxy.spend.ledger.sqlite_db import epoch_ms
from tests.support.redis_server import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LimitStore]:
    if request.param == "sqlite":
        settings = LedgerSettings(path=str(tmp_path / "ledger.db"))
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        settings = LedgerSettings(
            backend="redis", redis_url=server.url, path=str(tmp_path / "spend.db"), key_prefix=f"t{uuid.uuid4().hex[:10]}"
        )
    ledger: Ledger = await open_ledger(settings)
    try:
        yield await open_store(ledger)
    finally:
        await ledger.close()


def now_ms() -> int:
    return epoch_ms(datetime.now(UTC))


async def test_all_or_nothing_and_refusal_names_the_counter(store: LimitStore) -> None:
    wants = [Want("a|requests", "requests", 2, 1), Want("b|in_flight", "in_flight", 1, 1)]
    first = await store.acquire("g1", wants, 60_000, now_ms())
    assert first.ok and first.levels[1] == 1
    # The slot is taken: refused by counter 1, and counter 0 is not charged for it.
    second = await store.acquire("g2", wants, 60_000, now_ms())
    assert not second.ok and second.refused == 1 and second.levels[1] == 1
    assert remaining(second.levels[0], 2) == 1
    await store.finish("g1", ["b|in_flight"], [], now_ms())
    third = await store.acquire("g3", wants, 60_000, now_ms())
    assert third.ok and remaining(third.levels[0], 2) == 0
    assert not (await store.acquire("g4", wants[:1], 60_000, now_ms())).ok


async def test_token_charge_is_corrected_at_finish(store: LimitStore) -> None:
    limit = 6000  # drains 100 tokens a second
    got = await store.acquire("g1", [Want("t", "tokens", limit, 5000)], 60_000, now_ms())
    assert got.ok and got.levels[0] // SCALE in range(4990, 5001)
    assert not (await store.acquire("g2", [Want("t", "tokens", limit, 2000)], 60_000, now_ms())).ok
    # It used 1000 of the 5000 charged: 4000 come back.
    await store.finish("g1", [], [("t", limit, -4000)], now_ms())
    after = await store.acquire("g3", [Want("t", "tokens", limit, 2000)], 60_000, now_ms())
    assert after.ok and after.levels[0] // SCALE in range(2900, 3001)


async def test_a_slot_whose_lease_ends_is_free_and_renewal_keeps_it(store: LimitStore) -> None:
    want = [Want("f", "in_flight", 1, 1)]
    assert (await store.acquire("held", want, 300, now_ms())).ok
    await asyncio.sleep(0.15)
    await store.renew([("f", "held")], 300, now_ms())
    await asyncio.sleep(0.2)
    # 350 ms after the acquire, but renewed at 150: still held.
    assert not (await store.acquire("other", want, 300, now_ms())).ok
    await asyncio.sleep(0.35)
    # Nobody renewed it (its process died): it counts no more.
    assert (await store.acquire("other", want, 300, now_ms())).ok
    await store.sweep(now_ms())

"""The limiter's own bookkeeping, over an in-memory store: no sockets, no ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from proxy.faults import FaultMetrics
from proxy.ratelimit.limiter import Grant, Limiter
from proxy.ratelimit.store import Acquired, Want


class SlowStore:
    """Admits everything after `delay`; records what is given back."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.finished: list[tuple[str, list[str], list[tuple[str, int, int]]]] = []

    async def acquire(self, grant_id: str, wants: Sequence[Want], lease_ms: int, now_ms: int) -> Acquired:
        await asyncio.sleep(self.delay)
        return Acquired(True, now_ms, [1 for _ in wants])

    async def finish(
        self, grant_id: str, slots: Sequence[str], corrections: Sequence[tuple[str, int, int]], now_ms: int
    ) -> None:
        self.finished.append((grant_id, list(slots), list(corrections)))

    async def renew(self, slots: Sequence[tuple[str, str]], lease_ms: int, now_ms: int) -> None:
        pass

    async def sweep(self, now_ms: int) -> None:
        pass


def limiter(store: SlowStore) -> Limiter:
    registry = CollectorRegistry()
    lim = Limiter(registry, FaultMetrics(registry), lambda: datetime.now(UTC), 60.0)
    lim._store = store
    return lim


WANTS = [Want("r", "requests", 10, 1), Want("t", "tokens", 1000, 300), Want("f", "in_flight", 2, 1)]


async def test_a_request_cancelled_while_charging_gives_back_what_it_got() -> None:
    store = SlowStore(0.05)
    lim = limiter(store)
    task = asyncio.create_task(lim.acquire("g1", WANTS))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    await asyncio.gather(*lim.background)
    assert store.finished == [("g1", ["f"], [("t", 1000, -300)])]


async def test_end_is_once_per_grant_and_corrects_to_what_was_used() -> None:
    store = SlowStore(0)
    lim = limiter(store)
    grant = Grant("g2", slots=("f",), tokens=(("t", 1000, 300),))
    lim.holding(grant)
    assert lim.live == {"g2": grant}
    first = lim.end(grant, 120)
    assert first is not None and lim.end(grant, 5) is None
    await first
    assert store.finished == [("g2", ["f"], [("t", 1000, -180)])]
    assert lim.live == {}
    # Nothing held (a requests-only grant): nothing to do.
    assert lim.end(Grant("g3"), 0) is None

"""This process's side of the limits: grants, their end, the lease chore, the metrics.

    acquire (proxy.throttle)   every applicable limit charged at once → Grant (or refused)
    end(grant, tokens)         slots given back, the token charge corrected to actual use

`end` is idempotent per grant and called from `finish`, which runs exactly once per
request on every path. Slots held by requests in flight have leases, renewed by the chore
while this process lives; a process that dies holding slots stops renewing, and its slots
count no more once their leases end (`ledger.lease_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from proxy.faults import FaultMetrics
from proxy.ratelimit.store import Acquired, LimitStore, Want, open_store
from proxy.spend.ledger import Ledger
from proxy.spend.ledger.sqlite_db import epoch_ms

log = logging.getLogger("tollgate.limits")

SWEEP_EVERY_S = 30.0


@dataclass(slots=True, eq=False)
class Grant:
    """What one admitted request holds: slots (in-flight counters) and a token charge per
    tokens-per-minute counter, (counter, limit, tokens charged)."""

    id: str
    slots: tuple[str, ...] = ()
    tokens: tuple[tuple[str, int, int], ...] = ()
    ending: asyncio.Task[Any] | None = None

    @property
    def holds_anything(self) -> bool:
        return bool(self.slots or self.tokens)


class LimitMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter(
            "tollgate_rate_limited_total",
            "Requests refused with 429 by a Tollgate rate or concurrency limit, by limit name "
            "and kind (requests, tokens, in_flight); nothing was sent upstream.",
            ("limit", "kind"),
            registry=registry,
        )


class Limiter:
    def __init__(
        self,
        registry: CollectorRegistry,
        faults: FaultMetrics,
        clock: Callable[[], datetime],
        lease_seconds: float,
    ) -> None:
        self.metrics = LimitMetrics(registry)
        self.faults = faults
        self.clock = clock
        self.lease_ms = int(lease_seconds * 1000)
        self._store: LimitStore | None = None
        # Grants holding slots, by id: their leases are renewed while they run.
        self.live: dict[str, Grant] = {}
        self.background: set[asyncio.Task[Any]] = set()
        # Whether this process has charged a limit: until then the chore has nothing to sweep.
        self.used = False

    @property
    def store(self) -> LimitStore:
        if self._store is None:
            raise RuntimeError("the limit store is opened with the ledger, in the app's startup")
        return self._store

    async def acquire(self, grant_id: str, wants: Sequence[Want]) -> Acquired:
        """Charge every want or none. A request cancelled meanwhile (its client left) may
        still be charged once the store answers: that charge is undone then, so no slot
        waits out a lease for a request that is gone."""
        self.used = True
        charging = asyncio.ensure_future(self.store.acquire(grant_id, wants, self.lease_ms, epoch_ms(self.clock())))
        try:
            return await asyncio.shield(charging)
        except asyncio.CancelledError:
            charging.add_done_callback(lambda done: self._undo(done, grant_id, wants))
            raise

    def _undo(self, done: asyncio.Future[Acquired], grant_id: str, wants: Sequence[Want]) -> None:
        if done.cancelled() or done.exception() is not None or not done.result().ok:
            return
        # Nothing was sent: the slots go back and the tokens are refunded (the request
        # itself stays counted, as any admitted request).
        grant = Grant(
            grant_id,
            slots=tuple(w.id for w in wants if w.kind == "in_flight"),
            tokens=tuple((w.id, w.limit, w.cost) for w in wants if w.kind == "tokens"),
        )
        self.end(grant, 0)

    def count_unavailable(self, mode: str) -> None:
        self.faults.ledger_unavailable.labels("rate_limit", mode).inc()

    def holding(self, grant: Grant) -> None:
        if grant.slots:
            self.live[grant.id] = grant

    def end(self, grant: Grant, tokens_used: int | None) -> asyncio.Task[Any] | None:
        """Give back the grant's slots and correct its token charges to `tokens_used` (None:
        keep the charge). Once per grant; returns the task doing it, or None."""
        if grant.ending is not None or not grant.holds_anything:
            return None
        self.live.pop(grant.id, None)
        corrections = [
            (counter, limit, tokens_used - charged)
            for counter, limit, charged in grant.tokens
            if tokens_used is not None and tokens_used != charged
        ]
        grant.ending = self._spawn(self._end(grant, corrections))
        return grant.ending

    async def _end(self, grant: Grant, corrections: list[tuple[str, int, int]]) -> None:
        if not grant.slots and not corrections:
            return
        try:
            await self.store.finish(grant.id, grant.slots, corrections, epoch_ms(self.clock()))
        except Exception:  # noqa: BLE001 - its slots' leases run out all the same
            log.warning("ending rate-limit grant %s failed; its slots end with their lease", grant.id, exc_info=True)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("ending a rate-limit grant failed", exc_info=t.exception())

        task.add_done_callback(done)
        return task

    async def chores(self, every: float = 2.0) -> None:
        """Forever: renew the leases of live slots (a third of a lease at a time) and sweep
        drained counters and dead slots now and then."""
        loop = asyncio.get_running_loop()
        renew_at = sweep_at = 0.0
        while True:
            now = loop.time()
            try:
                if self.live and now >= renew_at:
                    renew_at = now + self.lease_ms / 3000
                    slots = [(s, g.id) for g in list(self.live.values()) for s in g.slots]
                    await self.store.renew(slots, self.lease_ms, epoch_ms(self.clock()))
                if self.used and now >= sweep_at:
                    sweep_at = now + SWEEP_EVERY_S
                    await self.store.sweep(epoch_ms(self.clock()))
            except Exception:  # noqa: BLE001 - retried next round; a lease lasts 3 rounds
                log.exception("rate-limit chores failed")
            await asyncio.sleep(min(every, self.lease_ms / 3000))

    @contextlib.asynccontextmanager
    async def running(self, ledger: Ledger) -> AsyncIterator[None]:
        """On the ledger's storage (open already): run the chores; at the end, let the
        grants still ending finish before the ledger closes."""
        self._store = await open_store(ledger)
        chores = asyncio.get_running_loop().create_task(self.chores())
        try:
            yield
        finally:
            chores.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chores
            if self.background:
                await asyncio.wait(self.background, timeout=10)

"""Spend: this process's side of the budget lifecycle, in one object.

    admit (proxy.spend.admission)  reserve → Hold
    settle(hold, row)              the hold is replaced by what was spent; the row logged
    release(hold)                  the hold is dropped (the request never left Tollgate)

Both endings are idempotent per hold. What the ledger cannot take right now (storage
down) waits in the outbox and is retried by the chores until it lands, oldest first. The
chores also renew the leases of live holds, free the holds of processes that died
(their leases ran out), abandon reservations refused while the ledger hung, and refresh
the budget gauges. `Spend.running` is the app's one cleanup context for all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.faults import FaultMetrics
from proxy.pricing import plain_usd
from proxy.spend.buckets import Bucket
from proxy.spend.budgets import (
    BudgetRule,
    Charge,
    Crossing,
    charges,
    forecast_payload,
    threshold_crossed,
    webhook_payload,
)
from proxy.spend.forecast import crossed, forecast
from proxy.spend.hold import Hold, ledger_down, new_ledger_id
from proxy.spend.ledger import Ledger, LedgerError, Settled, SpendRow, open_ledger
from proxy.spend.metrics import BudgetMetrics
from proxy.spend.quota import QuotaBook
from proxy.spend.rules import LedgerSettings, WebhookSettings
from proxy.spend.webhook import WebhookSender

log = logging.getLogger("tollgate.finish")

# Settlements kept in memory while the ledger is down; past this, the oldest are dropped
# (and logged), so an outage cannot grow the process without bound.
MAX_UNSETTLED = 100_000
# Past this many remembered forecast webhooks, those of ended windows are forgotten.
MAX_FORECAST_SENT = 10_000


@dataclass(slots=True)
class Unsettled:
    """A settlement the ledger could not take: retried until it can."""

    ledger_id: str
    actual: list[Charge]
    row: SpendRow
    hold: Hold | None
    # Nothing was ever reserved under ledger_id (see Ledger.settle).
    fresh: bool


class Spend:
    def __init__(
        self,
        settings: LedgerSettings,
        webhook: WebhookSettings,
        registry: CollectorRegistry,
        faults: FaultMetrics,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.metrics = BudgetMetrics(registry)
        self.faults = faults
        self.webhook = WebhookSender(webhook)
        self._ledger: Ledger | None = None
        # This process's holds not yet ended, by ledger id: their leases are renewed while
        # they run, so a lease runs out only when the process holding it is gone.
        self.live: dict[str, Hold] = {}
        # Ledger ids of reservations refused because the ledger failed (timed out) mid-call:
        # a hung Redis may still run them later, so they are abandoned once it answers.
        self.abandoned: set[str] = set()
        self.outbox: deque[Unsettled] = deque()
        # Settlements and webhooks in flight: they outlive the request, and shutdown waits.
        self.background: set[asyncio.Task[Any]] = set()
        # Buckets (an id names one window) whose forecast webhook this process has sent, with
        # the window's end so that ended windows can be forgotten. In memory, per process:
        # the forecast is a projection, not a ledger fact, so workers or instances sharing a
        # ledger may each send one for the same window; a restart may send it again.
        self.forecast_sent: dict[str, datetime] = {}
        # Quota leases: most budgeted requests are admitted from them with no ledger call.
        self.quota = QuotaBook(settings.leasing, settings.lease_seconds)

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise RuntimeError("the ledger is opened in the app's startup")
        return self._ledger

    @property
    def opened(self) -> bool:
        return self._ledger is not None

    @property
    def lease_seconds(self) -> float:
        return self.settings.lease_seconds

    def count_unavailable(self, operation: str, mode: str) -> None:
        self.faults.ledger_unavailable.labels(operation, mode).inc()

    def set_webhook(self, settings: WebhookSettings) -> Callable[[], Coroutine[Any, Any, None]] | None:
        """Send to `settings` from now on; returns the closer of the old sender (a webhook
        in flight may still be using it), or None when nothing changed."""
        if settings == self.webhook.settings:
            return None
        old, self.webhook = self.webhook, WebhookSender(settings)
        return old.close

    # -- the lifecycle of one hold ------------------------------------------------------

    def holding(self, hold: Hold) -> None:
        self.live[hold.ledger_id] = hold

    def settle(self, hold: Hold | None, row: SpendRow, spent: Decimal, tokens: int) -> asyncio.Task[Any] | None:
        """Replace the hold with what was spent and log the row, on a task of its own (it
        must complete even when the client is gone, and shutdown waits for it). Returns
        that task, or None when the hold had already ended."""
        if hold is not None:
            if hold.ending is not None:
                return None
            self.live.pop(hold.ledger_id, None)
        if hold is not None and (hold.reserved or hold.charge_on_settle or hold.draw is not None):
            # A leased request's id was never reserved: a reserve that failed (and might
            # have landed) leaves the hold without a draw.
            job = Unsettled(hold.ledger_id, charges(hold.buckets, spent, tokens), row, hold, fresh=hold.draw is not None)
            if hold.draw is not None:
                self.quota.settling(hold.draw, spent, tokens)
        else:
            job = Unsettled(new_ledger_id(row.request_id), [], row, hold, fresh=True)
        task = self.spawn(self._settle(job), f"settling {row.request_id}")
        if hold is not None:
            hold.ending = task
        return task

    def release(self, hold: Hold) -> asyncio.Task[Any] | None:
        """Drop the hold without charging it: nothing it reserved for was spent."""
        if hold.ending is not None:
            return None
        self.live.pop(hold.ledger_id, None)
        if hold.draw is not None:
            self.quota.released(hold.draw)
        hold.ending = self.spawn(self._release(hold), f"releasing {hold.ledger_id}")
        return hold.ending

    async def _release(self, hold: Hold) -> None:
        if not hold.reserved:
            return
        try:
            await self.ledger.release(hold.ledger_id, self.clock())
        except Exception:  # noqa: BLE001 - its lease runs out all the same
            log.warning("releasing %s failed; it ends when its lease runs out", hold.ledger_id, exc_info=True)

    async def _settle(self, job: Unsettled) -> None:
        now = self.clock()
        try:
            results = await self.ledger.settle(job.ledger_id, job.actual, job.row, now, fresh=job.fresh)
        except Exception as exc:  # noqa: BLE001 - a request that was served must be charged
            if not ledger_down(exc):
                # Not landed: a leased request's worst case stays held by its lease (until
                # the process ends), as a reservation of its own would stay until it lapsed.
                log.exception("settling %s failed; its reservation will expire with its lease", job.row.request_id)
                return
            if len(self.outbox) >= MAX_UNSETTLED:
                lost = self.outbox.popleft()
                log.error("too many settlements waiting for the ledger: %s ($%s) is lost", lost.row.request_id, plain_usd(lost.row.cost))
            self.outbox.append(job)
            self.count_unavailable("settle", "deferred")
            self.faults.unsettled.set(len(self.outbox))
            log.warning("ledger unavailable; settlement of %s ($%s) kept for retry: %s", job.row.request_id, plain_usd(job.row.cost), exc)
            return
        self._landed(job)
        self._after_settle(job.hold, results, now)

    def _landed(self, job: Unsettled) -> None:
        # Every charge of a settlement is the same amount and tokens (`charges`).
        if job.hold is not None and job.hold.draw is not None and job.actual:
            self.quota.landed(job.hold.draw, job.actual[0].amount, job.actual[0].tokens)

    def _after_settle(self, hold: Hold | None, results: Sequence[Settled], now: datetime) -> None:
        if hold is None:
            return
        by_id = {b.id: b for b in hold.buckets}
        for result in results:
            bucket = by_id.get(result.bucket_id)
            if bucket is None or bucket.limit_usd is None:
                continue
            for threshold in threshold_crossed(
                result.spent_before, result.spent_after, bucket.limit_usd, bucket.rule.thresholds
            ):
                self.metrics.crossed(bucket.name, threshold)
                log.warning("budget %s crossed %.0f%% of its limit", bucket.describe(), threshold * 100)
                if self.webhook.enabled:
                    crossing = Crossing(bucket, threshold, result.spent_after, bucket.limit_usd)
                    self.spawn(self.webhook.send(webhook_payload(crossing, now)), "budget webhook")
            self._forecast_crossed(bucket, result, now)

    def _forecast_crossed(self, bucket: Bucket, result: Settled, now: datetime) -> None:
        """Announce a settlement that made the forecast project the limit to be hit before
        the window ends, once per bucket window: both forecasts at the same `now`, so only
        the spend moved the projection (time passing alone never triggers it)."""
        limit = bucket.limit_usd
        if limit is None or bucket.end is None or not self.webhook.enabled or bucket.id in self.forecast_sent:
            return
        before = forecast(result.spent_before, limit, bucket.start, bucket.end, now)
        after = forecast(result.spent_after, limit, bucket.start, bucket.end, now)
        if not crossed(before, after):
            return
        if len(self.forecast_sent) >= MAX_FORECAST_SENT:
            self.forecast_sent = {k: end for k, end in self.forecast_sent.items() if end > now}
        self.forecast_sent[bucket.id] = bucket.end
        log.warning("budget %s is forecast to hit its limit before its window ends (%s)", bucket.describe(), after.status)
        self.spawn(self.webhook.send(forecast_payload(bucket, result.spent_after, limit, after, now)), "forecast webhook")

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background %s failed", what, exc_info=t.exception())

        task.add_done_callback(done)
        return task

    # -- the outbox and the chores ------------------------------------------------------

    async def retry_outbox(self) -> int:
        """Charge settlements kept while the ledger was down, oldest first; stops at the
        first failure (the ledger is still down). Settle is idempotent per ledger id, so a
        retry of one that did land (the reply was lost) charges nothing twice."""
        done = 0
        while self.outbox:
            job = self.outbox.popleft()
            try:
                results = await self.ledger.settle(job.ledger_id, job.actual, job.row, self.clock(), fresh=job.fresh)
            except Exception as exc:  # noqa: BLE001 - still down: keep it, try again later
                if ledger_down(exc):
                    self.outbox.appendleft(job)
                    break
                log.exception("late settlement of %s failed for good", job.row.request_id)
                continue
            done += 1
            self._landed(job)
            self._after_settle(job.hold, results, self.clock())
        self.faults.unsettled.set(len(self.outbox))
        if done:
            self.faults.reconciled.inc(done)
            log.warning("ledger back: %d late settlements charged, %d still waiting", done, len(self.outbox))
        return done

    async def abandon_refused(self) -> None:
        """Abandon the reservations of requests refused while the ledger failed; stops at
        the first failure (still down) and tries again at the next round."""
        for ledger_id in list(self.abandoned):
            try:
                if await self.ledger.abandon(ledger_id, self.clock()):
                    log.warning("released reservation %s that the ledger made after refusing its request", ledger_id)
            except Exception:  # noqa: BLE001 - the ledger is still down: next round
                return
            self.abandoned.discard(ledger_id)

    async def chores(self, budgets: Callable[[], Sequence[BudgetRule]], every: float = 2.0) -> None:
        """Forever: renew live leases (a third of a lease at a time, in one batch), charge
        the outbox, abandon refused reservations, end the holds of dead processes, and
        refresh the budget gauges from the ledger, so every instance's scrape shows the
        shared truth. `budgets` reads the rules in force now (a reload changes them)."""
        renew_at = 0.0
        while True:
            lease = self.lease_seconds
            held = [*self.live, *self.quota.lease_ids()]
            if held and time.monotonic() >= renew_at:
                started = time.monotonic()
                renew_at = started + lease / 3
                try:
                    await self.ledger.renew(held, lease, self.clock())
                except Exception:  # noqa: BLE001 - retried at the next round; a lease lasts 3 rounds
                    log.exception("renewing %d leases failed", len(held))
                else:
                    self.quota.renewed(started)
            if self.quota.leases:
                try:
                    await self.quota.give_back(self.ledger, self.clock())
                except Exception:  # noqa: BLE001 - kept, and tried again at the next round
                    log.warning("giving back idle quota leases failed", exc_info=True)
            if self.outbox:
                await self.retry_outbox()
            if self.abandoned:
                await self.abandon_refused()
            try:
                await self._expire_and_refresh(budgets())
            except Exception:  # noqa: BLE001 - a chore failing must not stop the next one
                log.exception("ledger chores failed")
            await asyncio.sleep(min(every, lease / 3))

    async def _expire_and_refresh(self, budgets: Sequence[BudgetRule]) -> None:
        now = self.clock()
        interrupted_before = self.ledger.interrupted
        expired = await self.ledger.expire(now)
        if expired:
            interrupted = self.ledger.interrupted - interrupted_before
            log.warning(
                "%d reservations outlived their process (lease expired); %d settled as interrupted",
                expired, interrupted,
            )
            self.faults.interrupted.inc(interrupted)
        if budgets:
            self.metrics.refresh(budgets, await self.ledger.budget_report(now), now)

    @contextlib.asynccontextmanager
    async def running(self, budgets: Callable[[], Sequence[BudgetRule]]) -> AsyncIterator[None]:
        """Open the ledger, run the chores, and at the end drain: settlements in flight,
        then one last try at the outbox, before the ledger closes."""
        try:
            self._ledger = await open_ledger(self.settings, self.clock())
        except LedgerError:
            raise
        except Exception as exc:  # noqa: BLE001 - one clear line instead of sqlite's or redis's
            raise LedgerError(f"cannot open the ledger at {self.settings.path}: {exc}") from exc
        chores = asyncio.get_running_loop().create_task(self.chores(budgets))
        try:
            yield
        finally:
            chores.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await chores
            await self.drain()
            await self.webhook.close()
            await self.ledger.close()

    async def drain(self) -> None:
        if self.background:
            await asyncio.wait(self.background, timeout=10)
        if self.outbox:
            # Last chance for settlements kept while the ledger was down.
            await self.retry_outbox()
        # After the settlements: a lease keeps what requests whose settlement never landed
        # still hold.
        await self.quota.close(self.ledger, self.clock())
        if self.outbox:
            log.error(
                "%d settlements could not reach the ledger before shutdown and are lost: %s",
                len(self.outbox),
                ", ".join(f"{p.row.request_id} ${plain_usd(p.row.cost)}" for p in list(self.outbox)[:50]),
            )

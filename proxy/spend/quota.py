"""Quota leasing: most requests are admitted against their budgets with no ledger call.

A process leases a slice of each budget's headroom from the ledger: one reservation under
a lease id of its own, which the ledger checks and counts like any other (atomically,
across workers and instances). Everything leased plus every per-request reservation
therefore stays within the limit. A request whose worst case fits in the free part of the
leases of all its budgets is admitted here, in memory; its settlement is an ordinary one
(its actual cost added to the budgets' spend and its spend row written) and still lands
before the response completes, as without leasing.

One lease's books (money; tokens the same way):

    granted   what the ledger holds for the lease
    held      worst cases of requests admitted from it whose settlement has not landed
    consumed  what requests settled since the lease was last sized spent, counting
              every settlement that may not have reached the ledger when it was sized
    free      granted - held - consumed

A settled request's cost is then in the ledger's spend *and* still inside `granted` until
the lease is next sized: counted twice, on the safe side. A hold leaves `held` only when
its settlement has landed, so the ledger never holds neither. Sizing (one ledger
transaction) sets the lease to held + a slice, checked against the limit without the
lease's old size. The slice is `share` of the headroom (the limit minus everyone else's
spend and reservations, minus `held`); when it is smaller than `min_requests` times the
request's worst case the budget is at its edge: the lease shrinks to `held` and the
request reserves on its own, exactly as without leasing.

Within one process admission stays exact (at a budget's edge, the request's other leases
give back their free part before it reserves on its own). Across processes, a request can be refused near
the limit while another process sits on unused slice: at most `share` of the headroom,
given back once it has been idle `idle_seconds`. Only budgets that refuse (`block`) and
count no requests are leased: a warn budget's headers need the ledger's state at each
admission, and a lease is one reservation, not N requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal

from proxy.spend.buckets import Bucket, BucketState, Charge
from proxy.spend.ledger import Ledger, ReserveResult
from proxy.spend.money import from_nanos, spend_nanos
from proxy.spend.rules import LeasingSettings

log = logging.getLogger("tollgate.quota")

ZERO = Decimal(0)
NANO = Decimal("1e-9")


def lease_target(
    limit: Decimal | None, others: Decimal, held: Decimal, want: Decimal, share: Decimal, min_requests: int
) -> Decimal | None:
    """A lease's new size (held + slice) for one limit, or None when the budget is at its
    edge for a request that needs `want`. `others`: everyone else's spend and reservations.
    Floored to the nano-dollar the ledger stores, so the ledger never holds less than this."""
    if limit is None:
        return held
    slice_ = ((limit - others - held) * share).quantize(NANO, rounding=ROUND_FLOOR)
    if slice_ < want * min_requests or slice_ <= 0:
        return None
    return held + slice_


@dataclass(slots=True, eq=False)
class Lease:
    """This process's lease on one bucket (one window of one budget)."""

    lease_id: str
    bucket: Bucket
    granted: Decimal = ZERO
    granted_tokens: int = 0
    held: Decimal = ZERO
    held_tokens: int = 0
    consumed: Decimal = ZERO  # every settlement begun, since the lease was created
    consumed_tokens: int = 0
    landed: Decimal = ZERO  # of those, the ones the ledger has confirmed
    landed_tokens: int = 0
    base: Decimal = ZERO  # `landed` when the lease was last sized
    base_tokens: int = 0
    others: BucketState | None = None  # the bucket without this lease, at the last sizing
    # A ledger call is in flight for this lease: nothing is taken from it meanwhile (the
    # size being set may not cover what would be taken).
    sizing: bool = False
    # A sizing whose outcome was never learned (the ledger failed mid-call, a give-back was
    # refused): the ledger holds the old size or the new one, so `granted` is the smaller
    # and the chores size the lease again.
    unsure: bool = False
    # Monotonic time until which the ledger surely still holds the lease: two thirds of a
    # lease past its last sizing or renewal. Past it the lease may have lapsed (renewals
    # failing): nothing is taken from it until a sizing, checked, confirms it.
    valid_until: float = 0.0
    used_at: float = 0.0  # monotonic
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def free(self) -> tuple[Decimal, int]:
        return (
            self.granted - self.held - (self.consumed - self.base),
            self.granted_tokens - self.held_tokens - (self.consumed_tokens - self.base_tokens),
        )

    def fits(self, bucket: Bucket, amount: Decimal, tokens: int, now: float) -> bool:
        # A reload that changed the rule (its limit) must size the lease again first.
        if self.sizing or bucket.rule is not self.bucket.rule or now >= self.valid_until:
            return False
        money, toks = self.free()
        return (bucket.limit_usd is None or amount <= money) and (bucket.limit_tokens is None or tokens <= toks)

    @property
    def idle(self) -> bool:
        """Nothing to give back: the ledger holds exactly what requests in flight need."""
        return (
            not self.unsure
            and self.granted == self.held and self.granted_tokens == self.held_tokens
            and self.consumed == self.base and self.consumed_tokens == self.base_tokens
        )


@dataclass(frozen=True, slots=True)
class Draw:
    """What one request took from its buckets' leases."""

    leases: tuple[Lease, ...]
    amount: Decimal
    tokens: int


def leasable(buckets: Sequence[Bucket]) -> bool:
    return bool(buckets) and all(b.blocking and b.limit_requests is None for b in buckets)


class QuotaBook:
    """This process's leases, by bucket id."""

    def __init__(self, settings: LeasingSettings, lease_seconds: float) -> None:
        self.settings = settings
        self.lease_seconds = lease_seconds
        self.leases: dict[str, Lease] = {}
        self.sizings = 0  # ledger transactions spent on leases: the benchmark's and tests' view

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    # -- admission ---------------------------------------------------------------------

    def take(self, buckets: Sequence[Bucket], amount: Decimal, tokens: int) -> Draw | None:
        """Admit from the leases as they are, or None (some lease must be sized first)."""
        now = time.monotonic()
        leases = []
        for b in buckets:
            lease = self.leases.get(b.id)
            if lease is None or not lease.fits(b, amount, tokens, now):
                return None
            leases.append(lease)
        for lease in leases:
            lease.held += amount
            lease.held_tokens += tokens
            lease.used_at = now
        return Draw(tuple(leases), amount, tokens)

    async def draw(
        self, ledger: Ledger, buckets: Sequence[Bucket], amount: Decimal, tokens: int, now: datetime
    ) -> Draw | None:
        """Admit from the leases, sizing those too small; None: at the edge of some budget
        (or a race took what a sizing won), the request must reserve on its own."""
        got = self.take(buckets, amount, tokens)
        if got is not None:
            return got
        for b in buckets:
            lease = self.leases.get(b.id)
            if lease is None:
                # Drawn here, not when the book is made: forked workers must never share one.
                lease = self.leases[b.id] = Lease(f"lease:{os.getpid()}:{os.urandom(6).hex()}:{b.id}", b)
            if lease.fits(b, amount, tokens, time.monotonic()):
                continue
            async with lease.lock:
                if lease.fits(b, amount, tokens, time.monotonic()):
                    continue
                if not await self._size(ledger, lease, b, amount, tokens, now):
                    # The request reserves on its own, against all its budgets: what this
                    # process's other leases hold beyond their requests in flight would be
                    # counted against it, so they are given back first (within one process,
                    # as exact as without leasing).
                    await self._give_back_all(ledger, [x for x in buckets if x.id != b.id], now)
                    return None
        return self.take(buckets, amount, tokens)

    async def _give_back_all(self, ledger: Ledger, buckets: Sequence[Bucket], now: datetime) -> None:
        for b in buckets:
            lease = self.leases.get(b.id)
            if lease is None or lease.idle:
                continue
            async with lease.lock:
                if not lease.idle:
                    await self._to_held(ledger, lease, lease.bucket, now)

    async def _to_held(self, ledger: Ledger, lease: Lease, bucket: Bucket, now: datetime) -> ReserveResult:
        """Give the lease back down to what its requests in flight hold (lock held)."""
        return await self._set(ledger, lease, bucket, (lease.held, lease.held_tokens), now, give_back=True)

    async def _set(
        self, ledger: Ledger, lease: Lease, bucket: Bucket, size: tuple[Decimal, int], now: datetime, *, give_back: bool
    ) -> ReserveResult:
        """One ledger call setting the lease to `size`, with the lease's lock held; the books
        follow what the ledger did. A call that fails may or may not have been applied (a
        reply lost, a script queued in a hung Redis), so the lease is then taken to hold the
        smaller of its old size and `size`, and left for the chores to size again."""
        lease.sizing = True
        # What has surely reached the ledger's spend before this transaction reads it.
        base, base_tokens = lease.landed, lease.landed_tokens
        started = time.monotonic()
        try:
            result = await ledger.lease(
                lease.lease_id, [Charge(bucket, size[0], size[1])], self.lease_seconds, now, give_back=give_back
            )
        except BaseException:
            self._unsure(lease, size)
            raise
        finally:
            lease.sizing = False
            self.sizings += 1
        if result.ok:
            lease.granted, lease.granted_tokens = size
            lease.base, lease.base_tokens = base, base_tokens
            lease.bucket = bucket
            lease.unsure = False
            lease.valid_until = started + self.lease_seconds * 2 / 3
        elif give_back:
            # Refused only when it would grow the lease (it lapsed, or held more than it
            # had): take nothing more from it until it is sized again.
            self._unsure(lease, size)
        return result

    @staticmethod
    def _unsure(lease: Lease, size: tuple[Decimal, int]) -> None:
        lease.granted = min(lease.granted, size[0])
        lease.granted_tokens = min(lease.granted_tokens, size[1])
        lease.unsure = True

    async def _size(
        self, ledger: Ledger, lease: Lease, bucket: Bucket, amount: Decimal, tokens: int, now: datetime
    ) -> bool:
        """Size the lease for a request needing amount/tokens; False at the budget's edge
        (the lease then holds only what its requests in flight need)."""
        others = lease.others
        for _ in range(3):
            held, held_tokens = lease.held, lease.held_tokens
            if others is None:
                # Never sized: ask for a few requests' worth; the answer tells the headroom.
                size: tuple[Decimal, int] | None = (
                    held + amount * self.settings.min_requests, held_tokens + tokens * self.settings.min_requests,
                )
            else:
                size = self._target(bucket, others, held, held_tokens, amount, tokens)
            if size is None:  # the budget's edge: give back what is not in flight
                if not (lease.idle and lease.bucket.rule is bucket.rule):
                    await self._to_held(ledger, lease, bucket, now)
                return False
            result = await self._set(ledger, lease, bucket, size, now, give_back=False)
            others = lease.others = result.states.get(bucket.id, BucketState())
            if result.ok:
                return True
        return False

    def _target(
        self, bucket: Bucket, others: BucketState, held: Decimal, held_tokens: int, amount: Decimal, tokens: int
    ) -> tuple[Decimal, int] | None:
        share, n = self.settings.share, self.settings.min_requests
        money = lease_target(bucket.limit_usd, others.spent + others.reserved, held, amount, share, n)
        limit_tokens = None if bucket.limit_tokens is None else Decimal(bucket.limit_tokens)
        toks = lease_target(
            limit_tokens, Decimal(others.tokens + others.reserved_tokens), Decimal(held_tokens), Decimal(tokens), share, n
        )
        if money is None or toks is None:
            return None
        return money, int(toks)

    # -- the ends of a leased request ----------------------------------------------------

    @staticmethod
    def settling(draw: Draw, spent: Decimal, tokens: int) -> None:
        """A leased request's settlement is on its way to the ledger."""
        spent = from_nanos(spend_nanos(spent))  # as the ledger will add it, to the nano
        for lease in draw.leases:
            lease.consumed += spent
            lease.consumed_tokens += tokens

    @staticmethod
    def landed(draw: Draw, spent: Decimal, tokens: int) -> None:
        """The ledger confirmed it: the cost is in its spend, the worst case no longer held."""
        spent = from_nanos(spend_nanos(spent))
        for lease in draw.leases:
            lease.held -= draw.amount
            lease.held_tokens -= draw.tokens
            lease.landed += spent
            lease.landed_tokens += tokens

    @staticmethod
    def released(draw: Draw) -> None:
        """The request never left Tollgate: nothing was spent."""
        for lease in draw.leases:
            lease.held -= draw.amount
            lease.held_tokens -= draw.tokens

    # -- chores ------------------------------------------------------------------------

    def lease_ids(self) -> list[str]:
        """Leases the ledger may hold something for: renewed with the live holds."""
        return [
            lease.lease_id for lease in self.leases.values() if lease.granted or lease.granted_tokens or lease.unsure
        ]

    def renewed(self, started: float) -> None:
        """The chores renewed every lease, in a call begun at `started` (monotonic). A lease
        still valid then still existed in the ledger, so it now runs a lease from then."""
        for lease in self.leases.values():
            if started < lease.valid_until:
                lease.valid_until = started + self.lease_seconds * 2 / 3

    async def give_back(self, ledger: Ledger, now: datetime) -> int:
        """Shrink leases idle for `idle_seconds` to what their requests in flight hold, and
        forget those of ended windows once nothing is in flight; how many were sized."""
        sized = 0
        cutoff = time.monotonic() - self.settings.idle_seconds
        for bucket_id, lease in list(self.leases.items()):
            ended = lease.bucket.end is not None and lease.bucket.end <= now
            if lease.used_at > cutoff and not ended:
                continue
            if lease.lock.locked() or lease.idle:
                if ended and lease.idle and lease.held == 0 and lease.held_tokens == 0:
                    del self.leases[bucket_id]
                continue
            async with lease.lock:
                sized += (await self._to_held(ledger, lease, lease.bucket, now)).ok
        return sized

    async def close(self, ledger: Ledger, now: datetime) -> None:
        """At shutdown, after the settlements in flight: give every lease back, keeping only
        what requests whose settlement never landed still hold (until their lease runs out,
        like a reservation of their own)."""
        for lease in self.leases.values():
            if not (lease.granted or lease.granted_tokens or lease.unsure):
                continue
            try:
                if lease.held or lease.held_tokens:
                    await self._to_held(ledger, lease, lease.bucket, now)
                else:
                    await ledger.release(lease.lease_id, now)
            except Exception:  # noqa: BLE001 - its lease runs out all the same
                log.warning("giving back lease %s failed; it ends with its lease", lease.lease_id, exc_info=True)
        self.leases.clear()

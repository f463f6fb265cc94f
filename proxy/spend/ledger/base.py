"""The ledger interface: durable, atomic budget counters plus the spend log.

Both backends (sqlite.py, redis.py) implement `Ledger`. Their contract:

- `reserve` is all or nothing across every charge, and atomic across tasks, processes and
  (for Redis) instances: for each *block* bucket it checks spent + live reservations +
  amount against the limits (`proxy.spend.budgets.exceeds`), and only if all fit records the
  reservation on every bucket (warn buckets included, so their state shows what is in
  flight). A reservation lives until settled, released, or its lease ends.
- `settle` replaces the reservation by the actual charges and writes the spend-log row,
  exactly once per request id (a second settle is a no-op returning []).
- Money is stored as integer nano-USD (1e-9 USD); reservations are rounded up, actual
  spend half-even (`proxy.spend.budgets.to_nanos` / `spend_nanos`). Decimal in, Decimal out.
- All times are timezone-aware datetimes passed in by the caller (inject the clock).

Request ids must be unique per admission: a client-chosen `x-request-id` can repeat, so the
caller should give the ledger its own id for each reservation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, Protocol, runtime_checkable

from proxy.spend.budgets import (
    Bucket,
    BucketState,
    Charge,
    ClampInput,
    Crossing,
    Decision,
    LimitKind,
    admit,
    charges,
    quantize_up,
    threshold_crossed,
)
from proxy.usage import Usage

GroupBy = Literal["key", "user", "team", "model", "day"]
GROUP_BY_FIELDS: tuple[GroupBy, ...] = ("key", "user", "team", "model", "day")


class LedgerError(Exception):
    """The ledger could not do what was asked (storage unreachable, corrupt, misuse)."""


class DuplicateReservation(LedgerError):
    """`reserve` was called twice with one request id (or for an already settled one)."""


@dataclass(frozen=True, slots=True)
class ReserveResult:
    ok: bool
    # Every bucket's state: after the reservation when ok, as checked when refused.
    states: dict[str, BucketState]
    refused: Bucket | None = None
    refused_state: BucketState | None = None
    reason: LimitKind | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    """One bucket's spend before and after a settlement: feed to `threshold_crossed`.

    Settlements of a bucket are serialized by the ledger, so across all instances exactly
    one settlement sees each threshold crossed in a window.
    """

    bucket_id: str
    spent_before: Decimal
    spent_after: Decimal


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One line of the spend log: one settled request."""

    time: datetime  # aware; stored in UTC
    request_id: str
    key: str | None
    user: str | None
    model: str | None
    upstream: str | None
    endpoint: str | None
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    input_source: str | None = None
    output_source: str | None = None
    cost: Decimal = Decimal(0)
    outcome: str | None = None
    status: int | None = None
    # The virtual key's metadata from the config, and its `team` (what team budgets and
    # `tollgate spend --by team` group by). Last, with defaults: rows written as JSON by an
    # older Tollgate (Redis pending rows) still load.
    team: str | None = None
    key_metadata: dict[str, str] | None = None
    # For `tollgate advise` (schema 5): the sha256 hex of the request body as received
    # (repeats are cache candidates; never the payload itself), and the first choice's
    # finish_reason (`length`: the request hit its output cap). Defaults, for older JSON.
    body_sha256: str | None = None
    finish_reason: str | None = None
    # The response cache (schema 6): `hit` rows cost 0 and carry in `saved` what the
    # upstream call would have cost; `miss` / `bypass` when the cache saw the request.
    saved: Decimal = Decimal(0)
    cache: str | None = None

    @classmethod
    def from_usage(cls, usage: Usage | None, cost: Decimal | None, **fields: Any) -> SpendRow:
        """A row from an exchange's Usage and cost plus the identifying fields."""
        u = usage or Usage()
        return cls(
            input_tokens=u.input_tokens,
            cached_input_tokens=u.cached_input_tokens,
            output_tokens=u.output_tokens,
            reasoning_tokens=u.reasoning_tokens,
            cache_write_tokens=u.cache_write_tokens,
            input_source=u.input_source if usage is not None else None,
            output_source=u.output_source if usage is not None else None,
            cost=cost if cost is not None else Decimal(0),
            **fields,
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        # Written for every reservation and settlement: a shallow dict, where asdict would
        # deep-copy every value (Decimal, datetime) only for json to read it once (~9% of
        # a budgeted request's CPU). No field holds a dataclass, so the JSON is the same.
        d = {name: getattr(self, name) for name in _SPEND_ROW_FIELDS}
        d["time"], d["cost"] = self.time.isoformat(), f"{self.cost:f}"  # plain digits, never 1.4E-7
        d["saved"] = f"{self.saved:f}"
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> SpendRow:
        d = json.loads(text)
        d["time"], d["cost"] = datetime.fromisoformat(d["time"]), Decimal(d["cost"])
        if "saved" in d:
            d["saved"] = Decimal(d["saved"])
        return cls(**d)


_SPEND_ROW_FIELDS = tuple(f.name for f in dataclasses.fields(SpendRow))


@dataclasses.dataclass(frozen=True, slots=True)
class IfInterrupted:
    """What a reservation is settled at if its lease runs out, i.e. its process died with
    the request in flight: Tollgate cannot know what the upstream generated by then, but
    the prompt was surely sent, so the estimated input is charged and logged as
    `outcome: interrupted` rather than nothing."""

    row: SpendRow
    tokens: int

    def to_json(self) -> str:
        return f"{self.tokens}:{self.row.to_json()}"

    @classmethod
    def from_json(cls, text: str) -> IfInterrupted:
        tokens, _, row = text.partition(":")
        return cls(SpendRow.from_json(row), int(tokens))


@runtime_checkable
class Ledger(Protocol):
    # Settlements expire() made for reservations whose process died (IfInterrupted), since
    # the ledger was opened: the ledger chore exports it as a metric.
    interrupted: int

    async def reserve(
        self, request_id: str, charges: Sequence[Charge], lease_seconds: float, now: datetime,
        if_interrupted: IfInterrupted | None = None,
    ) -> ReserveResult: ...

    async def lease(
        self, lease_id: str, charges: Sequence[Charge], lease_seconds: float, now: datetime,
        give_back: bool = False,
    ) -> ReserveResult:
        """Set a quota lease (a reservation one process admits many requests from, see
        proxy.spend.quota) to `charges`, all or nothing: each block bucket is checked as
        `reserve` checks it, but without the lease's own current size, and only if all fit
        does the lease become `charges` (a zero charge drops it from that bucket).
        `give_back`: the lease shrinks to what its requests in flight hold, unchecked while
        that is no more than the lease holds now (a give-back that would grow it, because the
        lease lapsed, is checked like any sizing). Any other shrink is checked too: the spend
        of the lease's own settled requests is counted inside it until it is sized, so a
        smaller lease can still be more than is left. The
        states returned are the buckets' without this lease, fitted or refused. Renewed,
        released and expired like any reservation; a lease carries no `if_interrupted`."""
        ...

    async def settle(
        self, request_id: str, actual: Sequence[Charge], spend_row: SpendRow | None, now: datetime,
        *, fresh: bool = False,
    ) -> list[Settled]:
        """Add `actual` to the buckets' spend, write `spend_row`, and end the reservation;
        exactly once per `request_id` (a repeat returns [] and changes nothing).

        `fresh`: nothing was ever reserved under `request_id` (a request admitted from a
        quota lease, or under no budget), so there is no reservation to end, and only its
        own spend row can show it settled already (a retry whose first reply was lost). A
        ledger may skip what that makes needless; it must not trust it without a row."""
        ...

    async def release(self, request_id: str, now: datetime) -> bool: ...

    async def abandon(self, request_id: str, now: datetime) -> bool:
        """Give up a reservation whose outcome was never learned (the ledger timed out on
        it): release it if it was made, and make sure a reserve still on its way (queued in
        a hung Redis) can never make it. True if a reservation was released."""
        ...

    async def renew(self, request_ids: Sequence[str], lease_seconds: float, now: datetime) -> int:
        """Extend the leases of live reservations to `now + lease_seconds`; how many of the
        requests still held one. A lease ends only when its process stops renewing it."""
        ...

    async def expire(self, now: datetime) -> int:
        """End the reservations whose lease ran out (their process is gone); returns how
        many requests they belonged to. One made with `if_interrupted` is settled at that."""
        ...

    async def state(self, buckets: Sequence[Bucket], now: datetime) -> dict[str, BucketState]: ...

    async def spend_report(
        self, start: datetime, end: datetime, group_by: Sequence[GroupBy]
    ) -> list[dict[str, Any]]: ...

    async def budget_report(self, now: datetime) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


def check_group_by(group_by: Sequence[str]) -> list[GroupBy]:
    out: list[GroupBy] = []
    for g in group_by:
        if g not in GROUP_BY_FIELDS:
            raise ValueError(f"cannot group spend by {g!r}; choose from {', '.join(GROUP_BY_FIELDS)}")
        if g not in out:
            out.append(g)
    return out


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of `admit_and_reserve`: admitted (maybe clamped) or refused."""

    decision: Decision
    reserved: bool
    states: dict[str, BucketState]


async def admit_and_reserve(
    ledger: Ledger,
    request_id: str,
    buckets: Sequence[Bucket],
    amount: Decimal,
    *,
    tokens: int = 0,
    clamp: ClampInput | None = None,
    lease_seconds: float,
    now: datetime,
    if_interrupted: IfInterrupted | None = None,
) -> Admission:
    """Reserve the worst case; if a clamp-mode budget refuses, retry once with a lower cap.

    The fast path is one ledger round trip. The clamp is computed from the states the
    ledger returned with its refusal, and the clamped reservation is again checked
    atomically by the ledger, so a race between the two only ever refuses, never overspends.
    """
    amount_q = quantize_up(amount)
    result = await ledger.reserve(request_id, charges(buckets, amount_q, tokens), lease_seconds, now, if_interrupted)
    if result.ok:
        plain = Decision(
            True, amount_q, tokens, output_cap=clamp.output_cap if clamp else None,
            crossings=_projected(buckets, result.states, amount_q),
            soft_exceeded=_over(buckets, result.states),
        )
        return Admission(plain, True, result.states)
    decision = admit(buckets, result.states, amount, tokens=tokens, clamp=clamp)
    if not decision.admitted or not decision.clamped:
        refused = decision if not decision.admitted else Decision(
            False, amount_q, tokens, refused=result.refused,
            refused_state=result.refused_state, reason=result.reason,
        )
        return Admission(refused, False, result.states)
    retry = await ledger.reserve(
        request_id, charges(buckets, decision.amount, decision.tokens), lease_seconds, now, if_interrupted
    )
    if retry.ok:
        return Admission(decision, True, retry.states)
    return Admission(
        Decision(
            False, decision.amount, decision.tokens, output_cap=decision.output_cap,
            refused=retry.refused, refused_state=retry.refused_state, reason=retry.reason,
        ),
        False,
        retry.states,
    )


def _projected(buckets: Sequence[Bucket], states: dict[str, BucketState], amount: Decimal) -> tuple[Crossing, ...]:
    # The states after a successful reserve include this request, so it moved each warn
    # bucket from (used - amount) to used.
    out = []
    for b in buckets:
        if b.blocking or b.limit_usd is None:
            continue
        used = (states.get(b.id) or BucketState()).used
        for t in threshold_crossed(used - amount, used, b.limit_usd, b.rule.thresholds):
            out.append(Crossing(b, t, used, b.limit_usd))
    return tuple(out)


def _over(buckets: Sequence[Bucket], states: dict[str, BucketState]) -> tuple[Bucket, ...]:
    return tuple(
        b for b in buckets
        if not b.blocking and b.limit_usd is not None
        and (states.get(b.id) or BucketState()).used > b.limit_usd
    )

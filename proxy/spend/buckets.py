"""Budget rules and the arithmetic of admission: pure, no I/O, the clock is passed in.

A *rule* (YAML) names a scope, a period and limits. For one request at one instant, the
rules that apply resolve into *buckets*: one counter per (rule, resolved scope, window).
Admission reserves the worst-case cost against every applicable bucket, all or nothing;
the ledger (proxy/spend/ledger/) does that atomically and durably, and `admit` here is the
reference decision it must agree with (`exceeds` is literally shared with the SQLite ledger).

Money is `Decimal` USD everywhere. Ledgers count integer nano-USD (1e-9 USD, see
`to_nanos`): sums stay exact, fit Redis' Lua doubles exactly up to ~$9M per bucket, and
a reservation is rounded *up* so it never under-reserves.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from proxy.spend.money import format_usd, quantize_up
from proxy.spend.rules import (
    HEADER_CLAMPED,
    HEADER_FITS,
    HEADER_RESERVED,
    TEMPLATE,
    BudgetRule,
    BudgetScope,
    LimitKind,
    Period,
    window,
)

# ---------------------------------------------------------------------------------------
# Buckets


@dataclass(frozen=True, slots=True)
class Bucket:
    """One counter: a rule, resolved for a key/user, in one window."""

    id: str
    rule: BudgetRule
    start: datetime
    end: datetime | None
    key: str | None = None
    user: str | None = None
    team: str | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def blocking(self) -> bool:
        return self.rule.action == "block"

    @property
    def limit_usd(self) -> Decimal | None:
        return self.rule.limit_usd

    @property
    def limit_tokens(self) -> int | None:
        return self.rule.limit_tokens

    @property
    def limit_requests(self) -> int | None:
        return self.rule.limit_requests

    def describe(self) -> str:
        """"'daily-per-user' (user alice)": for messages."""
        parts = []
        if self.rule.scope.key is not None:
            parts.append(f"key {self.key}")
        if self.rule.scope.user is not None:
            parts.append(f"user {self.user}")
        if self.rule.scope.team is not None:
            parts.append(f"team {self.team}")
        if self.rule.scope.model is not None:
            parts.append(f"model {self.rule.scope.model}")
        return f"'{self.name}'" + (f" ({', '.join(parts)})" if parts else "")


@dataclass(frozen=True, slots=True)
class BucketState:
    """A bucket's counters: settled spend, and live (unexpired) reservations."""

    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)
    tokens: int = 0
    requests: int = 0
    reserved_tokens: int = 0
    reserved_requests: int = 0

    @property
    def used(self) -> Decimal:
        return self.spent + self.reserved


@dataclass(frozen=True, slots=True)
class Charge:
    """An amount (and tokens) put against one bucket, reserved or actual."""

    bucket: Bucket
    amount: Decimal
    tokens: int = 0


def _escape(value: str) -> str:
    # Keep ids unambiguous whatever a user string holds.
    return value.replace("%", "%25").replace("|", "%7C")


def _resolve(pattern: str | None, value: str | None) -> tuple[bool, str | None]:
    """(applies, resolved value) for a key/user scope entry."""
    if pattern is None:
        return True, None
    if value is None:
        return False, None
    if pattern == TEMPLATE:
        return True, value
    return value == pattern, value


def scope_match(
    scope: BudgetScope, key_name: str | None, user: str | None, model: str | None, team: str | None
) -> tuple[str | None, str | None, str | None] | None:
    """Whether `scope` applies to a request, and if so its resolved (key, user, team): the
    request's own value where the scope names one (or `*`), None where it names none. Rate
    limits (proxy.ratelimit) scope their counters the same way."""
    key_ok, key = _resolve(scope.key, key_name)
    user_ok, usr = _resolve(scope.user, user)
    team_ok, tm = _resolve(scope.team, team)
    if not (key_ok and user_ok and team_ok):
        return None
    if scope.model is not None and (model is None or not fnmatch.fnmatchcase(model, scope.model)):
        return None
    return key, usr, tm


def bucket_for(
    rule: BudgetRule,
    key_name: str | None,
    user: str | None,
    model: str | None,
    now: datetime,
    team: str | None = None,
) -> Bucket | None:
    """The bucket of `rule` for this request, or None when the rule does not apply."""
    matched = scope_match(rule.scope, key_name, user, model, team)
    if matched is None:
        return None
    key, usr, tm = matched
    start, end, start_text = _window_of(rule.period, rule.timezone, now)
    parts = [rule.name]
    if key is not None:
        parts.append(f"key={_escape(key)}")
    if usr is not None:
        parts.append(f"user={_escape(usr)}")
    if tm is not None:
        parts.append(f"team={_escape(tm)}")
    parts.append(start_text)
    return Bucket(id="|".join(parts), rule=rule, start=start, end=end, key=key, user=usr, team=tm)


# The last window computed per (period, timezone), with its start as text: every request
# asks for the same few, and a day, week or month window holds for every `now` inside it
# (it depends on `now` only through the local date). Hourly windows are computed each time
# (a DST shift of half an hour moves the hour boundary). One entry per pair in the config.
_WINDOWS: dict[tuple[str, str], tuple[datetime, datetime | None, str]] = {}


def _window_of(period: Period, tz: str, now: datetime) -> tuple[datetime, datetime | None, str]:
    hit = _WINDOWS.get((period, tz))
    if hit is not None and now.tzinfo is not None and hit[0] <= now and (hit[1] is None or now < hit[1]):
        return hit
    start, end = window(period, now, tz)
    fresh = (start, end, start.isoformat())
    if period != "hourly":
        _WINDOWS[(period, tz)] = fresh
    return fresh


def buckets_for(
    rules: Sequence[BudgetRule],
    key_name: str | None,
    user: str | None,
    model: str | None,
    now: datetime,
    team: str | None = None,
) -> list[Bucket]:
    """Every bucket that applies to a request by `key_name`/`user`/`team` for `model` at `now`."""
    out = []
    for rule in rules:
        bucket = bucket_for(rule, key_name, user, model, now, team)
        if bucket is not None:
            out.append(bucket)
    return out


def charges(buckets: Sequence[Bucket], amount: Decimal, tokens: int = 0) -> list[Charge]:
    """The same amount against each bucket: what admission reserves and settlement spends."""
    return [Charge(bucket=b, amount=amount, tokens=tokens) for b in buckets]


# ---------------------------------------------------------------------------------------
# Admission


def exceeds(bucket: Bucket, state: BucketState, amount: Decimal, tokens: int = 0) -> LimitKind | None:
    """Which limit reserving `amount`/`tokens` (and one request) would break, if any.

    Only the limits: whether breaking one refuses is the caller's business (`block`).
    """
    if bucket.limit_usd is not None and state.spent + state.reserved + amount > bucket.limit_usd:
        return "usd"
    if bucket.limit_tokens is not None and state.tokens + state.reserved_tokens + tokens > bucket.limit_tokens:
        return "tokens"
    if bucket.limit_requests is not None and state.requests + state.reserved_requests + 1 > bucket.limit_requests:
        return "requests"
    return None


@dataclass(frozen=True, slots=True)
class ClampInput:
    """What clamping needs to trade output tokens against money.

    The worst case is `input_cost + output_cap * outputs * output_price` (price per token,
    USD) and `input_tokens + output_cap * outputs` tokens: the cap is per output, and a
    request may ask for several (`n` choices, a batch of prompts).
    """

    input_cost: Decimal
    input_tokens: int
    output_cap: int
    output_price: Decimal
    outputs: int = 1


@dataclass(frozen=True, slots=True)
class Crossing:
    """A warning threshold that spend crossed in a bucket."""

    bucket: Bucket
    threshold: float
    used: Decimal
    limit: Decimal


@dataclass(frozen=True, slots=True)
class Decision:
    admitted: bool
    amount: Decimal  # what to reserve (quantized up to nano-USD; lowered when clamped)
    tokens: int
    output_cap: int | None = None  # the (possibly clamped) cap; None when no ClampInput
    clamped_by: Bucket | None = None
    refused: Bucket | None = None
    refused_state: BucketState | None = None
    reason: LimitKind | None = None
    crossings: tuple[Crossing, ...] = ()  # projected, for warn buckets
    soft_exceeded: tuple[Bucket, ...] = ()  # warn buckets this request takes over the limit

    @property
    def clamped(self) -> bool:
        return self.clamped_by is not None


def _max_cap(bucket: Bucket, state: BucketState, clamp: ClampInput) -> int:
    """The largest output cap that fits this bucket (negative when nothing does)."""
    cap = clamp.output_cap
    if bucket.limit_usd is not None:
        room = bucket.limit_usd - state.spent - state.reserved - clamp.input_cost
        if room < 0:
            return -1
        if clamp.output_price > 0:
            cap = min(cap, math.floor(room / (clamp.output_price * clamp.outputs)))
    if bucket.limit_tokens is not None:
        room_t = bucket.limit_tokens - state.tokens - state.reserved_tokens - clamp.input_tokens
        cap = min(cap, room_t // clamp.outputs if room_t >= 0 else -1)
    return cap


def how_to_fit(
    bucket: Bucket, state: BucketState, amount: Decimal, clamp: ClampInput | None, cap_field: str
) -> tuple[str, dict[str, str]]:
    """What a refused request would have reserved, and the output cap that fits now: a
    sentence for the 429's message and its headers. A request with no cap is reserved at
    the assumed one, which is often what a client does not know it asked for."""
    headers = {HEADER_RESERVED: f"{quantize_up(amount):f}"}
    sentence = f" This request reserves up to {format_usd(amount)}"
    if clamp is None:
        return sentence + ".", headers
    outputs = f"{clamp.outputs} x " if clamp.outputs > 1 else ""
    sentence += f" (its prompt, and {outputs}{clamp.output_cap} output tokens)"
    fits = _max_cap(bucket, state, clamp)
    if fits >= 1:
        headers[HEADER_FITS] = str(fits)
        return f"{sentence}; with {cap_field} at most {fits} it fits this budget now.", headers
    return f"{sentence}; not even its prompt fits this budget now.", headers


def bucket_state(states: Mapping[str, BucketState], bucket: Bucket) -> BucketState:
    return states.get(bucket.id) or BucketState()


def _soft(
    buckets: Sequence[Bucket], states: Mapping[str, BucketState], amount: Decimal
) -> tuple[tuple[Crossing, ...], tuple[Bucket, ...]]:
    crossings: list[Crossing] = []
    over: list[Bucket] = []
    for b in buckets:
        if b.blocking or b.limit_usd is None:
            continue
        st = bucket_state(states, b)
        after = st.used + amount
        for t in threshold_crossed(st.used, after, b.limit_usd, b.rule.thresholds):
            crossings.append(Crossing(b, t, after, b.limit_usd))
        if after > b.limit_usd:
            over.append(b)
    return tuple(crossings), tuple(over)


def admit(
    buckets: Sequence[Bucket],
    states: Mapping[str, BucketState],
    amount: Decimal,
    *,
    tokens: int = 0,
    clamp: ClampInput | None = None,
) -> Decision:
    """Decide one reservation of `amount` (and `tokens`, and one request).

    Block buckets whose spent + reserved + amount would pass a limit refuse; warn buckets
    never refuse but report projected threshold crossings. When every refusing bucket says
    `on_exceed: clamp` and `clamp` is given, the output cap is lowered to the largest that
    fits all block buckets, if that is at least the rules' `min_output_tokens`.
    """
    amount = quantize_up(amount)
    cap = clamp.output_cap if clamp is not None else None
    refusals: list[tuple[Bucket, LimitKind]] = []
    for b in buckets:
        if b.blocking:
            reason = exceeds(b, bucket_state(states, b), amount, tokens)
            if reason is not None:
                refusals.append((b, reason))
    if not refusals:
        crossings, over = _soft(buckets, states, amount)
        return Decision(True, amount, tokens, output_cap=cap, crossings=crossings, soft_exceeded=over)

    first, first_reason = refusals[0]
    refused = Decision(
        False, amount, tokens, output_cap=cap, refused=first,
        refused_state=bucket_state(states, first), reason=first_reason,
    )
    clampable = all(b.rule.on_exceed == "clamp" and r != "requests" for b, r in refusals)
    if clamp is None or not clampable:
        return refused
    new_cap = clamp.output_cap
    for b in buckets:
        if b.blocking:
            new_cap = min(new_cap, _max_cap(b, bucket_state(states, b), clamp))
    floor = max(b.rule.min_output_tokens for b, _ in refusals)
    if new_cap < floor:
        return refused
    new_amount = quantize_up(clamp.input_cost + new_cap * clamp.outputs * clamp.output_price)
    new_tokens = clamp.input_tokens + new_cap * clamp.outputs
    # The cap came from exact room in nano-USD, so this holds; checked, not assumed.
    if any(b.blocking and exceeds(b, bucket_state(states, b), new_amount, new_tokens) for b in buckets):
        return refused
    crossings, over = _soft(buckets, states, new_amount)
    return Decision(
        True, new_amount, new_tokens, output_cap=new_cap, clamped_by=first,
        crossings=crossings, soft_exceeded=over,
    )


def clamp_header(decision: Decision) -> dict[str, str]:
    """The header that tells the client its output cap was lowered, and by which budget."""
    if decision.clamped_by is None or decision.output_cap is None:
        return {}
    return {HEADER_CLAMPED: f"max_tokens={decision.output_cap}; budget={decision.clamped_by.name}"}


def threshold_crossed(
    before: Decimal, after: Decimal, limit: Decimal | None, thresholds: Sequence[float]
) -> list[float]:
    """Thresholds t with before < t*limit <= after: crossed by going from before to after."""
    if limit is None or limit <= 0:
        return []
    out = []
    for t in thresholds:
        mark = Decimal(str(t)) * limit
        if before < mark <= after:
            out.append(t)
    return out

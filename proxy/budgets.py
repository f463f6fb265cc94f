"""Budget rules and the arithmetic of admission: pure, no I/O, the clock is passed in.

A *rule* (YAML) names a scope, a period and limits. For one request at one instant, the
rules that apply resolve into *buckets*: one counter per (rule, resolved scope, window).
Admission reserves the worst-case cost against every applicable bucket, all or nothing;
the ledger (proxy/ledger/) does that atomically and durably, and `admit` here is the
reference decision it must agree with (`exceeds` is literally shared with the SQLite ledger).

Money is `Decimal` USD everywhere. Ledgers count integer nano-USD (1e-9 USD, see
`to_nanos`): sums stay exact, fit Redis' Lua doubles exactly up to ~$9M per bucket, and
a reservation is rounded *up* so it never under-reserves.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.globs import check_glob

Period = Literal["hourly", "daily", "weekly", "monthly", "total"]
Action = Literal["block", "warn"]
OnExceed = Literal["refuse", "clamp"]
# Which limit a bucket would break: money, tokens or request count.
LimitKind = Literal["usd", "tokens", "requests"]

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
NANOS_PER_USD = 10**9
TEMPLATE = "*"

# Response headers for soft limits and for clamping.
HEADER_NAME = "x-tollgate-budget-name"
HEADER_REMAINING = "x-tollgate-budget-remaining"
HEADER_RESET = "x-tollgate-budget-reset"
HEADER_CLAMPED = "x-tollgate-budget-clamped"
# On a 429: what the request would have reserved, and the largest output cap that fits now.
HEADER_RESERVED = "x-tollgate-budget-reserved"
HEADER_FITS = "x-tollgate-budget-fits-max-tokens"

# Budget names become metric labels, ledger keys and parts of bucket ids.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


# ---------------------------------------------------------------------------------------
# Money units


def to_nanos(amount: Decimal, rounding: str = ROUND_CEILING) -> int:
    """USD -> integer nano-USD. Ceiling by default: a reservation never under-reserves."""
    return int((amount * NANOS_PER_USD).to_integral_value(rounding=rounding))


def spend_nanos(amount: Decimal) -> int:
    """USD -> nano-USD for an actual cost: round half-even, no bias over many requests."""
    return to_nanos(amount, ROUND_HALF_EVEN)


def from_nanos(nanos: int) -> Decimal:
    """Integer nano-USD -> exact USD with nine decimal places."""
    return Decimal(nanos).scaleb(-9)


def quantize_up(amount: Decimal) -> Decimal:
    """The amount a ledger actually reserves for `amount`."""
    return from_nanos(to_nanos(amount))


def format_usd(amount: Decimal) -> str:
    """"$4.98", "$0.027", "$0.00015": two decimals at least, more only when they matter."""
    q = amount.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)
    text = f"{q:f}".rstrip("0")
    whole, _, frac = text.partition(".")
    frac = frac.ljust(2, "0")
    return f"${whole}.{frac}"


def iso_utc(moment: datetime) -> str:
    """ISO-8601 in UTC with a `Z`, to the second: what messages and headers show."""
    return moment.astimezone(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# ---------------------------------------------------------------------------------------
# Configuration


def _check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown IANA time zone {name!r}") from exc
    return name


class BudgetScope(BaseModel):
    """Who a rule applies to. Empty scope = global. `"*"` for key, user or team is a
    template: one bucket per key (user, team) seen in requests; a fixed value matches that
    one only. A request's team is its virtual key's `metadata.team`: the keys of one team
    share its budget, whichever of them is used."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str | None = None
    user: str | None = None
    model: str | None = None  # glob, e.g. "gpt-4o*"
    team: str | None = None

    @field_validator("key", "user", "model", "team")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave it out to match everything)")
        return value

    @field_validator("model")
    @classmethod
    def _glob(cls, value: str | None) -> str | None:
        return check_glob(value) if value is not None else None


class BudgetRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    scope: BudgetScope = BudgetScope()
    period: Period
    limit_usd: Annotated[Decimal, Field(ge=0)] | None = None
    limit_tokens: Annotated[int, Field(ge=0)] | None = None
    limit_requests: Annotated[int, Field(ge=0)] | None = None
    action: Action = "block"
    thresholds: tuple[Annotated[float, Field(gt=0, le=1)], ...] = (0.8, 1.0)
    on_exceed: OnExceed = "refuse"
    min_output_tokens: Annotated[int, Field(ge=1)] = 16
    timezone: Annotated[str, AfterValidator(_check_timezone)] = "UTC"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                "budget names are 1-64 characters of letters, digits, '_', '.', ':' or '-'"
            )
        return value

    @field_validator("limit_usd")
    @classmethod
    def _nano_precision(cls, value: Decimal | None) -> Decimal | None:
        # Ledgers count nano-USD; a finer limit could not be compared exactly.
        if value is not None and value != value.quantize(Decimal("1e-9")):
            raise ValueError("limit_usd has more than 9 decimal places")
        return value

    @field_validator("thresholds")
    @classmethod
    def _sorted_thresholds(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _has_a_limit(self) -> BudgetRule:
        if self.limit_usd is None and self.limit_tokens is None and self.limit_requests is None:
            raise ValueError("a budget needs at least one of limit_usd, limit_tokens, limit_requests")
        if self.on_exceed == "clamp" and self.action != "block":
            raise ValueError("on_exceed: clamp only makes sense with action: block")
        return self


def _unique_names(rules: tuple[BudgetRule, ...]) -> tuple[BudgetRule, ...]:
    seen: set[str] = set()
    for rule in rules:
        if rule.name in seen:
            raise ValueError(f"budget name {rule.name!r} is used twice")
        seen.add(rule.name)
    return rules


# The type of the `budgets:` section: a list of rules with unique names.
BudgetRules = Annotated[tuple[BudgetRule, ...], AfterValidator(_unique_names)]


class LedgerSettings(BaseModel):
    """Where budget state and the spend log live."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["sqlite", "redis"] = "sqlite"
    # The SQLite ledger file; with the redis backend, the local spend log.
    path: str = "./data/tollgate.db"
    redis_url: str | None = None
    lease_seconds: Annotated[float, Field(gt=0)] = 900.0
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "tollgate"
    # How long a write waits for another process's SQLite lock, or for a free Redis connection.
    busy_timeout_seconds: Annotated[float, Field(gt=0)] = 30.0
    redis_max_connections: Annotated[int, Field(ge=1, le=1024)] = 32
    # When the ledger cannot be reached (Redis down, the SQLite file unwritable) while
    # budgets apply: `fail_closed` refuses with 503 ledger_unavailable (no spend goes
    # unchecked); `fail_open` admits without a reservation, logs and counts it, and charges
    # the request's actual cost to its budgets once the ledger is back.
    on_unavailable: Literal["fail_closed", "fail_open"] = "fail_closed"

    @model_validator(mode="after")
    def _redis_needs_url(self) -> LedgerSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url is required when backend is redis")
        return self


class WebhookSettings(BaseModel):
    """Where threshold crossings are POSTed (JSON); retried with backoff, never blocking."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: Annotated[str, Field(pattern=r"^https?://\S+$")] | None = None
    timeout: Annotated[float, Field(gt=0)] = 5.0
    max_retries: Annotated[int, Field(ge=0, le=20)] = 3


# ---------------------------------------------------------------------------------------
# Windows


def _zone(tz: str | tzinfo) -> tzinfo:
    return ZoneInfo(tz) if isinstance(tz, str) else tz


def _local_midnight(year: int, month: int, day: int, zone: tzinfo) -> datetime:
    return datetime(year, month, day, tzinfo=zone).astimezone(timezone.utc)


def window(period: Period, now: datetime, tz: str | tzinfo = "UTC") -> tuple[datetime, datetime | None]:
    """The calendar window containing `now`: [start, end) in UTC; `end` is None for total.

    Days, weeks (from Monday) and months follow the wall clock of `tz`, so a daily budget
    in Europe/Berlin resets at Berlin midnight (23 or 25 hours apart across DST). Hours are
    real hours: the local minutes are cut off the instant, so a repeated DST hour is two
    windows and a +05:30 zone's hours start at :30 UTC.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if period == "total":
        return EPOCH, None
    zone = _zone(tz)
    local = now.astimezone(zone)
    if period == "hourly":
        start = now.astimezone(timezone.utc) - timedelta(
            minutes=local.minute, seconds=local.second, microseconds=local.microsecond
        )
        return start, start + timedelta(hours=1)
    if period == "daily":
        first = local.date()
        nxt = first + timedelta(days=1)
    elif period == "weekly":
        first = local.date() - timedelta(days=local.weekday())
        nxt = first + timedelta(days=7)
    elif period == "monthly":
        first = local.date().replace(day=1)
        nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
    else:
        raise ValueError(f"unknown period {period!r}")
    return (
        _local_midnight(first.year, first.month, first.day, zone),
        _local_midnight(nxt.year, nxt.month, nxt.day, zone),
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


def bucket_for(
    rule: BudgetRule,
    key_name: str | None,
    user: str | None,
    model: str | None,
    now: datetime,
    team: str | None = None,
) -> Bucket | None:
    """The bucket of `rule` for this request, or None when the rule does not apply."""
    key_ok, key = _resolve(rule.scope.key, key_name)
    user_ok, usr = _resolve(rule.scope.user, user)
    team_ok, tm = _resolve(rule.scope.team, team)
    if not (key_ok and user_ok and team_ok):
        return None
    if rule.scope.model is not None and (model is None or not fnmatch.fnmatchcase(model, rule.scope.model)):
        return None
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


def _state(states: Mapping[str, BucketState], bucket: Bucket) -> BucketState:
    return states.get(bucket.id) or BucketState()


def _soft(
    buckets: Sequence[Bucket], states: Mapping[str, BucketState], amount: Decimal
) -> tuple[tuple[Crossing, ...], tuple[Bucket, ...]]:
    crossings: list[Crossing] = []
    over: list[Bucket] = []
    for b in buckets:
        if b.blocking or b.limit_usd is None:
            continue
        st = _state(states, b)
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
            reason = exceeds(b, _state(states, b), amount, tokens)
            if reason is not None:
                refusals.append((b, reason))
    if not refusals:
        crossings, over = _soft(buckets, states, amount)
        return Decision(True, amount, tokens, output_cap=cap, crossings=crossings, soft_exceeded=over)

    first, first_reason = refusals[0]
    refused = Decision(
        False, amount, tokens, output_cap=cap, refused=first,
        refused_state=_state(states, first), reason=first_reason,
    )
    clampable = all(b.rule.on_exceed == "clamp" and r != "requests" for b, r in refusals)
    if clamp is None or not clampable:
        return refused
    new_cap = clamp.output_cap
    for b in buckets:
        if b.blocking:
            new_cap = min(new_cap, _max_cap(b, _state(states, b), clamp))
    floor = max(b.rule.min_output_tokens for b, _ in refusals)
    if new_cap < floor:
        return refused
    new_amount = quantize_up(clamp.input_cost + new_cap * clamp.outputs * clamp.output_price)
    new_tokens = clamp.input_tokens + new_cap * clamp.outputs
    # The cap came from exact room in nano-USD, so this holds; checked, not assumed.
    if any(b.blocking and exceeds(b, _state(states, b), new_amount, new_tokens) for b in buckets):
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


# ---------------------------------------------------------------------------------------
# Messages and headers


def _plural(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _humanize(seconds: float) -> str:
    """"2 minutes", "8 hours 30 minutes", "3 days 4 hours": rounded up to the minute."""
    minutes = max(1, math.ceil(seconds / 60))
    if minutes < 120:
        return _plural(minutes, "minute")
    hours, mins = divmod(minutes, 60)
    if hours < 48:
        return _plural(hours, "hour") + (f" {_plural(mins, 'minute')}" if mins else "")
    days, hours = divmod(hours, 24)
    return _plural(days, "day") + (f" {_plural(hours, 'hour')}" if hours else "")


def seconds_to_reset(bucket: Bucket, now: datetime) -> int | None:
    if bucket.end is None:
        return None
    return max(1, math.ceil((bucket.end - now).total_seconds()))


# Retry-After for a refusal that only requests in flight cause: their reservations free as
# they finish (seconds, for most), not at the period's end.
IN_FLIGHT_RETRY_AFTER_S = 2


def held_by_requests_in_flight(
    bucket: Bucket, state: BucketState, reason: LimitKind, amount: Decimal, tokens: int
) -> bool:
    """Whether the request would fit but for other requests' live reservations."""
    if not state.reserved_requests:
        return False
    if reason == "tokens":
        return bucket.limit_tokens is not None and state.tokens + tokens <= bucket.limit_tokens
    if reason == "requests":
        return bucket.limit_requests is not None and state.requests + 1 <= bucket.limit_requests
    return bucket.limit_usd is not None and state.spent + amount <= bucket.limit_usd


def refusal_message(
    bucket: Bucket, state: BucketState, now: datetime, reason: LimitKind = "usd",
    amount: Decimal | None = None, tokens: int = 0,
) -> tuple[str, int | None]:
    """The 429 message and `retry-after` seconds (None for a `total` budget: no reset).

    The message carries the reset time itself, because the OpenAI SDK does not retry when
    retry-after is over 120 s and clients should still learn when to come back. Given the
    request's own `amount` and `tokens`, a refusal that only requests in flight cause says
    so, with a retry-after of seconds.
    """
    if reason == "tokens" and bucket.limit_tokens is not None:
        used = f"{state.tokens} tokens used of the {bucket.limit_tokens}-token limit"
        if state.reserved_tokens:
            used += f" (plus {state.reserved_tokens} reserved by requests in flight)"
    elif reason == "requests" and bucket.limit_requests is not None:
        used = f"{state.requests} requests made of the {bucket.limit_requests}-request limit"
        if state.reserved_requests:
            used += f" (plus {state.reserved_requests} in flight)"
    else:
        limit = bucket.limit_usd if bucket.limit_usd is not None else Decimal(0)
        used = f"{format_usd(state.spent)} spent of the {format_usd(limit)} limit"
        if state.reserved:
            used += f" (plus {format_usd(state.reserved)} reserved by requests in flight)"
    head = f"Budget {bucket.describe()} exceeded: {used}."
    if amount is not None and held_by_requests_in_flight(bucket, state, reason, amount, tokens):
        return (
            f"{head} This request fits once requests in flight ({state.reserved_requests}) finish "
            f"and free what they reserved: retry in a few seconds.",
            IN_FLIGHT_RETRY_AFTER_S,
        )
    retry = seconds_to_reset(bucket, now)
    if bucket.end is None or retry is None:
        return f"{head} This budget has no period and does not reset.", None
    return f"{head} It resets at {iso_utc(bucket.end)} (in {_humanize(retry)}).", retry


def remaining(bucket: Bucket, state: BucketState) -> Decimal | None:
    if bucket.limit_usd is None:
        return None
    return max(Decimal(0), bucket.limit_usd - state.used)


def budget_headers(buckets: Sequence[Bucket], states: Mapping[str, BucketState], now: datetime) -> dict[str, str]:
    """`x-tollgate-budget-*` for the tightest USD budget (least remaining share of its limit)."""
    best: tuple[Decimal, Bucket, Decimal] | None = None
    for b in buckets:
        left = remaining(b, _state(states, b))
        if left is None or b.limit_usd is None:
            continue
        share = left / b.limit_usd if b.limit_usd > 0 else Decimal(0)
        if best is None or share < best[0]:
            best = (share, b, left)
    if best is None:
        return {}
    _, bucket, left = best
    return {
        HEADER_NAME: bucket.name,
        HEADER_REMAINING: f"{left.quantize(Decimal('0.000001'), rounding=ROUND_HALF_EVEN):f}",
        HEADER_RESET: iso_utc(bucket.end) if bucket.end is not None else "never",
    }


def webhook_payload(crossing: Crossing, now: datetime) -> dict[str, object]:
    """The JSON body POSTed when a threshold is first crossed in a period."""
    b = crossing.bucket
    return {
        "event": "budget.threshold_crossed",
        "time": iso_utc(now),
        "budget": b.name,
        "bucket": b.id,
        "action": b.rule.action,
        "key": b.key,
        "user": b.user,
        "team": b.team,
        "threshold": crossing.threshold,
        "spent_usd": f"{crossing.used:f}",
        "limit_usd": f"{crossing.limit:f}",
        "window_start": iso_utc(b.start),
        "window_end": iso_utc(b.end) if b.end is not None else None,
    }


__all__ = [
    "Action", "Bucket", "BucketState", "BudgetRule", "BudgetRules", "BudgetScope", "Charge",
    "ClampInput", "Crossing", "Decision", "EPOCH", "HEADER_CLAMPED", "HEADER_NAME",
    "HEADER_REMAINING", "HEADER_RESET", "LedgerSettings", "LimitKind", "OnExceed", "Period",
    "WebhookSettings", "admit", "bucket_for", "budget_headers", "buckets_for", "charges",
    "clamp_header", "exceeds", "format_usd", "from_nanos", "iso_utc", "quantize_up",
    "refusal_message", "remaining", "seconds_to_reset", "spend_nanos", "threshold_crossed",
    "to_nanos", "webhook_payload", "window",
]

"""Budget rules as configured (YAML), the ledger and webhook settings, and the period
windows a rule resolves to at an instant. Pure; the clock is passed in."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Annotated, Literal, Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.globs import check_glob
from proxy.spend.money import EPOCH

Period = Literal["hourly", "daily", "weekly", "monthly", "total"]
Action = Literal["block", "warn"]
OnExceed = Literal["refuse", "clamp"]
# Which limit a bucket would break: money, tokens or request count.
LimitKind = Literal["usd", "tokens", "requests"]

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


class _Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=_Named)


def unique_names(what: str) -> Callable[[tuple[N, ...]], tuple[N, ...]]:
    """A section validator: every rule's name is used once ("budget name 'x' is used twice")."""

    def check(rules: tuple[N, ...]) -> tuple[N, ...]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"{what} name {rule.name!r} is used twice")
            seen.add(rule.name)
        return rules

    return check


# The type of the `budgets:` section: a list of rules with unique names.
BudgetRules = Annotated[tuple[BudgetRule, ...], AfterValidator(unique_names("budget"))]


class LeasingSettings(BaseModel):
    """Quota leasing (proxy.spend.quota): admit from slices of each budget's headroom leased
    from the ledger, instead of one ledger transaction per request."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Off by default: a leased request whose process is killed mid-flight is not charged
    # its prompt (a reservation of its own is), and near a limit one process may refuse
    # while another holds an unused slice. On, a budgeted request costs no ledger call.
    enabled: bool = False
    # A lease takes this share of what is left of a budget (its limit minus everyone's
    # spend and reservations): geometric, so N processes leave (1 - share)^N of it free.
    share: Annotated[Decimal, Field(gt=0, le=Decimal("0.5"))] = Decimal("0.25")
    # A request is leased only when the slice is at least this many of its worst case;
    # below that the budget is near its edge and each request reserves on its own.
    min_requests: Annotated[int, Field(ge=1, le=10_000)] = 1
    # A lease unused this long is given back (shrunk to what its requests in flight hold),
    # so an idle process does not sit on headroom another needs.
    idle_seconds: Annotated[float, Field(gt=0, le=3600)] = 2.0


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
    leasing: LeasingSettings = LeasingSettings()

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
    return datetime(year, month, day, tzinfo=zone).astimezone(UTC)


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
        start = now.astimezone(UTC) - timedelta(
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

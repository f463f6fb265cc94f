"""Budget forecasts: where a bucket's spend ends its window at the current pace.

The pace is the window's average so far: settled spend in the window / time elapsed since
the window started (reservations in flight are not spend yet, so they do not count). It is
simple, needs nothing but the bucket, and cannot be fooled by one burst in the last minutes
the way a short recent-window rate is; the Prometheus burn-rate rules watch the short windows.

Pure: the caller passes `now`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from proxy.spend.money import from_nanos, to_nanos

# No projection before this share of the window has passed: the first minutes of a day
# (one request at 00:01 would "project" a thousand times the day's spend) say nothing.
MIN_ELAPSED_SHARE = Decimal(1) / 24

ForecastStatus = Literal["under", "over", "exceeded", "too-early", "no-period", "no-limit"]


@dataclass(frozen=True, slots=True)
class Forecast:
    status: ForecastStatus
    pace_usd_per_hour: Decimal | None = None
    projected_usd: Decimal | None = None  # spend at the window's end at this pace
    limit_at: datetime | None = None  # when the USD limit is hit at this pace, if within the window


def forecast(spent: Decimal, limit: Decimal | None, start: datetime, end: datetime | None, now: datetime) -> Forecast:
    """The forecast of a bucket that spent `spent` in [start, now) of its window [start, end).

    status: `under` (the projection stays within the limit, or there is no limit and it is
    shown anyway: `no-limit`), `over` (the limit is hit before the window ends, at
    `limit_at`), `exceeded` (already at or over it), `too-early` (less than 1/24 of the
    window has passed), `no-period` (a total budget: no end to project to; only spent and
    remaining are shown)."""
    if end is None:
        return Forecast("no-period")
    if limit is not None and spent >= limit:
        return Forecast("exceeded")
    length = Decimal(str((end - start).total_seconds()))
    elapsed = Decimal(str((now - start).total_seconds()))
    if length <= 0 or elapsed < length * MIN_ELAPSED_SHARE:
        return Forecast("too-early")
    per_second = spent / elapsed
    projected = _usd(spent * length / elapsed)
    pace = _usd(per_second * 3600)
    if limit is None:
        return Forecast("no-limit", pace, projected)
    if projected <= limit or per_second == 0:
        return Forecast("under", pace, projected)
    seconds = (limit - spent) / per_second
    hit = now + timedelta(seconds=float(seconds))
    return Forecast("over", pace, projected, min(hit, end).replace(microsecond=0))


def crossed(before: Forecast, after: Forecast) -> bool:
    """True when a settlement moved the projection from within the limit to over it (or
    straight over the limit): the moment a forecast webhook announces."""
    return before.status in ("under", "too-early") and after.status in ("over", "exceeded")


def _usd(amount: Decimal) -> Decimal:
    # Nine decimals, as the ledger's amounts; half-even, like actual spend.
    return from_nanos(to_nanos(amount, "ROUND_HALF_EVEN"))


def forecast_fields(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A budget report row plus its forecast, as `tollgate budgets` and
    `GET /v1/tollgate/budgets` both show it."""
    f = forecast(row["spent"], row.get("limit_usd"), row["window_start"], row.get("window_end"), now)
    return {
        **row,
        "forecast": f.status,
        "pace_usd_per_hour": f.pace_usd_per_hour,
        "projected_usd": f.projected_usd,
        "limit_at": f.limit_at,
    }


__all__ = ["MIN_ELAPSED_SHARE", "Forecast", "ForecastStatus", "crossed", "forecast", "forecast_fields"]

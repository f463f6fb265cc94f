"""What a budget says to a client: the 429 message, the soft-limit and clamp headers, and
the webhook payloads for a crossed threshold and a forecast that crossed the limit. Pure."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal

from proxy.spend.buckets import Bucket, BucketState, Crossing, bucket_state
from proxy.spend.forecast import Forecast
from proxy.spend.money import format_usd, iso_utc
from proxy.spend.rules import HEADER_NAME, HEADER_REMAINING, HEADER_RESET, LimitKind

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
        left = remaining(b, bucket_state(states, b))
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


def forecast_payload(bucket: Bucket, spent: Decimal, limit: Decimal, f: Forecast, now: datetime) -> dict[str, object]:
    """The JSON body POSTed when a settlement first makes the forecast project the limit to
    be hit before the window ends (`f` is the forecast after it). `projected` and
    `limit_at` are null when that settlement went straight over the limit (`exceeded`):
    there is nothing left to project."""
    return {
        "type": "budget.forecast_exceeded",
        # `event` as in the threshold webhook, so one receiver can dispatch both on one field.
        "event": "budget.forecast_exceeded",
        "time": iso_utc(now),
        "budget": bucket.name,
        "bucket": bucket.id,
        "action": bucket.rule.action,
        "scope": {"key": bucket.key, "user": bucket.user, "team": bucket.team, "model": bucket.rule.scope.model},
        "forecast": f.status,
        "spent": f"{spent:f}",
        "limit": f"{limit:f}",
        "projected": f"{f.projected_usd:f}" if f.projected_usd is not None else None,
        "limit_at": iso_utc(f.limit_at) if f.limit_at is not None else None,
        "window": {"start": iso_utc(bucket.start), "end": iso_utc(bucket.end) if bucket.end is not None else None},
    }

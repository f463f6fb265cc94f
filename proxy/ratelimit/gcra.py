"""The arithmetic of a per-minute limit: GCRA, in integers. Pure; the time is passed in.

A limit of L units (requests or tokens) per minute is a bucket that holds L units and
refills continuously at L per minute (the generic cell rate algorithm, kept as a debt
rather than a theoretical arrival time). Its state is the debt at an instant: how much of
the bucket is used. A request costing c units is admitted at `now` iff

    drained(debt, at, now) + c * SCALE <= L * SCALE

and then the debt becomes that left-hand side. So over any interval of length w, at most
L + w * L / 60 s units are admitted: a full minute's worth at once (the burst), then L per
minute. A request that costs more than L can never be admitted.

Units: a unit of debt is SCALE (the milliseconds in a minute), so a limit of L per minute
drains exactly L debt per millisecond: every number is an integer, every comparison
exact, and the Redis script (Lua doubles) agrees with Python to the unit as long as the
numbers stay below 2^53 (limits are capped at 10^9 per minute: debts below 6.1e13).
"""

from __future__ import annotations

SCALE = 60_000  # milliseconds per minute


def drained(debt: int, at_ms: int, now_ms: int, per_minute: int) -> int:
    """The debt at `now_ms` of a bucket that owed `debt` at `at_ms` (a clock that stepped
    back drains nothing)."""
    return max(0, debt - max(0, now_ms - at_ms) * per_minute)


def fits(debt: int, cost: int, per_minute: int) -> bool:
    return debt + cost * SCALE <= per_minute * SCALE


def wait_ms(debt: int, cost: int, per_minute: int) -> int | None:
    """Milliseconds until `cost` fits a bucket that owes `debt` now (0: it fits now;
    None: never, the cost is more than the whole bucket)."""
    if cost > per_minute:
        return None
    over = debt + cost * SCALE - per_minute * SCALE
    return 0 if over <= 0 else -(-over // per_minute)


def remaining(debt: int, per_minute: int) -> int:
    """Whole units that still fit now."""
    return max(0, (per_minute * SCALE - debt) // SCALE)


def reset_ms(debt: int, per_minute: int) -> int:
    """Milliseconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
    return -(-debt // per_minute)


def corrected(debt: int, delta_units: int) -> int:
    """The debt after a request's charge is corrected by `delta_units` (actual - charged):
    a refund drains it, an overrun adds to it; never below empty."""
    return max(0, debt + delta_units * SCALE)


def retry_after_s(wait: int) -> int:
    """`Retry-After` in whole seconds, rounded up: by then the request fits."""
    return max(1, -(-wait // 1000))


def duration_text(ms: int) -> str:
    """A duration as OpenAI writes `x-ratelimit-reset-*`: "0s", "250ms", "1.5s", "6m0s",
    "1h2m3s" (Go's time.Duration format, at millisecond precision)."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    sec = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") if millis else str(seconds)
    if hours:
        return f"{hours}h{minutes}m{sec}s"
    if minutes:
        return f"{minutes}m{sec}s"
    return f"{sec}s"

"""Durable budget state: the `Ledger` interface and its SQLite and Redis backends.

`open_ledger(settings)` picks the backend from `LedgerSettings` and sweeps expired
reservations once at start (a crashed instance's leases); the app should call
`ledger.expire(now)` periodically too.
"""

from __future__ import annotations

from datetime import UTC, datetime

from proxy.spend.budgets import LedgerSettings
from proxy.spend.ledger.base import (
    Admission,
    DuplicateReservation,
    GroupBy,
    IfInterrupted,
    Ledger,
    LedgerError,
    ReserveResult,
    Settled,
    SpendRow,
    admit_and_reserve,
)


async def open_ledger(settings: LedgerSettings, now: datetime | None = None) -> Ledger:
    ledger: Ledger
    if settings.backend == "redis":
        from proxy.spend.ledger.redis import RedisLedger

        if settings.redis_url is None:  # the settings validator already insists
            raise LedgerError("redis_url is required when backend is redis")
        ledger = await RedisLedger.open(
            settings.redis_url, settings.path, settings.key_prefix,
            settings.busy_timeout_seconds, settings.redis_max_connections,
            pending_grace_seconds=settings.lease_seconds,
        )
    else:
        from proxy.spend.ledger.sqlite import SqliteLedger

        ledger = await SqliteLedger.open(settings.path, settings.busy_timeout_seconds)
    await ledger.expire(now or datetime.now(UTC))
    return ledger


__all__ = [
    "Admission",
    "DuplicateReservation",
    "GroupBy",
    "IfInterrupted",
    "Ledger",
    "LedgerError",
    "ReserveResult",
    "Settled",
    "SpendRow",
    "admit_and_reserve",
    "open_ledger",
]

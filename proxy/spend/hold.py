"""What admission hands the rest of the pipeline: an `Admission`, and the `Hold` it made.

A hold is reserved money (and tokens) against every budget that applied. It ends exactly
once, by `Spend.settle` (replaced by what was actually spent) or `Spend.release` (dropped:
the request never left Tollgate); both are idempotent, and a hold that is neither is
still ended by its lease running out (see `Spend`'s chores), so it cannot be forgotten.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from proxy.ratelimit.limiter import Grant
from proxy.spend.buckets import Bucket
from proxy.spend.ledger import DuplicateReservation, LedgerError
from proxy.spend.quota import Draw


@dataclass(slots=True, eq=False)
class Hold:
    """What admission reserved, so settlement can replace it exactly once."""

    ledger_id: str
    buckets: list[Bucket]
    amount: Decimal
    reserved: bool
    # Admitted without a reservation because the ledger was down (fail_open): settlement
    # charges the actual cost to `buckets` all the same, when the ledger is back if need be.
    charge_on_settle: bool = False
    # Admitted from this process's quota leases (proxy.spend.quota), not reserved on its
    # own: settlement charges the actual cost to `buckets` and gives the leases back
    # their worst case once the ledger has it.
    draw: Draw | None = None
    # Set when the hold is settled or released; the task doing it (awaited by a response
    # that must not look complete before it is charged).
    ending: asyncio.Task[Any] | None = None


@dataclass(frozen=True, slots=True)
class Admission:
    """Admission's verdict for one request that was let through.

    `hold` is None when no budget applies. `cap_override` is (field, cap) when the body
    must carry a (lower) output cap for the upstream to hold to what was reserved;
    `headers` go on the client's response. `grant` is what the rate limits charged
    (proxy.throttle), None when none applies.
    """

    hold: Hold | None = None
    cap_override: tuple[str, int] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    grant: Grant | None = None


NOT_ADMITTED = Admission()


# Ledger ids: the request id (a client's can repeat) plus this process's random tag and a
# counter, so unique per admission across requests, workers and restarts without a
# getrandom() call per request. A forked worker draws its own tag.
_ledger_tag = ""
_ledger_counter = itertools.count()


def _new_ledger_tag() -> None:
    global _ledger_tag, _ledger_counter
    _ledger_tag = os.urandom(6).hex()
    _ledger_counter = itertools.count()


_new_ledger_tag()
os.register_at_fork(after_in_child=_new_ledger_tag)


def new_ledger_id(request_id: str) -> str:
    return f"{request_id}:{_ledger_tag}{next(_ledger_counter):x}"


# Failures that mean the ledger's storage is unreachable or unwritable, not a bug.
LEDGER_DOWN: tuple[type[BaseException], ...] = (LedgerError, sqlite3.Error, OSError, TimeoutError)


def ledger_down(exc: BaseException) -> bool:
    return isinstance(exc, LEDGER_DOWN) and not isinstance(exc, DuplicateReservation)

"""The budget-integrity suite (tests/integrity/run.py) as CI runs it: the Redis set-up, which
meets every fault (kill -9 of a proxy, SIGSTOP and SIGKILL of Redis), at 300 requests all in
flight at once. The three set-ups at 600 are `python -m tests.integrity.run`."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from tests.integrity.run import LIMIT, run_setup


async def test_budgets_hold_under_faults_at_300_concurrent_requests(tmp_path: Path) -> None:
    report = await run_setup("redis2", 300, 300, 20261205, tmp_path)
    print(f"integrity: {report}")
    assert report["problems"] == []
    assert len(report["faults"]) == 3
    # The budget was spent (the traffic asked for more than the limit), never overspent.
    assert LIMIT / 2 < Decimal(report["ledger_spent_usd"]) <= LIMIT
    assert report["reserved_left"].startswith("0.000000000 (0 requests)")


async def test_budgets_hold_under_faults_with_quota_leasing_on(tmp_path: Path) -> None:
    # The same traffic and faults with every instance admitting from quota leases: the
    # leases are reservations the ledger counts, so nothing may change in the books.
    report = await run_setup("redis2", 300, 300, 20261206, tmp_path, leasing=True)
    print(f"integrity, leasing: {report}")
    assert report["problems"] == []
    assert len(report["faults"]) == 3
    assert LIMIT / 2 < Decimal(report["ledger_spent_usd"]) <= LIMIT
    assert report["reserved_left"].startswith("0.000000000 (0 requests)")

"""Quota leasing (ledger.leasing): budgeted requests admitted from per-process slices of each
budget's headroom, with no ledger transaction of their own, and never past the limit.

The HTTP tests drive a real proxy with the openai SDK; the simulation drives several
processes' `QuotaBook`s against one real SQLite ledger with random interleavings and checks
the invariant at every step.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.spend.budgets import Bucket, BudgetRule, Charge, bucket_for
from proxy.spend.ledger.sqlite import SqliteLedger
from proxy.spend.quota import Draw, QuotaBook, lease_target
from proxy.spend.rules import LeasingSettings
from tests.integration.conftest import StartProxy
from tests.integration.test_budgets_e2e import ask, bucket, budget_yaml, config, echo_cap, log_records, sdk, settled
from tests.support.fake_upstream import FakeUpstream

D = Decimal


def leasing(tmp: Path) -> str:
    return f"ledger: {{path: '{tmp / 'ledger.db'}', leasing: {{enabled: true, idle_seconds: 0.2}}}}\n"


def dollar_rule(limit: str) -> str:
    return f"  - name: budget\n    period: daily\n    limit_usd: {limit}\n"


async def test_leased_requests_make_no_ledger_reservation_and_are_all_charged(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path
) -> None:
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(dollar_rule("10")) + leasing(tmp_path)))
    ledger = proxy.runtime.spend.ledger
    reserves = 0
    real_reserve = ledger.reserve

    async def counting_reserve(*args: Any, **kw: Any) -> Any:
        nonlocal reserves
        reserves += 1
        return await real_reserve(*args, **kw)

    ledger.reserve = counting_reserve  # type: ignore[method-assign]
    client = sdk(proxy)
    rng = random.Random(7)
    caps = [rng.randint(1, 40) for _ in range(60)]
    for i in range(0, len(caps), 6):  # six at a time
        await asyncio.gather(*(client.chat.completions.create(**ask(c)) for c in caps[i : i + 6]))
    quota = proxy.runtime.spend.quota
    # Every request was admitted from a lease: not one per-request reservation, and the
    # leases were sized a handful of times (a quarter of the headroom each), not per request.
    assert reserves == 0
    assert quota.sizings <= 8, quota.sizings
    report = await settled(proxy, len(caps))  # waits for the idle leases to be given back
    costs = [D(r["cost_usd"]) for r in log_records(proxy)]
    assert sum(costs) == D(sum(caps)) / 1000 == bucket(report, "budget")["spent"]
    assert bucket(report, "budget")["requests"] == len(caps)
    assert bucket(report, "budget")["reserved"] == 0


async def test_at_the_edge_each_request_reserves_alone_and_the_limit_is_met_exactly(
    start_proxy: StartProxy, fake_openai: FakeUpstream, tmp_path: Path
) -> None:
    # $0.001 a request (1 output token at $1000/M): exactly ten fit in $0.01.
    fake_openai.route("POST", "/v1/chat/completions", echo_cap)
    proxy = await start_proxy(config(fake_openai.api_base, extra=budget_yaml(dollar_rule("0.01")) + leasing(tmp_path)))
    client = sdk(proxy)  # which does not retry
    for _ in range(10):
        await client.chat.completions.create(**ask(1))
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(**ask(1))
    assert refused.value.code == "budget_exceeded"
    report = await settled(proxy, 10)
    assert bucket(report, "budget")["spent"] == D("0.01")
    assert bucket(report, "budget")["reserved"] == 0


# --- the simulation: several processes' books against one real ledger -------------------


NOW = datetime(2026, 1, 5, 12, tzinfo=UTC)
LIMIT = D("5")


@dataclass
class InFlight:
    book: QuotaBook
    ledger_id: str
    amount: Decimal
    draw: Draw | None


def make_bucket() -> Bucket:
    rule = BudgetRule.model_validate({"name": "sim", "period": "daily", "limit_usd": str(LIMIT)})
    b = bucket_for(rule, None, None, None, NOW)
    assert b is not None
    return b


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_simulated_processes_never_admit_past_the_limit(tmp_path: Path, seed: int) -> None:
    """Three processes (books), each with its own connection to one ledger file, run
    interleaved clients that admit (from a lease, else alone), then settle at the full worst
    case (so any over-admission would show as spend past the limit) or release. At every
    step: settled spend + the worst cases still in flight <= the limit."""
    rng = random.Random(seed)
    path = tmp_path / "ledger.db"
    ledgers = [await SqliteLedger.open(path) for _ in range(3)]
    books = [QuotaBook(LeasingSettings(enabled=True, idle_seconds=0.01), 60.0) for _ in range(3)]
    b = make_bucket()
    in_flight: dict[str, InFlight] = {}
    admitted = refused = 0
    counter = 0

    async def check() -> None:
        st = (await ledgers[0].state([b], NOW))[b.id]
        assert st.spent + sum(f.amount for f in in_flight.values()) <= LIMIT

    async def client(n: int) -> None:
        nonlocal admitted, refused, counter
        for _ in range(n):
            i = rng.randrange(3)
            book, ledger = books[i], ledgers[i]
            amount = D(rng.randint(1, 400)) / 1000
            counter += 1
            lid = f"r{counter}"
            draw = await book.draw(ledger, [b], amount, 0, NOW)
            if draw is None:
                r = await ledger.reserve(lid, [Charge(b, amount)], 60.0, NOW)
                if not r.ok:
                    refused += 1
                    continue
            admitted += 1
            in_flight[lid] = InFlight(book, lid, amount, draw)
            await asyncio.sleep(0)
            await check()
            f = in_flight[lid]
            if rng.random() < 0.1:
                del in_flight[lid]
                if f.draw is not None:
                    QuotaBook.released(f.draw)
                else:
                    await ledger.release(lid, NOW)
                continue
            # Settled at the whole worst case: an over-admission cannot hide in slack.
            if f.draw is not None:
                QuotaBook.settling(f.draw, amount, 0)
            await ledger.settle(lid, [Charge(b, amount)], None, NOW)
            del in_flight[lid]
            if f.draw is not None:
                QuotaBook.landed(f.draw, amount, 0)
            if rng.random() < 0.05:
                await book.give_back(ledger, NOW)

    try:
        await asyncio.gather(*(client(120) for _ in range(6)))
        await check()
        for book, ledger in zip(books, ledgers, strict=True):
            await asyncio.sleep(0.02)
            await book.give_back(ledger, NOW)
        st = (await ledgers[0].state([b], NOW))[b.id]
        assert st.spent <= LIMIT and st.reserved == 0
        # The budget was used, not starved by leases: most of it was spent.
        assert st.spent > LIMIT - D("0.5"), (st.spent, admitted, refused)
        assert refused > 0
    finally:
        for ledger in ledgers:
            await ledger.close()


# --- the slice arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("others", "held", "want", "expected"),
    [
        (D("0"), D("0"), D("0.1"), D("2.5")),  # a quarter of $10
        (D("6"), D("1"), D("0.1"), D("1") + D("0.75")),  # held + a quarter of what is left
        (D("9.5"), D("0"), D("0.2"), None),  # a quarter of 0.5 < 0.2: the edge
        (D("9.6"), D("0.3"), D("0.025"), D("0.3") + D("0.025")),
        (D("10"), D("0"), D("0.000000001"), None),  # nothing left
    ],
)
def test_lease_target(others: Decimal, held: Decimal, want: Decimal, expected: Decimal | None) -> None:
    assert lease_target(D("10"), others, held, want, D("0.25"), 1) == expected


def test_lease_target_is_floored_to_the_nano_and_never_exceeds_the_limit() -> None:
    rng = random.Random(5)
    for _ in range(2000):
        limit = D(rng.randint(1, 10**7)) / 10**6
        others = min(limit, D(rng.randint(0, 10**7)) / 10**6)
        held = min(limit - others, D(rng.randint(0, 10**6)) / 10**6)
        want = D(rng.randint(1, 10**6)) / 10**7
        got = lease_target(limit, others, held, want, D("0.25"), 1)
        if got is None:
            assert (limit - others - held) * D("0.25") < want + D("1e-9")
        else:
            assert got.as_tuple().exponent >= -9
            assert held + want <= got <= others + held + (limit - others - held) and others + got <= limit


async def test_no_request_is_taken_from_a_lease_while_it_is_given_back(tmp_path: Path) -> None:
    # The give-back sends the ledger what is held when it starts; a request taken while the
    # ledger works on it would hold money the shrunk lease no longer covers.
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        book = QuotaBook(LeasingSettings(enabled=True, idle_seconds=0.01), 60.0)
        b = make_bucket()
        first = await book.draw(ledger, [b], D("0.1"), 0, NOW)
        assert first is not None
        QuotaBook.released(first)
        (lease,) = book.leases.values()
        assert lease.granted > 0 and lease.held == 0
        lease.used_at = 0.0  # idle for long
        giving = asyncio.create_task(book.give_back(ledger, NOW))
        await asyncio.sleep(0)  # the give-back is now waiting on the ledger
        assert book.take([b], D("0.1"), 0) is None
        assert await giving == 1
        assert (lease.granted, lease.held) == (0, 0)
        st = (await ledger.state([b], NOW))[b.id]
        assert st.reserved == 0
    finally:
        await ledger.close()

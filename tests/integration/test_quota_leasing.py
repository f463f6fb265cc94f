"""Quota leasing (ledger.leasing): budgeted requests admitted from per-process slices of each
budget's headroom, with no ledger transaction of their own, and never past the limit.

The HTTP tests drive a real proxy with the openai SDK; the simulation drives several
processes' `QuotaBook`s against one real SQLite ledger with random interleavings and checks
the invariant at every step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy.spend.budgets import Bucket, BudgetRule, Charge, bucket_for
from proxy.spend.ledger import LedgerError
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
    freshness: list[bool] = []
    real_settle = ledger.settle

    async def noting_settle(*args: Any, fresh: bool = False, **kw: Any) -> Any:
        freshness.append(fresh)
        return await real_settle(*args, fresh=fresh, **kw)

    ledger.settle = noting_settle  # type: ignore[method-assign]
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
    # Their ids were never reserved: each settles as fresh (the row, then the spend).
    assert freshness == [True] * len(caps)
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


# --- the ledger failing, lapsing or racing a lease (each of these failed before its fix) --


async def _book_with_free_lease(ledger: SqliteLedger, amount: Decimal) -> tuple[QuotaBook, Any]:
    """A book whose lease on the $5 bucket holds `amount`, all of it free, idle."""
    b = make_bucket()
    book = QuotaBook(LeasingSettings(enabled=True, idle_seconds=0.01), 60.0)
    d = await book.draw(ledger, [b], amount, 0, NOW)
    assert d is not None and book.leases[b.id].granted == amount
    QuotaBook.released(d)
    book.leases[b.id].used_at -= 10  # idle for longer than idle_seconds
    return book, b


async def test_a_take_during_an_idle_give_back_is_covered_by_the_ledger(tmp_path: Path) -> None:
    """A request arriving while an idle lease is given back is not admitted from its old
    size: the size sent to the ledger is what was held when the give-back began."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        book, b = await _book_with_free_lease(ledger, D("1"))
        lease = book.leases[b.id]
        chore = asyncio.create_task(book.give_back(ledger, NOW))
        await asyncio.sleep(0)  # the chore computed size=(0, 0) and awaits the ledger
        taken = await book.draw(ledger, [b], D("1"), 0, NOW)  # a request arriving now
        await chore
        assert taken is not None  # admitted from the lease, in memory
        # The book must never hold more worst cases than the ledger holds for it.
        assert lease.granted >= lease.held, (lease.granted, lease.held)
        # What the ledger sees: nothing reserved, so another process gets the whole limit
        # while $1 is in flight from this one.
        other = await ledger.reserve("other", [Charge(b, LIMIT)], 60.0, NOW)
        assert not other.ok, "settled 0 + in flight $1 (leased) + $5 (reserved) > $5 limit"
    finally:
        await ledger.close()


async def with_lease_replies_lost(ledger: SqliteLedger, call: Callable[[], Awaitable[Any]]) -> None:
    """Run `call` while the ledger applies every lease sizing but its reply is lost (a Redis
    socket timeout); the LedgerError that reaches `call`'s caller is swallowed, as the
    chores and admission do."""
    real = ledger.lease

    async def reply_lost(*args: Any, **kw: Any) -> Any:
        await real(*args, **kw)
        raise LedgerError("redis ledger: Timeout reading from socket")

    ledger.lease = reply_lost  # type: ignore[method-assign]
    try:
        await call()
    except LedgerError:
        pass
    finally:
        ledger.lease = real  # type: ignore[method-assign]


async def test_a_shrink_whose_reply_is_lost_does_not_leave_the_book_above_the_ledger(tmp_path: Path) -> None:
    """A give-back that the ledger applied but whose reply was lost (a Redis socket timeout,
    a script queued in a hung Redis): the book takes the smaller size, never the old one."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        book, b = await _book_with_free_lease(ledger, D("1"))
        await with_lease_replies_lost(ledger, lambda: book.give_back(ledger, NOW))  # the chore logs and carries on
        taken = await book.draw(ledger, [b], D("1"), 0, NOW)
        other = await ledger.reserve("other", [Charge(b, LIMIT)], 60.0, NOW)
        assert not (taken is not None and other.ok), "$1 leased + $5 reserved against a $5 limit"
    finally:
        await ledger.close()


async def test_within_one_process_a_request_that_fits_is_not_refused_by_its_own_lease(tmp_path: Path) -> None:
    """Two budgets, one at its edge: before the request reserves on its own, this process's
    lease on the other gives back its free part, which would otherwise count against it
    (within one process, admission is as exact as without leasing)."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        rule_a = BudgetRule.model_validate({"name": "team", "period": "daily", "limit_usd": "1"})
        rule_b = BudgetRule.model_validate({"name": "key", "period": "daily", "limit_usd": "1"})
        a, b = bucket_for(rule_a, None, None, None, NOW), bucket_for(rule_b, None, None, None, NOW)
        assert a is not None and b is not None
        await ledger.settle("earlier", [Charge(b, D("0.2"))], None, NOW)  # key budget: $0.2 spent
        book = QuotaBook(LeasingSettings(enabled=True), 60.0)
        # Traffic under the team budget alone leaves it a lease of $0.6, now free.
        d = await book.draw(ledger, [a], D("0.6"), 0, NOW)
        assert d is not None
        QuotaBook.released(d)
        # A small request under the key budget sizes its lease once (others now known).
        d = await book.draw(ledger, [b], D("0.1"), 0, NOW)
        assert d is not None
        QuotaBook.released(d)
        # A $0.6 request under both: the key budget is at its edge for it (a quarter of $0.8
        # < $0.6), so it reserves on its own -- and fits both budgets: team $0 + 0.6 <= 1,
        # key $0.2 + 0.6 <= 1, nothing else in flight anywhere.
        assert await book.draw(ledger, [a, b], D("0.6"), 0, NOW) is None
        alone = await ledger.reserve("r", [Charge(a, D("0.6")), Charge(b, D("0.6"))], 60.0, NOW)
        assert alone.ok, f"refused by {alone.refused.name if alone.refused else None}: its own process's idle lease"
    finally:
        await ledger.close()


async def test_a_lapsed_lease_is_not_drawn_from(tmp_path: Path) -> None:
    """Renewals that fail for two thirds of a lease (this process cut off from Redis while
    another instance's chore sweeps): nothing more is admitted from the lease until a
    checked sizing confirms it."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        book, b = await _book_with_free_lease(ledger, D("1"))
        later = NOW + timedelta(seconds=120)  # two leases later, no renewal got through
        assert await ledger.expire(later) == 1  # another process's chore sweeps it
        book.leases[b.id].valid_until -= 40  # what two thirds of the 60 s lease did here
        taken = book.take([b], D("1"), 0)
        other = await ledger.reserve("other", [Charge(b, LIMIT)], 60.0, later)
        assert not (taken is not None and other.ok), "$1 leased + $5 reserved against a $5 limit"
    finally:
        await ledger.close()


async def test_a_grow_whose_reply_is_lost_is_given_back(tmp_path: Path) -> None:
    """A grow the ledger applied but whose reply was lost: the book does not know whether
    the ledger holds it, so the chores give it back (and renew it meanwhile) rather than
    leave the headroom reserved until the lease runs out."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        b = make_bucket()
        book = QuotaBook(LeasingSettings(enabled=True, idle_seconds=0.01), 60.0)
        # Admission falls back to a reserve.
        await with_lease_replies_lost(ledger, lambda: book.draw(ledger, [b], D("2"), 0, NOW))
        for lease in book.leases.values():
            lease.used_at -= 10
        await book.give_back(ledger, NOW)  # the chore, idle_seconds later
        assert book.lease_ids() == []  # not renewed either
        st = (await ledger.state([b], NOW))[b.id]
        assert st.reserved == 0, f"{st.reserved} left reserved for a lease the book does not know it holds"
    finally:
        await ledger.close()


async def test_a_give_back_never_grows_a_lease(tmp_path: Path) -> None:
    """A give-back is unchecked only while it shrinks the lease: one that would grow it
    (the lease lapsed, or holds less than is in flight) is checked like any sizing."""
    ledger = await SqliteLedger.open(tmp_path / "ledger.db")
    try:
        b = make_bucket()
        assert (await ledger.reserve("x", [Charge(b, LIMIT)], 60.0, NOW)).ok  # the budget is full
        r = await ledger.lease("L", [Charge(b, D("1"))], 60.0, NOW, give_back=True)
        st = (await ledger.state([b], NOW))[b.id]
        assert not r.ok or st.spent + st.reserved <= LIMIT, (r.ok, st)
    finally:
        await ledger.close()

"""The SQLite ledger against a real file, and the contract both ledgers must keep.

The `test_contract_*` functions take a `make_ledger` fixture (a factory of ledger instances
sharing one store) and are imported by test_ledger_redis.py, which supplies its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import multiprocessing
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from proxy.spend.budgets import (
    Bucket,
    BucketState,
    BudgetRule,
    Charge,
    ClampInput,
    LedgerSettings,
    admit,
    bucket_for,
    buckets_for,
    charges,
    threshold_crossed,
)
from proxy.spend.ledger import (
    DuplicateReservation,
    IfInterrupted,
    Ledger,
    SpendRow,
    admit_and_reserve,
    open_ledger,
    sqlite_db,
)
from proxy.spend.ledger.sqlite import OPEN_BUCKETS_SQL, SqliteLedger
from proxy.spend.ledger.sqlite_db import GROUP_TURNS, SqliteDb
from proxy.usage import Usage

D = Decimal
UTC = UTC
NOW = datetime(2026, 11, 23, 15, 30, tzinfo=UTC)
LEASE = 60.0

MakeLedger = Callable[[], Awaitable[Ledger]]


def rule(**kw: Any) -> BudgetRule:
    return BudgetRule.model_validate({"name": "r", "period": "daily", "limit_usd": "1", **kw})


def one(
    r: BudgetRule, *, key: str | None = None, user: str | None = None, model: str | None = None,
    now: datetime = NOW,
) -> Bucket:
    b = bucket_for(r, key, user, model, now)
    assert b is not None
    return b


def row(request_id: str, *, time: datetime = NOW, key: str | None = "k1", user: str | None = "alice",
        model: str = "gpt-4o-mini", cost: str = "0.01", output: int = 10, team: str | None = None,
        key_metadata: dict[str, str] | None = None, body_sha256: str | None = None,
        finish_reason: str | None = None) -> SpendRow:
    return SpendRow.from_usage(
        Usage(input_tokens=100, output_tokens=output, cached_input_tokens=20, reasoning_tokens=3,
              input_source="upstream", output_source="upstream"),
        D(cost),
        time=time, request_id=request_id, key=key, user=user, model=model,
        upstream="openai", endpoint="chat.completions", outcome="ok", status=200,
        team=team, key_metadata=key_metadata, body_sha256=body_sha256, finish_reason=finish_reason,
    )


@pytest.fixture
async def make_ledger(tmp_path: Path) -> AsyncIterator[MakeLedger]:
    opened: list[Ledger] = []

    async def make() -> Ledger:
        ledger = await SqliteLedger.open(tmp_path / "data" / "tollgate.db")
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        await ledger.close()


# --- the contract (both backends) ---------------------------------------------------------


async def test_contract_reserve_settle_release(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    r = await ledger.reserve("a", [Charge(b, D("0.4"), 100)], LEASE, NOW)
    assert r.ok and r.refused is None
    assert r.states[b.id] == BucketState(reserved=D("0.4"), reserved_tokens=100, reserved_requests=1)
    r = await ledger.reserve("b", [Charge(b, D("0.4"))], LEASE, NOW)
    assert r.ok and r.states[b.id].reserved == D("0.8")

    settled = await ledger.settle("a", [Charge(b, D("0.25"), 90)], row("a", cost="0.25"), NOW)
    assert settled[0].bucket_id == b.id
    assert (settled[0].spent_before, settled[0].spent_after) == (D("0"), D("0.25"))
    st = (await ledger.state([b], NOW))[b.id]
    assert st == BucketState(spent=D("0.25"), reserved=D("0.4"), tokens=90, requests=1, reserved_requests=1)

    assert await ledger.release("b", NOW) is True
    assert await ledger.release("b", NOW) is False
    st = (await ledger.state([b], NOW))[b.id]
    assert st == BucketState(spent=D("0.25"), tokens=90, requests=1)


async def test_contract_refusal_reports_the_bucket_and_its_state(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    assert (await ledger.reserve("a", [Charge(b, D("0.7"))], LEASE, NOW)).ok
    r = await ledger.reserve("b", [Charge(b, D("0.300000001"))], LEASE, NOW)
    assert not r.ok and r.refused == b and r.reason == "usd"
    assert r.refused_state == BucketState(reserved=D("0.7"), reserved_requests=1)
    assert (await ledger.reserve("c", [Charge(b, D("0.3"))], LEASE, NOW)).ok  # exactly the limit


async def test_contract_all_or_nothing_across_buckets(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    roomy, tight = one(rule(name="roomy", limit_usd="10")), one(rule(name="tight", limit_usd="1"))
    soft = one(rule(name="soft", action="warn", limit_usd="0.1"))
    assert (await ledger.reserve("a", charges([roomy, tight, soft], D("0.9")), LEASE, NOW)).ok
    r = await ledger.reserve("b", charges([roomy, tight, soft], D("0.2")), LEASE, NOW)
    assert not r.ok and r.refused == tight
    states = await ledger.state([roomy, tight, soft], NOW)
    # Nothing of the refused request was recorded anywhere; the warn bucket never refused.
    assert {k: v.reserved for k, v in states.items()} == {roomy.id: D("0.9"), tight.id: D("0.9"), soft.id: D("0.9")}
    assert (await ledger.reserve("c", charges([roomy, soft], D("5")), LEASE, NOW)).ok


async def test_contract_token_and_request_limits(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd=None, limit_tokens=1000, limit_requests=2))
    assert (await ledger.reserve("a", [Charge(b, D("0"), 600)], LEASE, NOW)).ok
    r = await ledger.reserve("b", [Charge(b, D("0"), 401)], LEASE, NOW)
    assert not r.ok and r.reason == "tokens"
    assert (await ledger.reserve("c", [Charge(b, D("0"), 400)], LEASE, NOW)).ok
    r = await ledger.reserve("d", [Charge(b, D("0"), 0)], LEASE, NOW)
    assert not r.ok and r.reason == "requests"
    await ledger.settle("a", [Charge(b, D("0"), 10)], None, NOW)
    await ledger.release("c", NOW)
    st = (await ledger.state([b], NOW))[b.id]
    assert (st.tokens, st.requests, st.reserved_tokens, st.reserved_requests) == (10, 1, 0, 0)
    assert (await ledger.reserve("e", [Charge(b, D("0"), 990)], LEASE, NOW)).ok
    assert not (await ledger.reserve("f", [Charge(b, D("0"), 0)], LEASE, NOW)).ok


async def test_contract_settle_is_idempotent(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    await ledger.reserve("a", [Charge(b, D("0.5"))], LEASE, NOW)
    first = await ledger.settle("a", [Charge(b, D("0.2"))], row("a", cost="0.2"), NOW)
    again = await ledger.settle("a", [Charge(b, D("0.2"))], row("a", cost="0.2"), NOW)
    assert len(first) == 1 and again == []
    st = (await ledger.state([b], NOW))[b.id]
    assert (st.spent, st.reserved, st.requests) == (D("0.2"), D("0"), 1)
    report = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), [])
    assert report == [{"requests": 1, "input_tokens": 100, "cached_input_tokens": 20,
                       "output_tokens": 10, "reasoning_tokens": 3, "cost": D("0.2")}]
    with pytest.raises(DuplicateReservation):
        await ledger.reserve("a", [Charge(b, D("0.1"))], LEASE, NOW)


async def test_contract_a_fresh_settlement_is_exactly_once(make_ledger: MakeLedger) -> None:
    """A settlement under an id never reserved (a request admitted from a quota lease): its
    spend row is its only marker, and a retry whose first reply was lost, fresh or not,
    charges nothing twice. Without a row, `fresh` changes nothing."""
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    first = await ledger.settle("f", [Charge(b, D("0.2"))], row("f", cost="0.2"), NOW, fresh=True)
    again = await ledger.settle("f", [Charge(b, D("0.2"))], row("f", cost="0.2"), NOW, fresh=True)
    plain = await ledger.settle("f", [Charge(b, D("0.2"))], row("f", cost="0.2"), NOW)
    assert len(first) == 1 and again == [] and plain == []
    rowless = await ledger.settle("g", [Charge(b, D("0.1"))], None, NOW, fresh=True)
    assert len(rowless) == 1 and await ledger.settle("g", [Charge(b, D("0.1"))], None, NOW, fresh=True) == []
    st = (await ledger.state([b], NOW))[b.id]
    assert (st.spent, st.reserved, st.requests) == (D("0.3"), D("0"), 2)
    report = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), [])
    assert [r["requests"] for r in report] == [1]
    for settled_id in ("f", "g"):
        with pytest.raises(DuplicateReservation):
            await ledger.reserve(settled_id, [Charge(b, D("0.1"))], LEASE, NOW)


async def test_contract_spend_rows_are_keyed_by_the_settlement_not_the_clients_request_id(
    make_ledger: MakeLedger,
) -> None:
    """A client may send the same x-request-id on every call: each settlement (its own
    ledger id) is a row of its own, and only a retried settlement is not."""
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    for i in range(5):
        await ledger.reserve(f"same:{i}", [Charge(b, D("0.1"))], LEASE, NOW)
        await ledger.settle(f"same:{i}", [Charge(b, D("0.03"))], row("same", cost="0.03"), NOW)
    await ledger.settle("same:4", [Charge(b, D("0.03"))], row("same", cost="0.03"), NOW)  # a retry
    await ledger.settle("free:1", [], row("same", cost="0.01"), NOW)  # no budget applied
    await ledger.settle("free:1", [], row("same", cost="0.01"), NOW)
    st = (await ledger.state([b], NOW))[b.id]
    assert (st.spent, st.requests) == (D("0.15"), 5)
    report = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), [])
    assert [(r["requests"], r["cost"]) for r in report] == [(6, D("0.16"))]


async def test_contract_renewed_leases_outlive_their_first_end(make_ledger: MakeLedger) -> None:
    ledger, other = await make_ledger(), await make_ledger()
    b = one(rule(limit_usd="1"))
    await ledger.reserve("slow", [Charge(b, D("0.6"))], LEASE, NOW)
    await ledger.reserve("dead", [Charge(b, D("0.3"))], LEASE, NOW)
    later = NOW + timedelta(seconds=LEASE - 10)
    assert await ledger.renew(["slow", "gone", "never-reserved"], LEASE, later) == 1
    assert await ledger.renew([], LEASE, later) == 0
    # At the first lease's end only the one nobody renewed goes (another instance sweeping).
    assert await other.expire(NOW + timedelta(seconds=LEASE)) == 1
    st = (await other.state([b], NOW + timedelta(seconds=LEASE)))[b.id]
    assert (st.reserved, st.reserved_requests) == (D("0.6"), 1)
    assert not (await other.reserve("more", [Charge(b, D("0.5"))], LEASE, NOW + timedelta(seconds=LEASE))).ok
    assert await other.expire(later + timedelta(seconds=LEASE)) == 1
    await ledger.settle("slow", [Charge(b, D("0.2"))], None, later + timedelta(seconds=LEASE))
    assert (await other.state([b], later))[b.id].spent == D("0.2")


async def test_contract_an_abandoned_reservation_is_gone_and_cannot_come_back(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    await ledger.reserve("made", [Charge(b, D("0.4"))], LEASE, NOW)
    assert await ledger.abandon("made", NOW) is True
    # Abandoned before the reserve ran (a hung Redis runs it later): it never takes money.
    assert await ledger.abandon("late", NOW) is False
    with pytest.raises(DuplicateReservation):
        await ledger.reserve("late", [Charge(b, D("0.4"))], LEASE, NOW)
    assert (await ledger.state([b], NOW))[b.id] == BucketState()


async def test_contract_a_dead_processs_reservation_is_settled_as_interrupted(make_ledger: MakeLedger) -> None:
    """A lease that runs out means the process died with the request in flight: the
    reservation is settled at the estimated input it was made with, and logged as such."""
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))

    def what(request_id: str) -> IfInterrupted:
        return IfInterrupted(SpendRow(
            time=NOW, request_id=request_id, key="k1", user="alice", model="gpt-4o-mini", upstream="openai",
            endpoint="chat.completions", input_tokens=100, input_source="estimated", cost=D("0.0003"),
            outcome="interrupted",
        ), 100)

    await ledger.reserve("dead:1", [Charge(b, D("0.5"), 600)], LEASE, NOW, what("dead"))
    await ledger.reserve("done:1", [Charge(b, D("0.2"), 50)], LEASE, NOW, what("done"))
    await ledger.reserve("gone:1", [Charge(b, D("0.2"), 50)], LEASE, NOW, what("gone"))
    await ledger.settle("done:1", [Charge(b, D("0.1"), 40)], row("done", cost="0.1"), NOW)
    assert await ledger.release("gone:1", NOW) is True
    before = ledger.interrupted
    assert await ledger.expire(NOW + timedelta(seconds=LEASE)) == 1
    assert ledger.interrupted - before == 1
    assert (await ledger.state([b], NOW))[b.id] == BucketState(spent=D("0.1003"), tokens=140, requests=2)
    report = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), [])
    assert [(r["requests"], r["cost"]) for r in report] == [(2, D("0.1003"))]
    # Settled once: a late settle of the same id charges nothing, a later sweep finds nothing.
    assert await ledger.settle("dead:1", [Charge(b, D("0.4"))], row("dead", cost="0.4"), NOW) == []
    assert await ledger.expire(NOW + timedelta(seconds=2 * LEASE)) == 0 and ledger.interrupted - before == 1


async def test_contract_duplicate_reserve_is_an_error(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    await ledger.reserve("a", [Charge(b, D("0.1"))], LEASE, NOW)
    with pytest.raises(DuplicateReservation):
        await ledger.reserve("a", [Charge(b, D("0.1"))], LEASE, NOW)
    assert (await ledger.state([b], NOW))[b.id].reserved == D("0.1")


async def test_contract_lease_expiry_frees_a_dead_reservation(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    assert (await ledger.reserve("dead", [Charge(b, D("0.9"))], LEASE, NOW)).ok
    assert not (await ledger.reserve("x", [Charge(b, D("0.2"))], LEASE, NOW + timedelta(seconds=59))).ok
    later = NOW + timedelta(seconds=LEASE)
    # Excluded from the live sum the moment the lease ends, even before expire() runs.
    assert (await ledger.state([b], later))[b.id] == BucketState()
    assert (await ledger.reserve("y", [Charge(b, D("0.2"))], LEASE, later)).ok
    assert await ledger.expire(later + timedelta(seconds=1)) == 1
    assert await ledger.expire(later + timedelta(seconds=1)) == 0
    # A late settle of the dead request still books what it actually cost.
    await ledger.settle("dead", [Charge(b, D("0.05"))], None, later)
    st = (await ledger.state([b], later))[b.id]
    assert (st.spent, st.reserved) == (D("0.05"), D("0.2"))


async def test_contract_a_lease_is_sized_without_its_own_old_size(make_ledger: MakeLedger) -> None:
    ledger, other = await make_ledger(), await make_ledger()
    b = one(rule(limit_usd="1", limit_tokens=1000))
    assert (await other.reserve("a", [Charge(b, D("0.3"), 100)], LEASE, NOW)).ok
    r = await ledger.lease("L", [Charge(b, D("0.5"), 400)], LEASE, NOW)
    # The states are the bucket's without the lease: what the next sizing can count on.
    assert r.ok and r.states[b.id] == BucketState(reserved=D("0.3"), reserved_tokens=100, reserved_requests=1)
    # Growing to exactly the limit fits: the old 0.5 is not counted against the new 0.7.
    assert (await ledger.lease("L", [Charge(b, D("0.7"), 400)], LEASE, NOW)).ok
    refused = await ledger.lease("L", [Charge(b, D("0.700000001"), 400)], LEASE, NOW)
    assert not refused.ok and refused.refused == b and refused.reason == "usd"
    assert refused.refused_state == BucketState(reserved=D("0.3"), reserved_tokens=100, reserved_requests=1)
    too_many_tokens = await ledger.lease("L", [Charge(b, D("0.1"), 901)], LEASE, NOW)
    assert not too_many_tokens.ok and too_many_tokens.reason == "tokens"
    # A refused sizing leaves the lease as it was; the lease counts as one reservation.
    st = (await other.state([b], NOW))[b.id]
    assert (st.reserved, st.reserved_tokens, st.reserved_requests) == (D("1.0"), 500, 2)
    assert not (await other.reserve("b", [Charge(b, D("0.000000001"))], LEASE, NOW)).ok


async def test_contract_a_lease_given_back_is_unchecked_only_while_it_shrinks(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    assert (await ledger.lease("L", [Charge(b, D("0.8"))], LEASE, NOW)).ok
    # Requests admitted from the lease settle on their own ids: their spend is in the
    # bucket and still inside the lease until it is sized, so on paper it is over.
    await ledger.settle("r1", [Charge(b, D("0.5"))], row("r1", cost="0.5"), NOW)
    assert (await ledger.state([b], NOW))[b.id].used == D("1.3")
    # A smaller lease is still checked (0.6 < 0.8, but only 0.5 is left)...
    assert not (await ledger.lease("L", [Charge(b, D("0.6"))], LEASE, NOW)).ok
    assert (await ledger.lease("L", [Charge(b, D("0.5"))], LEASE, NOW)).ok
    # ...but giving back to what is in flight never is.
    assert (await ledger.settle("r2", [Charge(b, D("0.45"))], None, NOW)) != []
    assert (await ledger.lease("L", [Charge(b, D("0.2"))], LEASE, NOW, give_back=True)).ok
    assert (await ledger.state([b], NOW))[b.id] == BucketState(
        spent=D("0.95"), reserved=D("0.2"), requests=2, reserved_requests=1
    )
    assert (await ledger.lease("L", [Charge(b, D("0"))], LEASE, NOW, give_back=True)).ok
    assert (await ledger.state([b], NOW))[b.id] == BucketState(spent=D("0.95"), requests=2)
    # A "give-back" that would grow the lease (it lapsed, or holds less than is in flight)
    # is checked like any sizing: only 0.05 is left.
    grown = await ledger.lease("L", [Charge(b, D("0.06"))], LEASE, NOW, give_back=True)
    assert not grown.ok and grown.reason == "usd"
    assert (await ledger.lease("L", [Charge(b, D("0.05"))], LEASE, NOW, give_back=True)).ok


async def test_contract_a_lease_is_renewed_and_expires_like_a_reservation(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(limit_usd="1"))
    assert (await ledger.lease("L", [Charge(b, D("0.6"))], LEASE, NOW)).ok
    assert await ledger.renew(["L"], LEASE, NOW + timedelta(seconds=LEASE / 2)) == 1
    assert (await ledger.state([b], NOW + timedelta(seconds=LEASE)))[b.id].reserved == D("0.6")
    gone = NOW + timedelta(seconds=LEASE * 1.5)
    assert (await ledger.state([b], gone))[b.id] == BucketState()
    # Its process died: nothing is charged for it (a lease has no if_interrupted).
    interrupted = ledger.interrupted
    assert await ledger.expire(gone + timedelta(seconds=1)) == 1
    assert ledger.interrupted == interrupted
    assert (await ledger.state([b], gone))[b.id] == BucketState()


async def test_contract_restart_keeps_spend_and_open_reservations(make_ledger: MakeLedger) -> None:
    first = await make_ledger()
    b = one(rule(limit_usd="1"))
    await first.reserve("settled", [Charge(b, D("0.3"), 5)], LEASE, NOW)
    await first.settle("settled", [Charge(b, D("0.25"), 5)], row("settled", cost="0.25"), NOW)
    await first.reserve("open", [Charge(b, D("0.5"))], LEASE, NOW)
    await first.close()

    second = await make_ledger()
    assert await second.expire(NOW) == 0  # what open_ledger does at start
    st = (await second.state([b], NOW))[b.id]
    assert st == BucketState(spent=D("0.25"), reserved=D("0.5"), tokens=5, requests=1, reserved_requests=1)
    assert not (await second.reserve("z", [Charge(b, D("0.26"))], LEASE, NOW)).ok
    assert await second.expire(NOW + timedelta(seconds=LEASE)) == 1
    assert (await second.reserve("z", [Charge(b, D("0.75"))], LEASE, NOW + timedelta(seconds=LEASE))).ok
    assert await second.settle("settled", [Charge(b, D("0.25"))], None, NOW) == []


async def test_contract_period_rolls_over_with_the_clock(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    hourly = rule(name="hourly", period="hourly", limit_usd="1")
    t1 = datetime(2026, 11, 23, 15, 59, 30, tzinfo=UTC)
    (b1,) = buckets_for([hourly], None, None, None, t1)
    await ledger.reserve("a", [Charge(b1, D("1"))], LEASE, t1)
    await ledger.settle("a", [Charge(b1, D("1"))], None, t1)
    assert not (await ledger.reserve("b", [Charge(b1, D("0.01"))], LEASE, t1)).ok
    t2 = t1 + timedelta(seconds=30)  # 16:00:00: a new window
    (b2,) = buckets_for([hourly], None, None, None, t2)
    assert b2.id != b1.id
    assert (await ledger.reserve("c", [Charge(b2, D("1"))], LEASE, t2)).ok
    states = await ledger.state([b1, b2], t2)
    assert (states[b1.id].spent, states[b2.id].reserved) == (D("1"), D("1"))


async def test_contract_settled_before_after_finds_each_threshold_once(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    soft = one(rule(name="soft", action="warn", limit_usd="1", thresholds=[0.5, 0.8]))
    crossed: list[float] = []
    for i in range(10):
        (s,) = await ledger.settle(f"r{i}", [Charge(soft, D("0.15"))], None, NOW)
        crossed += threshold_crossed(s.spent_before, s.spent_after, soft.limit_usd, soft.rule.thresholds)
    assert crossed == [0.5, 0.8]


async def test_contract_ledger_agrees_with_admit(make_ledger: MakeLedger) -> None:
    # A random walk of reserve/settle/release: the ledger refuses exactly when the pure
    # `admit` does, given the state the ledger reports just before.
    ledger = await make_ledger()
    rng = random.Random(4)
    hard = one(rule(name="hard", limit_usd="2", limit_tokens=20_000, limit_requests=40))
    soft = one(rule(name="soft", action="warn", limit_usd="1"))
    buckets = [hard, soft]
    live: list[str] = []
    refusals = 0
    for i in range(120):
        now = NOW + timedelta(seconds=i)
        amount = D(rng.randint(0, 300_000_000)).scaleb(-9)
        tokens = rng.randint(0, 2000)
        expected = admit(buckets, await ledger.state(buckets, now), amount, tokens=tokens)
        got = await ledger.reserve(f"q{i}", charges(buckets, amount, tokens), LEASE, now)
        assert got.ok == expected.admitted, (i, amount, tokens)
        assert got.reason == expected.reason
        if got.ok:
            live.append(f"q{i}")
        else:
            refusals += 1
        if live and rng.random() < 0.4:
            rid = live.pop(rng.randrange(len(live)))
            if rng.random() < 0.5:
                await ledger.release(rid, now)
            else:
                await ledger.settle(rid, charges(buckets, amount / 2, tokens // 2), None, now)
    assert 10 < refusals < 110  # the walk really explored both sides
    st = (await ledger.state([hard], NOW + timedelta(seconds=120)))[hard.id]
    assert st.used <= D("2") and st.tokens + st.reserved_tokens <= 20_000


async def test_contract_admit_and_reserve_clamps_then_refuses(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    b = one(rule(name="clampy", limit_usd="1", on_exceed="clamp", min_output_tokens=100))
    price = D("0.0001")
    clamp = ClampInput(input_cost=D("0.1"), input_tokens=500, output_cap=4000, output_price=price)
    worst = clamp.input_cost + clamp.output_cap * price  # $0.5
    a = await admit_and_reserve(ledger, "a", [b], worst, tokens=4500, clamp=clamp, lease_seconds=LEASE, now=NOW)
    assert a.reserved and a.decision.admitted and not a.decision.clamped and a.decision.output_cap == 4000
    # 0.5 left: 0.1 input + 4000 * 0.0001 = 0.5 still fits exactly.
    a = await admit_and_reserve(ledger, "b", [b], worst, tokens=4500, clamp=clamp, lease_seconds=LEASE, now=NOW)
    assert a.reserved and not a.decision.clamped
    await ledger.release("b", NOW)
    await ledger.settle("a", [Charge(b, D("0.8"))], None, NOW)
    # 0.2 left: 0.1 for input, 1000 output tokens.
    a = await admit_and_reserve(ledger, "c", [b], worst, tokens=4500, clamp=clamp, lease_seconds=LEASE, now=NOW)
    assert a.reserved and a.decision.clamped and a.decision.output_cap == 1000
    assert a.states[b.id].reserved == D("0.2") and a.states[b.id].reserved_tokens == 1500
    # Nothing left: refused, with what to tell the client.
    a = await admit_and_reserve(ledger, "d", [b], worst, tokens=4500, clamp=clamp, lease_seconds=LEASE, now=NOW)
    assert not a.reserved and not a.decision.admitted and a.decision.refused == b
    assert a.decision.refused_state == BucketState(
        spent=D("0.8"), reserved=D("0.2"), requests=1, reserved_requests=1, tokens=0, reserved_tokens=1500
    )


async def test_contract_budget_report(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    per_user = rule(name="per-user", scope={"user": "*"}, limit_usd="5")
    lifetime = rule(name="lifetime", period="total", limit_usd="100")
    for user in ("alice", "bob"):
        bs = buckets_for([per_user, lifetime], None, user, None, NOW)
        await ledger.reserve(f"r-{user}", charges(bs, D("1")), LEASE, NOW)
        await ledger.settle(f"r-{user}", charges(bs, D("0.5")), None, NOW)
    await ledger.reserve("open", charges(buckets_for([per_user], None, "alice", None, NOW), D("2")), LEASE, NOW)
    report = await ledger.budget_report(NOW)
    summary = [(r["name"], r["user"], r["spent"], r["reserved"], r["remaining"]) for r in report]
    assert summary == [
        ("lifetime", None, D("1"), D("0"), D("99")),
        ("per-user", "alice", D("0.5"), D("2"), D("2.5")),
        ("per-user", "bob", D("0.5"), D("0"), D("4.5")),
    ]
    alice = report[1]
    assert alice["window_start"] == datetime(2026, 11, 23, tzinfo=UTC)
    assert alice["window_end"] == datetime(2026, 11, 24, tzinfo=UTC)
    assert alice["limit_usd"] == D("5") and alice["action"] == "block" and alice["requests"] == 1
    # Tomorrow the daily buckets are out of their window; the total one stays.
    tomorrow = await ledger.budget_report(NOW + timedelta(days=1))
    assert [r["name"] for r in tomorrow] == ["lifetime"]


async def test_contract_team_buckets_budget_report_and_spend_by_team(make_ledger: MakeLedger) -> None:
    """Issue 15: a key's metadata.team scopes budgets (one bucket per team, shared by the
    team's keys), shows in the budget report, and groups the spend log."""
    ledger = await make_ledger()
    per_team = rule(name="per-team", scope={"team": "*"}, limit_usd="1")
    search_prod = buckets_for([per_team], "search-prod", "ann", None, NOW, "search")
    search_batch = buckets_for([per_team], "search-batch", "bob", None, NOW, "search")
    assert [b.id for b in search_prod] == [b.id for b in search_batch]
    meta = {"team": "search", "cost_center": "7"}
    first = row("r1", key="search-prod", team="search", key_metadata=meta, cost="0.75")
    assert SpendRow.from_json(first.to_json()) == first  # Redis keeps pending rows as JSON
    assert (await ledger.reserve("r1", charges(search_prod, D("0.8")), LEASE, NOW)).ok
    await ledger.settle("r1", charges(search_prod, D("0.75")), first, NOW)
    # The other key of the same team finds the team's budget spent.
    refused = await ledger.reserve("r2", charges(search_batch, D("0.3")), LEASE, NOW)
    assert not refused.ok and refused.refused is not None and refused.refused.team == "search"
    ads = buckets_for([per_team], "ads", None, None, NOW, "ads")
    assert (await ledger.reserve("r3", charges(ads, D("0.3")), LEASE, NOW)).ok
    await ledger.settle("r3", charges(ads, D("0.25")), row("r3", key="ads", team="ads", cost="0.25"), NOW)
    await ledger.settle("r4", [], row("r4", key="no-team", cost="0.5"), NOW)
    report = await ledger.budget_report(NOW)
    assert [(r["name"], r["team"], r["key"], r["spent"]) for r in report] == [
        ("per-team", "ads", None, D("0.25")), ("per-team", "search", None, D("0.75")),
    ]
    by_team = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), ["team", "key"])
    assert [(r["team"], r["key"], r["requests"], r["cost"]) for r in by_team] == [
        (None, "no-team", 1, D("0.5")), ("ads", "ads", 1, D("0.25")), ("search", "search-prod", 1, D("0.75")),
    ]


async def test_contract_spend_report_groups(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    day1 = datetime(2026, 11, 22, 23, 59, 59, tzinfo=UTC)
    day2 = datetime(2026, 11, 23, 0, 0, 0, tzinfo=UTC)
    rows = [
        row("1", time=day1, key="k1", user="alice", model="gpt-4o", cost="0.10"),
        row("2", time=day1, key="k1", user="bob", model="gpt-4o-mini", cost="0.000000001"),
        row("3", time=day2, key="k2", user="alice", model="gpt-4o", cost="0.25"),
        row("4", time=day2, key=None, user=None, model="gpt-4o", cost="1"),
        row("5", time=day2 + timedelta(days=1), key="k1", user="alice", model="gpt-4o", cost="7"),
    ]
    for r in rows:
        await ledger.settle(r.request_id, [], r, r.time)
    start, end = datetime(2026, 11, 22, tzinfo=UTC), datetime(2026, 11, 24, tzinfo=UTC)

    def pick(report: list[dict[str, Any]], *fields: str) -> list[tuple[Any, ...]]:
        return [tuple(r[f] for f in fields) for r in report]

    by_key = await ledger.spend_report(start, end, ["key"])
    assert pick(by_key, "key", "requests", "cost") == [
        (None, 1, D("1")), ("k1", 2, D("0.100000001")), ("k2", 1, D("0.25")),
    ]
    by_day_model = await ledger.spend_report(start, end, ["day", "model"])
    assert pick(by_day_model, "day", "model", "requests", "cost") == [
        ("2026-11-22", "gpt-4o", 1, D("0.1")),
        ("2026-11-22", "gpt-4o-mini", 1, D("0.000000001")),
        ("2026-11-23", "gpt-4o", 2, D("1.25")),
    ]
    by_user = await ledger.spend_report(start, end, ["user"])
    assert pick(by_user, "user", "input_tokens", "output_tokens") == [
        (None, 100, 10), ("alice", 200, 20), ("bob", 100, 10),
    ]
    # End is exclusive, start inclusive.
    assert pick(await ledger.spend_report(day2, day2 + timedelta(days=1), []), "requests") == [(2,)]
    assert await ledger.spend_report(end + timedelta(days=5), end + timedelta(days=6), ["key"]) == []
    with pytest.raises(ValueError, match="cannot group"):
        await ledger.spend_report(start, end, ["colour"])  # type: ignore[list-item]


# --- SQLite specifics -------------------------------------------------------------------------


async def test_sqlite_file_is_wal_under_a_created_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "t.db"
    ledger = await open_ledger(LedgerSettings(path=str(path)), now=NOW)
    try:
        b = one(rule())
        await ledger.reserve("a", [Charge(b, D("0.5"))], LEASE, NOW)
        await ledger.settle("a", [Charge(b, D("0.123456789"))], row("a", cost="0.123456789"), NOW)
        # Another connection sees committed data at once, and stored nano-USD exactly.
        with sqlite3.connect(path) as other:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT spent_nanos FROM buckets").fetchone()[0] == 123456789
            assert other.execute("SELECT cost_nanos, time FROM spend_log").fetchone() == (
                123456789, "2026-11-23T15:30:00.000000Z",
            )
    finally:
        await ledger.close()


async def test_open_ledger_expires_dead_leases_at_start(tmp_path: Path) -> None:
    settings = LedgerSettings(path=str(tmp_path / "t.db"))
    ledger = await open_ledger(settings, now=NOW)
    b = one(rule())
    await ledger.reserve("crashed", [Charge(b, D("1"))], LEASE, NOW)
    await ledger.close()  # the instance "crashed" with the reservation open
    later = NOW + timedelta(seconds=LEASE + 1)
    ledger = await open_ledger(settings, now=later)
    try:
        with sqlite3.connect(tmp_path / "t.db") as other:
            assert other.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
        assert (await ledger.reserve("next", [Charge(b, D("1"))], LEASE, later)).ok
    finally:
        await ledger.close()


async def test_failed_transaction_rolls_back(tmp_path: Path) -> None:
    ledger = await SqliteLedger.open(tmp_path / "t.db")
    try:
        b = one(rule())
        with pytest.raises(ValueError):
            await ledger.reserve("a", [Charge(b, D("0.1")), Charge(b, D("0.1"))], LEASE, NOW)
        with pytest.raises(ValueError):
            await ledger.settle("a", [Charge(b, D("-1"))], None, NOW)
        assert (await ledger.reserve("a", [Charge(b, D("0.1"))], LEASE, NOW)).ok  # nothing stuck
    finally:
        await ledger.close()


# --- group commit -----------------------------------------------------------------------------


@pytest.fixture
async def counted_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[SqliteDb, list[int]]]:
    """A SqliteDb with a table `t`, and the sizes of the transactions it commits from now on."""
    db = SqliteDb(tmp_path / "g.db")
    await db.transact(lambda c: c.execute("CREATE TABLE t (x INTEGER)"))
    sizes: list[int] = []
    real = sqlite_db.transaction

    def counting(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], Any]) -> Any:
        result = real(conn, body)
        sizes.append(len(result) if isinstance(result, list) else 1)
        return result

    monkeypatch.setattr(sqlite_db, "transaction", counting)
    try:
        yield db, sizes
    finally:
        await db.close()


def _insert(x: int) -> Callable[[sqlite3.Connection], int]:
    return lambda c: c.execute("INSERT INTO t VALUES (?)", (x,)).rowcount


async def test_group_commit_gathers_bodies_while_they_keep_coming(counted_db: tuple[SqliteDb, list[int]]) -> None:
    """Settlements finishing on consecutive turns of the loop share one commit."""
    db, sizes = counted_db
    waiting = []
    for x in range(GROUP_TURNS):
        waiting.append(asyncio.ensure_future(db.transact(_insert(x))))
        await asyncio.sleep(0)  # the next body joins a turn later
    assert await asyncio.gather(*waiting) == [1] * GROUP_TURNS
    assert sizes == [GROUP_TURNS]


async def test_group_commit_of_a_lone_body_waits_one_empty_turn(counted_db: tuple[SqliteDb, list[int]]) -> None:
    db, sizes = counted_db
    lone = asyncio.ensure_future(db.transact(_insert(1)))
    turns = 0
    while not lone.done():
        await asyncio.sleep(0)
        turns += 1
    # Submitted, grouped, found not grown and committed, woken: one turn more than a commit
    # at the first turn would take, not the GROUP_TURNS a growing group may wait.
    assert turns <= 4 < GROUP_TURNS + 3
    assert sizes == [1]


async def test_group_commit_waits_at_most_group_turns(counted_db: tuple[SqliteDb, list[int]]) -> None:
    """A body joining every turn never holds the first one back longer than GROUP_TURNS."""
    db, sizes = counted_db
    first = asyncio.ensure_future(db.transact(_insert(0)))
    waiting = [first]
    turns = 0
    while not first.done():
        await asyncio.sleep(0)
        turns += 1
        waiting.append(asyncio.ensure_future(db.transact(_insert(turns))))
    # Submitted, GROUP_TURNS turns waited, committed, woken.
    assert turns <= GROUP_TURNS + 3
    await asyncio.gather(*waiting)
    assert sizes[0] <= GROUP_TURNS + 1 and sum(sizes) == len(waiting)
    assert len(sizes) >= 2


# --- the race: two processes, one file ------------------------------------------------------

RACE_LIMIT = D("1")
RACE_AMOUNT = D("0.027")  # 37 x 0.027 = 0.999 <= 1 < 38 x 0.027: exactly 37 fit
RACE_FITS = 37
RACE_ATTEMPTS = 500
RACE_ROUNDS = 3  # each round a fresh budget: more chances for the processes to interleave


def _race_bucket(round_no: int = 0) -> Bucket:
    return one(rule(name=f"race-{round_no}", limit_usd=str(RACE_LIMIT)))


def _race_worker(path: str, worker: int, attempts: int, barrier: Any, out: Any) -> None:
    async def main() -> list[tuple[int, float]]:
        ledger = await SqliteLedger.open(path)
        try:
            # Warm up (connection, schema, WAL index, one write) before the start line, so
            # both processes really hammer the lock at the same time.
            warm = one(rule(name=f"warmup-{worker}"))
            await ledger.reserve(f"warm-{worker}", [Charge(warm, D(0))], LEASE, NOW)
            await ledger.release(f"warm-{worker}", NOW)
            rounds = []
            for round_no in range(RACE_ROUNDS):
                bucket = _race_bucket(round_no)
                await asyncio.to_thread(barrier.wait, 30)
                t0 = time.perf_counter()
                results = await asyncio.gather(*(
                    ledger.reserve(f"w{worker}-{round_no}-{i}", [Charge(bucket, RACE_AMOUNT)], LEASE, NOW)
                    for i in range(attempts)
                ))
                rounds.append((sum(r.ok for r in results), time.perf_counter() - t0))
            return rounds
        finally:
            await ledger.close()

    try:
        out.put((worker, asyncio.run(main())))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        out.put((worker, repr(exc)))


async def test_race_two_processes_never_overspend(tmp_path: Path) -> None:
    path = str(tmp_path / "race.db")
    await (await SqliteLedger.open(path)).close()  # schema created once, up front
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    per = RACE_ATTEMPTS // 2
    procs = [ctx.Process(target=_race_worker, args=(path, w, per, barrier, out)) for w in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict([await asyncio.to_thread(out.get, True, 60) for _ in procs])
    finally:
        for p in procs:
            p.join(timeout=30)
    assert all(isinstance(r, list) for r in results.values()), results
    assert all(p.exitcode == 0 for p in procs)
    ledger = await SqliteLedger.open(path)
    try:
        for round_no in range(RACE_ROUNDS):
            bucket = _race_bucket(round_no)
            st = (await ledger.state([bucket], NOW))[bucket.id]
            split = [results[w][round_no][0] for w in range(2)]
            secs = [round(results[w][round_no][1], 3) for w in range(2)]
            print(f"\nsqlite race round {round_no}: {RACE_ATTEMPTS} attempts from 2 processes, "
                  f"admitted {sum(split)} (per process {split}), reserved {st.reserved}, seconds {secs}")
            assert sum(split) == RACE_FITS
            assert st.reserved == RACE_FITS * RACE_AMOUNT <= RACE_LIMIT
            assert st.reserved_requests == RACE_FITS and st.spent == 0
    finally:
        await ledger.close()


async def test_a_version_1_spend_log_is_migrated_keeping_every_row(tmp_path: Path) -> None:
    """Files written before the spend log was keyed by ledger id open, and keep their rows."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE spend_log (
            request_id TEXT PRIMARY KEY, time TEXT NOT NULL, key_name TEXT, user_name TEXT,
            model TEXT, upstream TEXT, endpoint TEXT, input_tokens INTEGER NOT NULL,
            cached_input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL, cache_write_tokens INTEGER NOT NULL,
            input_source TEXT, output_source TEXT, cost_nanos INTEGER NOT NULL, outcome TEXT,
            status INTEGER
        ) WITHOUT ROWID;
        CREATE INDEX spend_log_time ON spend_log(time);
        PRAGMA user_version = 1;
    """)
    conn.execute(
        "INSERT INTO spend_log VALUES ('old-1', '2026-11-23T15:30:00.000000Z', 'k1', 'alice', 'gpt-4o-mini', "
        "'openai', 'chat.completions', 100, 20, 10, 3, 0, 'upstream', 'upstream', 250000000, 'ok', 200)"
    )
    conn.commit()
    conn.close()
    ledger = await SqliteLedger.open(path)
    try:
        await ledger.settle("old-1:new", [], row("old-1", cost="0.5"), NOW)
        report = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), [])
        assert [(r["requests"], r["cost"]) for r in report] == [(2, D("0.75"))]
    finally:
        await ledger.close()
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == 6  # through 2, 3, 4, 5 to 6
        # The old row numbered first, the new one after it: export order is commit order.
        assert check.execute("SELECT ledger_id, request_id, seq FROM spend_log ORDER BY ledger_id").fetchall() == [
            ("old-1", "old-1", 1), ("old-1:new", "old-1", 2),
        ]
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        check.close()


def _downgrade(path: Path, version: int, added_since: Sequence[tuple[str, str]]) -> None:
    """Make a file written now look like one of schema `version`: drop the (table, column)s
    added since, and set its version."""
    conn = sqlite3.connect(path)
    try:
        for table, column in added_since:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()
    finally:
        conn.close()


def _migrated_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    """`query`'s rows from a file that must now be at schema 6."""
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA user_version").fetchone()[0] == 6
        return check.execute(query).fetchall()
    finally:
        check.close()


async def test_a_version_2_file_gains_the_team_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    """Files written before teams existed open (spend rows and buckets kept), and their new
    rows carry the team and the key's metadata."""
    path = tmp_path / "v2.db"
    ledger = await SqliteLedger.open(path)
    b = one(rule(limit_usd="5"))
    await ledger.settle("old", charges([b], D("1")), row("old"), NOW)
    await ledger.close()
    _downgrade(path, 2, (("spend_log", "team_name"), ("spend_log", "key_metadata"), ("buckets", "team_name")))
    ledger = await SqliteLedger.open(path)
    try:
        await ledger.settle("new", charges([b], D("2")), row("new", team="search", key_metadata={"team": "search"}), NOW)
        by_team = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), ["team"])
        assert [(r["team"], r["cost"]) for r in by_team] == [(None, D("0.01")), ("search", D("0.01"))]
        assert [(r["name"], r["spent"], r["team"]) for r in await ledger.budget_report(NOW)] == [("r", D("3"), None)]
    finally:
        await ledger.close()
    assert _migrated_rows(path, "SELECT ledger_id, team_name, key_metadata, seq FROM spend_log ORDER BY ledger_id") == [
        ("new", "search", '{"team": "search"}', 2), ("old", None, None, 1),
    ]


async def test_a_version_4_file_gains_the_advise_columns_with_null_in_old_rows(tmp_path: Path) -> None:
    """Schema 5 adds body_sha256 and finish_reason: old rows keep NULL, new rows carry them."""
    path = tmp_path / "v4.db"
    ledger = await SqliteLedger.open(path)
    await ledger.settle("old", [], row("old"), NOW)
    await ledger.close()
    _downgrade(path, 4, (("spend_log", "body_sha256"), ("spend_log", "finish_reason")))
    ledger = await SqliteLedger.open(path)
    try:
        await ledger.settle("new", [], row("new", body_sha256="ab" * 32, finish_reason="length"), NOW)
    finally:
        await ledger.close()
    assert _migrated_rows(path, "SELECT ledger_id, body_sha256, finish_reason, seq FROM spend_log ORDER BY seq") == [
        ("old", None, None, 1), ("new", "ab" * 32, "length", 2),
    ]


async def test_a_version_5_file_gains_the_cache_columns_with_saved_0_in_old_rows(tmp_path: Path) -> None:
    """Schema 6 adds saved_nanos and cache (the response cache): old rows read as saved 0
    and cache NULL; a hit's row carries what it saved, and the report sums it."""
    path = tmp_path / "v5.db"
    ledger = await SqliteLedger.open(path)
    await ledger.settle("old", [], row("old", cost="0.5"), NOW)
    await ledger.close()
    _downgrade(path, 5, (("spend_log", "saved_nanos"), ("spend_log", "cache")))
    ledger = await SqliteLedger.open(path)
    try:
        hit = dataclasses.replace(row("hit", cost="0"), saved=D("0.25"), cache="hit")
        await ledger.settle("hit", [], hit, NOW)
        report = await ledger.spend_report(NOW - timedelta(days=1), NOW + timedelta(days=1), [])
        assert [(r["requests"], r["cost"], r["saved"]) for r in report] == [(2, D("0.5"), D("0.25"))]
    finally:
        await ledger.close()
    assert _migrated_rows(path, "SELECT ledger_id, cost_nanos, saved_nanos, cache FROM spend_log ORDER BY seq") == [
        ("old", 500_000_000, 0, None), ("hit", 0, 250_000_000, "hit"),
    ]


def test_spend_row_json_without_the_advise_fields_still_loads() -> None:
    """Redis pending rows written by an older Tollgate have no body_sha256/finish_reason."""
    new = row("r", body_sha256="cd" * 32, finish_reason="stop")
    assert SpendRow.from_json(new.to_json()) == new
    old = json.loads(new.to_json())
    del old["body_sha256"], old["finish_reason"], old["saved"], old["cache"]
    loaded = SpendRow.from_json(json.dumps(old))
    assert (loaded.body_sha256, loaded.finish_reason) == (None, None) and loaded.request_id == "r"
    assert (loaded.saved, loaded.cache) == (D(0), None)
    hit = dataclasses.replace(new, saved=D("0.000000125"), cache="hit")
    assert SpendRow.from_json(hit.to_json()) == hit


async def test_budget_reports_never_read_the_buckets_of_finished_windows(tmp_path: Path) -> None:
    """Per-user buckets pile up, one per user and window: the report (run every 2 s for the
    gauges) reads open windows by index, never a scan of every bucket ever made."""
    ledger = await SqliteLedger.open(tmp_path / "l.db")
    try:
        per_user = rule(name="per-user", scope={"user": "*"}, limit_usd="1")
        yesterday = NOW - timedelta(days=1)
        for i in range(50):
            b = one(per_user, user=f"u{i}", now=yesterday)
            await ledger.reserve(f"y{i}", [Charge(b, D("0.1"))], LEASE, yesterday)
            await ledger.settle(f"y{i}", [Charge(b, D("0.1"))], None, yesterday)
        today = one(per_user, user="u0")
        await ledger.reserve("t0", [Charge(today, D("0.2"))], LEASE, NOW)
        rows = await ledger.budget_report(NOW)
        assert [(r["user"], r["spent"], r["reserved"]) for r in rows] == [("u0", D(0), D("0.2"))]
    finally:
        await ledger.close()
    conn = sqlite3.connect(tmp_path / "l.db")
    try:
        plan = conn.execute("EXPLAIN QUERY PLAN " + OPEN_BUCKETS_SQL, (0, 0, 0)).fetchall()
    finally:
        conn.close()
    details = [str(row[-1]) for row in plan]
    assert not any(d.startswith("SCAN buckets") for d in details), details
    assert sum("USING INDEX buckets_end" in d for d in details) == 2, details

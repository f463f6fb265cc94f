"""The Redis ledger against a real `redis-server` started here (it must be installed: CI does).

The shared contract tests come from test_ledger_sqlite.py and run here with this module's
`make_ledger`: several ledger instances (separate connections) on one Redis, each with its
own local spend log, as several Tollgate instances would be.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from proxy.spend.budgets import BucketState, Charge, LedgerSettings, charges
from proxy.spend.ledger import Ledger, LedgerError, SpendRow, open_ledger
from proxy.spend.ledger.redis import SETTLED_RETENTION_MS, RedisLedger
from tests.integration.test_ledger_sqlite import (  # noqa: F401 - collected here with redis fixtures
    LEASE,
    NOW,
    RACE_AMOUNT,
    RACE_ATTEMPTS,
    RACE_FITS,
    RACE_LIMIT,
    MakeLedger,
    _race_bucket,
    one,
    row,
    rule,
    test_contract_a_dead_processs_reservation_is_settled_as_interrupted,
    test_contract_a_fresh_settlement_is_exactly_once,
    test_contract_a_lease_given_back_is_unchecked_only_while_it_shrinks,
    test_contract_a_lease_is_renewed_and_expires_like_a_reservation,
    test_contract_a_lease_is_sized_without_its_own_old_size,
    test_contract_admit_and_reserve_clamps_then_refuses,
    test_contract_all_or_nothing_across_buckets,
    test_contract_an_abandoned_reservation_is_gone_and_cannot_come_back,
    test_contract_budget_report,
    test_contract_duplicate_reserve_is_an_error,
    test_contract_lease_expiry_frees_a_dead_reservation,
    test_contract_ledger_agrees_with_admit,
    test_contract_period_rolls_over_with_the_clock,
    test_contract_refusal_reports_the_bucket_and_its_state,
    test_contract_renewed_leases_outlive_their_first_end,
    test_contract_reserve_settle_release,
    test_contract_restart_keeps_spend_and_open_reservations,
    test_contract_settle_is_idempotent,
    test_contract_settled_before_after_finds_each_threshold_once,
    test_contract_spend_report_groups,
    test_contract_spend_rows_are_keyed_by_the_settlement_not_the_clients_request_id,
    test_contract_team_buckets_budget_report_and_spend_by_team,
    test_contract_token_and_request_limits,
)
from tests.support.redis_server import RedisServer

D = Decimal


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    # One server for the module; each test gets its own key space.
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_ledger(redis_server: RedisServer, prefix: str, tmp_path: Path) -> AsyncIterator[MakeLedger]:
    opened: list[Ledger] = []

    async def make() -> Ledger:
        # Instances share Redis, but each keeps its own local spend log, as deployed; the
        # contract tests read spend reports from the instance that wrote them.
        ledger = await RedisLedger.open(redis_server.url, tmp_path / f"spend-{len(opened)}.db", prefix)
        opened.append(ledger)
        return ledger

    yield make
    for ledger in opened:
        await ledger.close()


async def _keys(redis_server: RedisServer, pattern: str) -> dict[str, int]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        return {k: await client.pttl(k) async for k in client.scan_iter(match=pattern)}
    finally:
        await client.aclose()


async def test_period_keys_expire_after_their_window(
    redis_server: RedisServer, make_ledger: MakeLedger, prefix: str
) -> None:
    ledger = await make_ledger()
    daily = one(rule(name="daily", limit_usd="1"))
    total = one(rule(name="total", period="total", limit_usd="1"))
    await ledger.reserve("a", charges([daily, total], D("0.1")), LEASE, NOW)
    sent = time.monotonic()
    await ledger.settle("a", charges([daily, total], D("0.1")), None, NOW)
    ttls = await _keys(redis_server, "{" + prefix + "}:b:*")
    assert set(ttls) == {"{" + prefix + "}:b:" + daily.id, "{" + prefix + "}:b:" + total.id}
    assert ttls["{" + prefix + "}:b:" + total.id] == -1  # total: never expires
    # NOW is a fixed instant, days away from Redis's own clock. The key must still live a
    # day past its window as measured on the ledger's clock: the TTL is a duration from
    # NOW, so its length does not depend on the date the suite runs on.
    assert daily.end is not None
    expected_ms = int((daily.end + timedelta(days=1) - NOW).total_seconds() * 1000)
    slack_ms = int((time.monotonic() - sent) * 1000) + 1000
    assert expected_ms - slack_ms <= ttls["{" + prefix + "}:b:" + daily.id] <= expected_ms
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # The per-request key lives only until its lease ended (+ margin); settled, it is gone.
        assert await client.exists("{" + prefix + "}:q:a") == 0
        marker_ttl = await client.pttl("{" + prefix + "}:d:a")
        assert SETTLED_RETENTION_MS - slack_ms <= marker_ttl <= SETTLED_RETENTION_MS
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "skew",
    [timedelta(minutes=-10), timedelta(minutes=10), timedelta(days=-3), timedelta(days=400)],
    ids=["10min-behind", "10min-ahead", "3days-behind", "400days-ahead"],
)
async def test_a_host_clock_off_redis_keeps_its_keys_and_leases(
    redis_server: RedisServer, make_ledger: MakeLedger, prefix: str, skew: timedelta
) -> None:
    """A Tollgate host whose clock is off Redis's loses no key and keeps none too long.

    Redis only ever gets durations, so the margin that protects a bucket is its whole
    remaining window plus a day, on the host's own clock, whatever Redis's clock says.
    """
    host_now = datetime.now(UTC) + skew
    one_instance, other_instance = await make_ledger(), await make_ledger()
    b = one(rule(limit_usd="1"), now=host_now)
    assert (await one_instance.reserve("held", [Charge(b, D("0.4"))], LEASE, host_now)).ok
    assert (await one_instance.reserve("done", [Charge(b, D("0.4"))], LEASE, host_now)).ok
    await one_instance.settle("done", [Charge(b, D("0.3"))], None, host_now)
    later = host_now + timedelta(seconds=LEASE / 2)
    assert (await other_instance.state([b], later))[b.id] == BucketState(
        spent=D("0.3"), reserved=D("0.4"), requests=1, reserved_requests=1
    )
    # The live reservation still blocks what would not fit; a duplicate settle is refused.
    assert not (await other_instance.reserve("over", [Charge(b, D("0.31"))], LEASE, later)).ok
    assert await other_instance.settle("done", [Charge(b, D("0.3"))], None, later) == []
    assert b.end is not None
    expected_ms = int((b.end + timedelta(days=1) - host_now).total_seconds() * 1000)
    ttls = await _keys(redis_server, "{" + prefix + "}:*")
    bucket_ttl = ttls["{" + prefix + "}:b:" + b.id]
    assert expected_ms - 10_000 <= bucket_ttl <= expected_ms
    assert all(ttl == -1 or ttl > 0 for ttl in ttls.values())
    # The lease still ends on the host's clock: at its end the reservation is gone.
    assert await other_instance.expire(host_now + timedelta(seconds=LEASE)) == 1
    assert (await one_instance.state([b], later))[b.id].reserved == 0


async def test_instances_share_budgets_but_keep_local_spend_logs(make_ledger: MakeLedger) -> None:
    one_instance, other_instance = await make_ledger(), await make_ledger()
    b = one(rule(limit_usd="1"))
    assert (await one_instance.reserve("a", [Charge(b, D("0.6"))], LEASE, NOW)).ok
    assert not (await other_instance.reserve("b", [Charge(b, D("0.6"))], LEASE, NOW)).ok
    await one_instance.settle("a", [Charge(b, D("0.5"))], row("a", cost="0.5"), NOW)
    assert (await other_instance.state([b], NOW))[b.id] == BucketState(spent=D("0.5"), requests=1)
    window = (NOW - timedelta(days=1), NOW + timedelta(days=1))
    assert [r["requests"] for r in await one_instance.spend_report(*window, [])] == [1]
    assert await other_instance.spend_report(*window, []) == []
    # Settled by one instance means settled for all.
    assert await other_instance.settle("a", [Charge(b, D("0.5"))], None, NOW) == []


async def test_settle_without_budgets_only_writes_the_spend_log(make_ledger: MakeLedger) -> None:
    ledger = await make_ledger()
    await ledger.settle("free", [], row("free"), NOW)
    await ledger.settle("free", [], row("free"), NOW)
    window = (NOW - timedelta(days=1), NOW + timedelta(days=1))
    assert [r["requests"] for r in await ledger.spend_report(*window, [])] == [1]


async def test_large_amounts_stay_exact_in_lua(make_ledger: MakeLedger) -> None:
    # 10^15 nano-USD would be printed "1e+15" by Lua; increments must stay integers.
    ledger = await make_ledger()
    b = one(rule(limit_usd="5000000"))
    assert (await ledger.reserve("a", [Charge(b, D("1000000.000000001"))], LEASE, NOW)).ok
    await ledger.settle("a", [Charge(b, D("1234567.123456789"))], None, NOW)
    assert (await ledger.reserve("b", [Charge(b, D("3765432.876543211"))], LEASE, NOW)).ok
    assert not (await ledger.reserve("c", [Charge(b, D("0.000000001"))], LEASE, NOW)).ok
    assert (await ledger.state([b], NOW))[b.id] == BucketState(
        spent=D("1234567.123456789"), reserved=D("3765432.876543211"), requests=1, reserved_requests=1
    )


async def test_expire_sweeps_leases_of_every_bucket(
    redis_server: RedisServer, make_ledger: MakeLedger, prefix: str
) -> None:
    ledger = await make_ledger()
    bs = [one(rule(name=f"b{i}", limit_usd="1")) for i in range(3)]
    for i in range(7):
        await ledger.reserve(f"r{i}", charges(bs, D("0.1")), LEASE, NOW)
    assert await ledger.expire(NOW + timedelta(seconds=LEASE - 1)) == 0
    assert await ledger.expire(NOW + timedelta(seconds=LEASE)) == 7
    raw = await _keys(redis_server, "{" + prefix + "}:q:*")
    assert raw == {}
    states = await ledger.state(bs, NOW)  # read with the old clock: nothing is left anyway
    assert all(s == BucketState() for s in states.values())


async def test_open_ledger_with_the_redis_backend(redis_server: RedisServer, prefix: str, tmp_path: Path) -> None:
    settings = LedgerSettings(
        backend="redis", redis_url=redis_server.url, key_prefix=prefix, path=str(tmp_path / "s.db")
    )
    ledger = await open_ledger(settings, now=NOW)
    try:
        assert isinstance(ledger, RedisLedger)
        assert (await ledger.reserve("a", [Charge(one(rule()), D("1"))], LEASE, NOW)).ok
    finally:
        await ledger.close()


async def test_unreachable_redis_is_a_ledger_error(tmp_path: Path) -> None:
    with RedisServer() as server:
        url = server.url
    with pytest.raises(LedgerError, match="cannot reach Redis"):
        await RedisLedger.open(url, tmp_path / "s.db")


async def test_race_two_instances_never_overspend(make_ledger: MakeLedger) -> None:
    instances = [await make_ledger(), await make_ledger()]
    bucket = _race_bucket()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        instances[i % 2].reserve(f"r{i}", [Charge(bucket, RACE_AMOUNT)], LEASE, NOW)
        for i in range(RACE_ATTEMPTS)
    ))
    elapsed = time.perf_counter() - t0
    admitted = [i for i, r in enumerate(results) if r.ok]
    st = (await instances[0].state([bucket], NOW))[bucket.id]
    per_instance = [sum(1 for i in admitted if i % 2 == k) for k in range(2)]
    print(f"\nredis race: {RACE_ATTEMPTS} attempts from 2 instances, admitted {len(admitted)} "
          f"(per instance {per_instance}), reserved {st.reserved}, {elapsed:.3f} s")
    assert len(admitted) == RACE_FITS
    assert st.reserved == RACE_FITS * RACE_AMOUNT <= RACE_LIMIT
    assert st.reserved_requests == RACE_FITS
    # Settling everything keeps it within the limit too.
    await asyncio.gather(*(
        instances[i % 2].settle(f"r{i}", [Charge(bucket, RACE_AMOUNT)], None, NOW) for i in admitted
    ))
    st = (await instances[1].state([bucket], NOW))[bucket.id]
    assert st.spent == RACE_FITS * RACE_AMOUNT and st.reserved == 0 and st.requests == RACE_FITS


async def test_finished_windows_leave_the_report_index(
    redis_server: RedisServer, make_ledger: MakeLedger, prefix: str
) -> None:
    """Each user's bucket of a finished day leaves the index the reports walk as soon as
    the sweep passes its end, not a day later with its keys: idle buckets cost nothing."""
    ledger = await make_ledger()
    per_user = rule(name="per-user", scope={"user": "*"}, limit_usd="1")
    for i in range(20):
        b = one(per_user, user=f"u{i}")
        await ledger.reserve(f"r{i}", [Charge(b, D("0.1"))], LEASE, NOW)
        await ledger.settle(f"r{i}", [Charge(b, D("0.1"))], None, NOW)
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert await client.zcard("{" + prefix + "}:idx") == 20
        tomorrow = NOW + timedelta(days=1)
        await ledger.expire(tomorrow)
        assert await client.zcard("{" + prefix + "}:idx") == 0
        assert await ledger.budget_report(tomorrow) == []
    finally:
        await client.aclose()


async def test_a_spend_row_settled_in_redis_survives_its_instance_dying_before_writing_it(
    redis_server: RedisServer, make_ledger: MakeLedger, prefix: str, tmp_path: Path
) -> None:
    """The settle script charges the budget in Redis; the row goes to the instance's local
    spend log just after. An instance killed in between must not leave the budget charged
    and the spend log without the row: the row waits in Redis until acknowledged, and the
    instance restarted on that spend log writes it, once. Another instance's spend log never
    takes it (it could not tell a row written just before the kill)."""
    spend_log = tmp_path / "dying.db"
    dying = await RedisLedger.open(redis_server.url, spend_log, prefix)
    other = await make_ledger()
    b = one(rule(limit_usd="1"))
    for rid in ("lost", "kept", "written"):
        await dying.reserve(rid, [Charge(b, D("0.2"))], LEASE, NOW)
    await dying.settle("kept", [Charge(b, D("0.1"))], row("kept", cost="0.1"), NOW)
    await dying.expire(NOW)  # acknowledges "kept"
    await dying.settle("written", [Charge(b, D("0.2"))], row("written", cost="0.2"), NOW)  # not yet acknowledged

    async def killed(ledger_id: str, spend_row: SpendRow) -> bool:
        raise RuntimeError("kill -9 between the Redis settle and the local write")

    dying.spend_log.write = killed  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        await dying.settle("lost", [Charge(b, D("0.3"))], row("lost", cost="0.3"), NOW)
    await dying.client.aclose()  # the process is gone, acknowledging nothing more

    assert isinstance(other, RedisLedger)
    await other.expire(NOW + timedelta(seconds=120))
    assert other.recovered == 0
    restarted = await RedisLedger.open(redis_server.url, spend_log, prefix)
    try:
        await restarted.expire(NOW + timedelta(seconds=30))  # within the grace: still settling?
        assert restarted.recovered == 0
        await restarted.expire(NOW + timedelta(seconds=61))
        assert restarted.recovered == 2  # "lost", and "written" again: kept once
        window = (NOW - timedelta(days=1), NOW + timedelta(days=1))
        assert [(r["requests"], r["cost"]) for r in await restarted.spend_report(*window, [])] == [(3, D("0.6"))]
        assert (await restarted.state([b], NOW))[b.id].spent == D("0.6")
        await restarted.expire(NOW + timedelta(seconds=120))
        assert restarted.recovered == 2
    finally:
        await restarted.close()
        await dying.spend_log.close()

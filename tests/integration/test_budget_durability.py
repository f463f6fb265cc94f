"""The SQLite ledger across stop/start and kill -9 of a real `tollgate serve` process."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from decimal import Decimal
from pathlib import Path

import aiohttp

from proxy.spend.budgets import from_nanos
from tests.integration.budget_common import BODY, COST, budget_config, capped_reply
from tests.support.fake_upstream import Reply
from tests.support.procs import wait_until
from tests.support.tollgate_process import Tollgate, UpstreamThread, start_tollgate


def reply(delay: float = 0.0) -> Reply:
    return capped_reply("chatcmpl-d", delay)


def config(upstream: str, db: Path, lease: float) -> str:
    return budget_config(upstream, "total", 1000, f"ledger: {{backend: sqlite, path: {db}, lease_seconds: {lease}}}")


class Db:
    """The test's own read-only look at the ledger file (WAL: beside the proxy's writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def query(self, sql: str) -> list[tuple[object, ...]]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def logged(self) -> set[str]:
        return {str(r[0]) for r in self.query("SELECT request_id FROM spend_log")}

    def outcomes(self) -> dict[str, int]:
        return {str(o): int(n) for o, n in self.query("SELECT outcome, COUNT(*) FROM spend_log GROUP BY outcome")}

    def reservations(self) -> int:
        return int(self.query("SELECT COUNT(*) FROM reservations")[0][0])

    def live_reserved(self) -> Decimal:
        now_ms = int(time.time() * 1000)
        return from_nanos(int(self.query(
            f"SELECT COALESCE(SUM(amount_nanos), 0) FROM reservations WHERE lease_until_ms > {now_ms}"
        )[0][0]))

    def spent(self) -> Decimal:
        return from_nanos(int(self.query("SELECT COALESCE(SUM(spent_nanos), 0) FROM buckets")[0][0]))

    def logged_cost(self) -> Decimal:
        return from_nanos(int(self.query("SELECT COALESCE(SUM(cost_nanos), 0) FROM spend_log")[0][0]))


async def post(session: aiohttp.ClientSession, proxy: Tollgate, request_id: str | None = None) -> int:
    headers = {"X-Request-Id": request_id} if request_id else {}
    async with session.post(proxy.base_url + "/chat/completions", json=BODY, headers=headers) as r:
        await r.read()
        return r.status


async def test_restart_keeps_spend_and_open_reservations_until_the_lease_frees_them(tmp_path: Path) -> None:
    db_path = tmp_path / "ledger.db"
    db = Db(db_path)
    lease = 5.0
    cfg = tmp_path / "tollgate.yaml"
    log = tmp_path / "serve.log"
    with UpstreamThread() as upstream:
        upstream.route("POST", "/v1/chat/completions", reply())
        cfg.write_text(config(upstream.api_base, db_path, lease))

        first = await start_tollgate(cfg, log)
        try:
            async with aiohttp.ClientSession() as s:
                assert [await post(s, first) for _ in range(3)] == [200, 200, 200]
            await wait_until(lambda: len(db.logged()) == 3, "three settlements", 5)
        finally:
            assert first.stop() == 0  # a clean stop
        assert db.spent() == 3 * COST

        second = await start_tollgate(cfg, log)
        try:
            assert db.spent() == 3 * COST  # spend survived the restart
            upstream.hold()
            async with aiohttp.ClientSession() as s:
                stuck = asyncio.create_task(post(s, second))
                await wait_until(lambda: upstream.received == 4, "the held request upstream", 5)
                assert db.reservations() == 1 and db.live_reserved() == COST
                second.kill()  # dies holding a reservation it can never settle
                killed_at = time.monotonic()
                try:
                    await stuck
                except aiohttp.ClientError:
                    pass
        finally:
            second.kill()
        upstream.release()

        third = await start_tollgate(cfg, log)
        try:
            # The dead instance's reservation is still there after the restart...
            assert db.reservations() == 1 and db.live_reserved() == COST
            restarted_after = time.monotonic() - killed_at
            # ...until its lease ends; the ledger chore (every 2 s) then deletes it.
            await wait_until(lambda: db.reservations() == 0, "the lease to free it", lease + 5)
            freed_after = time.monotonic() - killed_at
        finally:
            third.stop()
    assert lease - 1 < freed_after < lease + 3.5
    assert db.spent() == 3 * COST and db.logged_cost() == 3 * COST
    # The dead instance's request is in the spend log as interrupted, at its estimated input
    # (free here), not silently gone.
    assert db.outcomes() == {"ok": 3, "interrupted": 1}
    assert "1 reservations outlived their process (lease expired); 1 settled as interrupted" in log.read_text()
    print(f"restart: reservation still held {restarted_after:.2f} s after kill -9 (restart), "
          f"freed {freed_after:.2f} s after the kill (lease {lease:.0f} s)")


async def test_kill_9_mid_traffic_loses_no_settled_request_and_leaves_no_stuck_reservation(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "ledger.db"
    db = Db(db_path)
    lease = 3.0
    concurrency = 16
    cfg = tmp_path / "tollgate.yaml"
    log = tmp_path / "serve.log"
    completed: set[str] = set()
    sent: set[str] = set()
    committed_before_kill: set[str] = set()
    with UpstreamThread() as upstream:
        upstream.route("POST", "/v1/chat/completions", reply(delay=0.02))
        cfg.write_text(config(upstream.api_base, db_path, lease))
        proxy = await start_tollgate(cfg, log)
        killed = asyncio.Event()
        try:
            async with aiohttp.ClientSession() as s:

                async def client() -> None:
                    while not killed.is_set():
                        rid = uuid.uuid4().hex
                        sent.add(rid)
                        try:
                            if await post(s, proxy, rid) == 200:
                                completed.add(rid)
                        except aiohttp.ClientError:
                            return

                clients = [asyncio.create_task(client()) for _ in range(concurrency)]
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    committed_before_kill |= db.logged()
                    await asyncio.sleep(0.02)
                committed_before_kill |= db.logged()
                proxy.kill()
                killed.set()
                completed_at_kill = set(completed)
                await asyncio.wait_for(asyncio.gather(*clients), 10)
        finally:
            proxy.kill()

        left_at_restart = db.reservations()
        left_at_restart_requests = int(db.query("SELECT COUNT(DISTINCT request_id) FROM reservations")[0][0])
        restarted = await start_tollgate(cfg, log)
        try:
            freed_in = await wait_until(lambda: db.reservations() == 0, "expired leases swept", lease + 5)
        finally:
            restarted.stop()

    logged = db.logged()
    lost_settled = committed_before_kill - logged
    unlogged_completed = completed - logged
    print(
        f"kill -9: {len(sent)} requests sent, {len(completed_at_kill)} completed before the kill "
        f"({len(completed)} in all), {len(logged)} rows in the spend log, "
        f"{len(committed_before_kill)} seen committed before the kill; "
        f"{left_at_restart} reservations left at restart, all freed {freed_in:.2f} s after it; "
        f"{len(unlogged_completed)} completed requests not in the log"
    )
    assert len(completed_at_kill) > 50  # there was real traffic to interrupt
    assert not lost_settled  # every settlement committed before the kill survived it
    assert logged <= sent  # nothing invented
    # A response is only completed after its settlement committed (finish.complete runs
    # before the last bytes), so every request the client saw complete is in the log.
    assert not unlogged_completed
    assert completed_at_kill <= logged
    # The ledger agrees with itself: bucket spend is the sum of the log, nothing reserved.
    outcomes = db.outcomes()
    assert db.spent() == db.logged_cost() == outcomes["ok"] * COST
    # Each request the kill cut off is logged as interrupted once its lease ran out.
    assert outcomes.get("interrupted", 0) == left_at_restart_requests
    assert db.reservations() == 0

"""The embedded ledger: one SQLite file in WAL mode, safe for several processes on a host.

Every reserve, settle, release and expire is one `BEGIN IMMEDIATE` transaction: it takes
the database's write lock before reading, so check-then-record cannot interleave with
another task, thread or worker process (they wait on `busy_timeout`). WAL lets readers
(reports) run while a writer holds the lock, and `synchronous=NORMAL` makes a commit
durable against a killed process (only an OS crash or power loss can drop the last
commits), at a fraction of the cost of an fsync per request.

sqlite3 calls block (on the disk, and on the lock when another process holds it), so each
ledger owns one connection on one dedicated thread and the event loop can await it. The short
write transactions of the request path (reserve, settle, release) first try a second
connection on the event loop itself with a zero busy timeout: when the write lock is free,
which is nearly always, a transaction is a few dozen microseconds of page-cache writes, far
less than handing it to a thread and back. When the lock is taken (another worker process,
or this process's thread), SQLite says SQLITE_BUSY at once and the transaction goes to the
thread, which waits on `busy_timeout` without blocking the loop. The loop connection never
checkpoints (that fsyncs): the thread checkpoints the WAL every few hundred loop commits.

Money is integer nano-USD (see proxy.spend.budgets.to_nanos); times are integer epoch
milliseconds (leases, windows) or ISO-8601 UTC text (the spend log, for people and CSV).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sqlite3
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from proxy.spend.budgets import (
    Bucket,
    BucketState,
    Charge,
    LimitKind,
    exceeds,
    from_nanos,
    spend_nanos,
    to_nanos,
)
from proxy.spend.ledger.base import (
    DuplicateReservation,
    GroupBy,
    IfInterrupted,
    LedgerError,
    ReserveResult,
    Settled,
    SpendRow,
    check_group_by,
)

T = TypeVar("T")

log = logging.getLogger("tollgate.ledger")

# 2: the spend log is keyed by Tollgate's own ledger id; request_id (a client may reuse its
# x-request-id) became a plain column. Version 1 files are migrated when opened.
# 3: the team (a virtual key's metadata.team) on spend rows and buckets, and the key's whole
# metadata on spend rows; the columns are added to version 2 files when opened.
SCHEMA_VERSION = 3
# Settled markers make settle idempotent; a week covers any retry of a finished request.
SETTLED_RETENTION_MS = 7 * 24 * 3600 * 1000
# Request ids per statement when leases are renewed (SQLite binds at most 32766 values).
RENEW_BATCH = 500

_SPEND_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend_log (
    ledger_id TEXT PRIMARY KEY,       -- Tollgate's own id of the settlement: unique
    request_id TEXT NOT NULL,         -- the request id the client saw (may repeat)
    time TEXT NOT NULL,               -- ISO-8601 UTC, microseconds, 'Z'
    key_name TEXT,
    user_name TEXT,
    model TEXT,
    upstream TEXT,
    endpoint TEXT,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    input_source TEXT,
    output_source TEXT,
    cost_nanos INTEGER NOT NULL,      -- nano-USD
    outcome TEXT,
    status INTEGER,
    team_name TEXT,
    key_metadata TEXT                 -- JSON object, or NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS spend_log_time ON spend_log(time);
-- This file's identity, made once: with Redis, the spend rows an instance settled but had not
-- yet acknowledged as written are recovered only into the same file, where a row that was
-- written after all is recognised by its ledger id.
CREATE TABLE IF NOT EXISTS spend_log_identity (
    only INTEGER PRIMARY KEY CHECK (only = 1),
    id TEXT NOT NULL
);
"""

_LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    key_name TEXT,
    user_name TEXT,
    action TEXT NOT NULL,
    start_ms INTEGER NOT NULL,
    end_ms INTEGER,                   -- NULL: a total budget, no end
    limit_nanos INTEGER,
    limit_tokens INTEGER,
    limit_requests INTEGER,
    spent_nanos INTEGER NOT NULL DEFAULT 0,
    tokens INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    team_name TEXT
) WITHOUT ROWID;
-- Budget reports read only the buckets of open windows (and total budgets): by this index.
CREATE INDEX IF NOT EXISTS buckets_end ON buckets(end_ms);
CREATE TABLE IF NOT EXISTS reservations (
    request_id TEXT NOT NULL,
    bucket_id TEXT NOT NULL,
    amount_nanos INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    lease_until_ms INTEGER NOT NULL,
    PRIMARY KEY (request_id, bucket_id)
) WITHOUT ROWID;
-- Covering: a bucket's live sum is one range scan of this index, no row lookups.
CREATE INDEX IF NOT EXISTS reservations_live
    ON reservations(bucket_id, lease_until_ms, amount_nanos, tokens);
DROP INDEX IF EXISTS reservations_bucket;
-- No index on lease_until_ms alone: it was one more B-tree page written by every reserve
-- and every settle, for the sweep every few seconds (expire), which scans a table that
-- holds only the requests in flight.
DROP INDEX IF EXISTS reservations_lease;
-- What a reservation is settled at if its lease runs out (IfInterrupted, as JSON).
CREATE TABLE IF NOT EXISTS if_interrupted (
    request_id TEXT PRIMARY KEY,
    json TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settled (
    request_id TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS settled_at ON settled(at_ms);
"""


def epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("ledger times must be timezone-aware")
    return int(moment.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def log_time(moment: datetime) -> str:
    """Spend-log time text: fixed width, so text order is time order."""
    if moment.tzinfo is None:
        raise ValueError("spend-log times must be timezone-aware")
    # isoformat with explicit microseconds is strftime's "%Y-%m-%dT%H:%M:%S.%f" plus
    # "+00:00" for a UTC time, at a fraction of the cost (a spend row per request).
    return moment.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


# Loop commits between two WAL checkpoints run on the ledger thread (SQLite's own default
# is 1000 pages; a settle writes a handful).
CHECKPOINT_EVERY = 200
# How long the checkpoint that restarts the WAL may hold writers off waiting for readers.
RESTART_WAIT_MS = 50
# Bodies per group transaction: bounds how long one commit holds the loop and the lock.
MAX_GROUP = 64
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class SqliteDb:
    """One sqlite3 connection used only from one dedicated thread, plus one used only on the
    event loop for write transactions that get the lock without waiting."""

    def __init__(self, path: str | Path, busy_timeout_seconds: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout_seconds = busy_timeout_seconds
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tollgate-ledger")
        self._conn: sqlite3.Connection | None = None
        self._loop_conn: sqlite3.Connection | None = None
        self._loop_commits = 0
        self._checkpointing = False
        self._group: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._closed = False

    def _open(self, busy_timeout_seconds: float) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; we say BEGIN IMMEDIATE ourselves.
        conn = sqlite3.connect(
            self.path, timeout=busy_timeout_seconds, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_seconds * 1000)}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerError(f"{self.path}: cannot switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _connect(self) -> sqlite3.Connection:
        return self._open(self.busy_timeout_seconds)

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._connect()
        return fn(self._conn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise LedgerError("the ledger is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, fn)

    async def transact(self, body: Callable[[sqlite3.Connection], T]) -> T:
        """`body` in a BEGIN IMMEDIATE transaction, committed before this returns.

        Group commit: the bodies submitted during one turn of the event loop run in one
        transaction at the start of the next turn (a commit costs more than a reserve or a
        settle itself), on the loop if the write lock is free at once, else on the ledger
        thread, which waits for it. If any body raises, the group is rolled back and each
        body runs in a transaction of its own, so one failure never touches another's work.
        Bodies must be pure functions of the database (re-runnable after a rollback) and
        short: no I/O but the database's."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._group.append((body, fut))
        if len(self._group) == 1:
            loop.call_soon(self._flush)
        return await fut  # type: ignore[no-any-return]

    def _flush(self) -> None:
        group, self._group = self._group[:MAX_GROUP], self._group[MAX_GROUP:]
        if self._group:
            asyncio.get_running_loop().call_soon(self._flush)
        if not group:
            return
        bodies = [body for body, _ in group]
        try:
            outcomes = self._run_group_on_loop(bodies)
        except BaseException as exc:
            _settle_futures(group, [(False, exc)] * len(group))
            raise
        _settle_futures(group[: len(outcomes)], outcomes)
        rest = group[len(outcomes):]
        if rest:
            # The write lock was taken: the ledger thread waits for it.
            job = self.run(lambda conn: _run_group(conn, [body for body, _ in rest], stop_when_busy=False))
            task = asyncio.ensure_future(job)
            task.add_done_callback(lambda t: _settle_futures(rest, _outcomes_of(t, len(rest))))
            return
        self._loop_commits += 1
        if self._loop_commits >= CHECKPOINT_EVERY and not self._checkpointing:
            self._loop_commits = 0
            self._checkpointing = True
            asyncio.get_running_loop().run_in_executor(self._executor, self._call, self._checkpoint)

    def _run_group_on_loop(self, bodies: list[Callable[[sqlite3.Connection], Any]]) -> list[_Outcome]:
        conn = self._loop_conn
        if conn is None:
            try:
                opened = self._open(0.0)
            except sqlite3.OperationalError as exc:
                if _is_busy(exc):
                    return []
                raise
            # Checkpoints fsync: never on the loop (see _checkpoint).
            opened.execute("PRAGMA wal_autocheckpoint = 0")
            conn = self._loop_conn = opened
        return _run_group(conn, bodies, stop_when_busy=True)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        # PASSIVE copies the WAL back without stopping writers; RESTART then waits for the
        # writer of the moment, copies the little that came meanwhile and makes the next
        # writer start the WAL over. Without it the loop's writers, never idle at the
        # instant a concurrent checkpoint ends, would grow the WAL without bound. RESTART
        # holds new writers off while it waits (loop writers queue on this thread, behind
        # it), so it waits briefly: behind a long reader (a report) it gives up, and the
        # next checkpoint tries again.
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            conn.execute(f"PRAGMA busy_timeout = {RESTART_WAIT_MS}")
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_seconds * 1000)}")
        except sqlite3.Error as exc:  # the next one will catch up; nothing is lost
            log.warning("WAL checkpoint of %s failed: %s", self.path, exc)
        finally:
            self._checkpointing = False

    def run_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run on the ledger thread from synchronous code (CLI reports, measurements)."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        return self._executor.submit(self._call, fn).result()

    async def close(self) -> None:
        if self._closed:
            return

        def _close(_: sqlite3.Connection) -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        while self._group:
            # Submitted but not yet run: run them now, before the connections go.
            waiting = [fut for _, fut in self._group]
            self._flush()
            await asyncio.gather(*waiting, return_exceptions=True)
        if self._loop_conn is not None:
            self._loop_conn.close()
            self._loop_conn = None
        if self._conn is not None:
            await self.run(_close)
        self._closed = True
        self._executor.shutdown(wait=True)


def transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], T]) -> T:
    """Run `body` inside BEGIN IMMEDIATE ... COMMIT; roll back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = body(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


_Outcome = tuple[bool, Any]  # (True, result) or (False, exception)


def _is_busy(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (exc.sqlite_errorcode & 0xFF) in _BUSY_CODES


def _rollback_if_open(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _run_group(
    conn: sqlite3.Connection, bodies: list[Callable[[sqlite3.Connection], Any]], *, stop_when_busy: bool
) -> list[_Outcome]:
    """The outcome of each body: all in one transaction, or if one raises, each in its own.

    With `stop_when_busy`, returns early at the first SQLITE_BUSY with the outcomes of the
    bodies before it (committed); the caller runs the rest elsewhere."""
    if len(bodies) > 1:
        try:
            return [(True, r) for r in transaction(conn, lambda c: [body(c) for body in bodies])]
        except Exception as exc:  # noqa: BLE001 - whatever it was, each body alone says
            _rollback_if_open(conn)
            if stop_when_busy and _is_busy(exc):
                return []
    out: list[_Outcome] = []
    for body in bodies:
        try:
            out.append((True, transaction(conn, body)))
        except Exception as exc:  # noqa: BLE001 - handed to that body's caller
            _rollback_if_open(conn)
            if stop_when_busy and _is_busy(exc):
                return out
            out.append((False, exc))
    return out


def _settle_futures(group: Sequence[tuple[Any, asyncio.Future[Any]]], outcomes: Sequence[_Outcome]) -> None:
    for (_, fut), (ok, value) in zip(group, outcomes, strict=True):
        if fut.done():
            continue  # its caller was cancelled; the transaction stands regardless
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _outcomes_of(task: asyncio.Future[list[_Outcome]], n: int) -> list[_Outcome]:
    if task.cancelled():
        return [(False, LedgerError("the ledger transaction was cancelled"))] * n
    exc = task.exception()
    if exc is not None:
        return [(False, exc)] * n
    return task.result()


def _set_aside_v1_spend_log(c: sqlite3.Connection) -> bool:
    """Rename a version-1 spend log (no ledger_id) out of the way; True if there was one."""
    columns = [r[1] for r in c.execute("PRAGMA table_info(spend_log)")]
    if not columns or "ledger_id" in columns:
        return False
    c.execute("DROP INDEX IF EXISTS spend_log_time")
    c.execute("ALTER TABLE spend_log RENAME TO spend_log_v1")
    return True


def _init_schema(conn: sqlite3.Connection, script: str) -> None:
    def body(c: sqlite3.Connection) -> None:
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(f"ledger schema version {version} is newer than this Tollgate ({SCHEMA_VERSION})")
        old_spend_log = _set_aside_v1_spend_log(c)
        for statement in script.split(";"):
            if statement.strip():
                c.execute(statement)
        # CREATE TABLE IF NOT EXISTS keeps a version 2 table as it was: add what 3 added.
        for table, column in _ADDED_IN_3:
            have = {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
            if have and column not in have:
                c.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        if old_spend_log:
            # Version 1 keyed rows by request id, so each was one settlement: its id serves.
            columns = ", ".join(_V1_SPEND_COLUMNS)
            c.execute(f"INSERT INTO spend_log (ledger_id, {columns}) SELECT request_id, {columns} FROM spend_log_v1")
            c.execute("DROP TABLE spend_log_v1")
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    transaction(conn, body)


# ---------------------------------------------------------------------------------------
# The spend log (shared with the Redis ledger, which keeps its own local copy)


_V1_SPEND_COLUMNS = (
    "request_id", "time", "key_name", "user_name", "model", "upstream", "endpoint",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "cache_write_tokens", "input_source", "output_source", "cost_nanos", "outcome", "status",
)
_SPEND_COLUMNS = ("ledger_id", *_V1_SPEND_COLUMNS, "team_name", "key_metadata")
_ADDED_IN_3 = (("spend_log", "team_name"), ("spend_log", "key_metadata"), ("buckets", "team_name"))
_INSERT_SPEND = (
    f"INSERT OR IGNORE INTO spend_log ({', '.join(_SPEND_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _SPEND_COLUMNS)})"
)


def insert_spend_row(conn: sqlite3.Connection, ledger_id: str, row: SpendRow) -> bool:
    """The row of settlement `ledger_id`, unless it is there already (a retried settle)."""
    cur = conn.execute(
        _INSERT_SPEND,
        (
            ledger_id, row.request_id, log_time(row.time), row.key, row.user, row.model, row.upstream,
            row.endpoint, row.input_tokens, row.cached_input_tokens, row.output_tokens,
            row.reasoning_tokens, row.cache_write_tokens, row.input_source, row.output_source,
            spend_nanos(row.cost), row.outcome, row.status, row.team,
            json.dumps(row.key_metadata, sort_keys=True) if row.key_metadata else None,
        ),
    )
    return cur.rowcount == 1


_GROUP_SQL = {
    "key": "key_name", "user": "user_name", "team": "team_name", "model": "model", "day": "substr(time, 1, 10)",
}


def query_spend(
    conn: sqlite3.Connection, start: datetime, end: datetime, group_by: Sequence[GroupBy]
) -> list[dict[str, Any]]:
    """Totals over [start, end), grouped; `day` is the UTC calendar day."""
    groups = check_group_by(group_by)
    cols = [f"{_GROUP_SQL[g]} AS g_{g}" for g in groups]
    sums = (
        "COUNT(*), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), "
        "SUM(reasoning_tokens), SUM(cost_nanos)"
    )
    sql = f"SELECT {', '.join([*cols, sums])} FROM spend_log WHERE time >= ? AND time < ?"
    if groups:
        order = ", ".join(f"g_{g}" for g in groups)
        sql += f" GROUP BY {order} ORDER BY {order}"
    out = []
    for rec in conn.execute(sql, (log_time(start), log_time(end))):
        values = dict(zip(groups, rec[: len(groups)], strict=True))
        requests, inp, cached, outp, reasoning, cost = rec[len(groups):]
        if not requests:
            continue  # no GROUP BY and no rows: SQL still returns one row of NULLs
        values.update(
            requests=requests,
            input_tokens=inp or 0,
            cached_input_tokens=cached or 0,
            output_tokens=outp or 0,
            reasoning_tokens=reasoning or 0,
            cost=from_nanos(cost or 0),
        )
        out.append(values)
    return out


class SpendLog:
    """Just the spend log: the local SQLite copy kept beside a Redis ledger."""

    def __init__(self, db: SqliteDb, identity: str) -> None:
        self.db = db
        self.identity = identity

    @classmethod
    async def open(cls, path: str | Path, busy_timeout_seconds: float = 30.0) -> SpendLog:
        db = SqliteDb(path, busy_timeout_seconds)
        await db.run(lambda c: _init_schema(c, _SPEND_LOG_SCHEMA))

        def identity(conn: sqlite3.Connection) -> str:
            conn.execute("INSERT OR IGNORE INTO spend_log_identity (only, id) VALUES (1, ?)", (uuid.uuid4().hex,))
            return str(conn.execute("SELECT id FROM spend_log_identity").fetchone()[0])

        return cls(db, await db.run(lambda c: transaction(c, identity)))

    async def write(self, ledger_id: str, row: SpendRow) -> bool:
        """Insert the row unless settlement `ledger_id` wrote it already; True if inserted."""
        return await self.db.run(lambda c: transaction(c, lambda t: insert_spend_row(t, ledger_id, row)))

    async def spend_report(self, start: datetime, end: datetime, group_by: Sequence[GroupBy]) -> list[dict[str, Any]]:
        return await self.db.run(lambda c: query_spend(c, start, end, group_by))

    async def close(self) -> None:
        await self.db.close()


# ---------------------------------------------------------------------------------------
# The ledger


def _check_charges(charges: Sequence[Charge]) -> None:
    ids = [c.bucket.id for c in charges]
    if len(set(ids)) != len(ids):
        raise ValueError("charges must name each bucket at most once")
    for c in charges:
        if c.amount < 0 or c.tokens < 0:
            raise ValueError("charges must not be negative")


def _upsert_bucket(conn: sqlite3.Connection, b: Bucket) -> None:
    # Limits follow the current config; counters are never touched here.
    conn.execute(
        "INSERT INTO buckets (id, name, key_name, user_name, action, start_ms, end_ms, "
        "limit_nanos, limit_tokens, limit_requests, team_name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET action = excluded.action, limit_nanos = excluded.limit_nanos, "
        "limit_tokens = excluded.limit_tokens, limit_requests = excluded.limit_requests",
        (
            b.id, b.name, b.key, b.user, b.rule.action, epoch_ms(b.start),
            epoch_ms(b.end) if b.end is not None else None,
            to_nanos(b.limit_usd) if b.limit_usd is not None else None,
            b.limit_tokens, b.limit_requests, b.team,
        ),
    )


_BucketConfig = tuple[str, "int | None", "int | None", "int | None"]


def _config_of(b: Bucket) -> _BucketConfig:
    """What `_upsert_bucket` writes over an existing row."""
    rule = b.rule
    limit = rule.limit_usd
    return (rule.action, _limit_nanos(limit) if limit is not None else None, rule.limit_tokens, rule.limit_requests)


@functools.lru_cache(maxsize=256)
def _limit_nanos(limit: Decimal) -> int:
    # Every reserve and settle compares or writes the limits; configs hold a few of them.
    return to_nanos(limit)


def _bucket_state(conn: sqlite3.Connection, bucket_id: str, now_ms: int) -> BucketState:
    return _bucket_state_and_config(conn, bucket_id, now_ms)[0]


def _bucket_state_and_config(
    conn: sqlite3.Connection, bucket_id: str, now_ms: int
) -> tuple[BucketState, _BucketConfig | None]:
    """The bucket's state, and its stored limits (None: no row yet)."""
    # One statement (the aggregate always gives one row; the bucket's may be missing).
    row = conn.execute(_STATE_SQL, (bucket_id, now_ms, bucket_id)).fetchone()
    if row[3] is None:  # action is NOT NULL: no bucket row yet
        spent, tokens, requests, config = 0, 0, 0, None
    else:
        spent, tokens, requests = row[0], row[1], row[2]
        config = (row[3], row[4], row[5], row[6])
    state = BucketState(
        spent=from_nanos(spent), reserved=from_nanos(row[7]), tokens=tokens,
        requests=requests, reserved_tokens=row[8], reserved_requests=row[9],
    )
    return state, config


_STATE_SQL = (
    "SELECT b.spent_nanos, b.tokens, b.requests, b.action, b.limit_nanos, b.limit_tokens, "
    "b.limit_requests, r.amount, r.tokens, r.n FROM "
    "(SELECT COALESCE(SUM(amount_nanos), 0) AS amount, COALESCE(SUM(tokens), 0) AS tokens, "
    "COUNT(*) AS n FROM reservations WHERE bucket_id = ? AND lease_until_ms > ?) AS r "
    "LEFT JOIN buckets AS b ON b.id = ?"
)


def _plus(st: BucketState, amount: Decimal, tokens: int) -> BucketState:
    return BucketState(
        spent=st.spent, reserved=st.reserved + amount, tokens=st.tokens, requests=st.requests,
        reserved_tokens=st.reserved_tokens + tokens, reserved_requests=st.reserved_requests + 1,
    )


def _settle_interrupted(
    conn: sqlite3.Connection, request_id: str, bucket_ids: Sequence[str], what: IfInterrupted, now_ms: int
) -> None:
    """Charge a dead process's reservation its estimated input, and log it as interrupted."""
    cur = conn.execute("INSERT OR IGNORE INTO settled (request_id, at_ms) VALUES (?, ?)", (request_id, now_ms))
    if cur.rowcount == 0:
        return
    nanos = spend_nanos(what.row.cost)
    conn.executemany(
        "UPDATE buckets SET spent_nanos = spent_nanos + ?, tokens = tokens + ?, requests = requests + 1 WHERE id = ?",
        [(nanos, what.tokens, bid) for bid in bucket_ids],
    )
    insert_spend_row(conn, request_id, what.row)


class SqliteLedger:
    """Budget counters, reservations and the spend log in one SQLite file."""

    def __init__(self, db: SqliteDb) -> None:
        self.db = db
        self.interrupted = 0

    @classmethod
    async def open(cls, path: str | Path, busy_timeout_seconds: float = 30.0) -> SqliteLedger:
        db = SqliteDb(path, busy_timeout_seconds)
        await db.run(lambda c: _init_schema(c, _SPEND_LOG_SCHEMA + _LEDGER_SCHEMA))
        return cls(db)

    # -- reserve ---------------------------------------------------------------------

    async def reserve(
        self, request_id: str, charges: Sequence[Charge], lease_seconds: float, now: datetime,
        if_interrupted: IfInterrupted | None = None,
    ) -> ReserveResult:
        _check_charges(charges)
        interrupted_json = if_interrupted.to_json() if if_interrupted is not None else None
        now_ms = epoch_ms(now)
        lease_until = now_ms + int(lease_seconds * 1000)
        # Amounts as the ledger stores them, so checks and records agree to the nano.
        quantized = [(c, to_nanos(c.amount)) for c in charges]

        def body(conn: sqlite3.Connection) -> ReserveResult:
            dup = conn.execute(
                "SELECT 1 FROM reservations WHERE request_id = ? UNION ALL "
                "SELECT 1 FROM settled WHERE request_id = ? LIMIT 1",
                (request_id, request_id),
            ).fetchone()
            if dup is not None:
                raise DuplicateReservation(f"request id {request_id!r} was already reserved")
            states: dict[str, BucketState] = {}
            stored: dict[str, _BucketConfig | None] = {}
            refused: tuple[Bucket, BucketState, LimitKind] | None = None
            for c, nanos in quantized:
                st, stored[c.bucket.id] = _bucket_state_and_config(conn, c.bucket.id, now_ms)
                states[c.bucket.id] = st
                if refused is None and c.bucket.blocking:
                    reason = exceeds(c.bucket, st, from_nanos(nanos), c.tokens)
                    if reason is not None:
                        refused = (c.bucket, st, reason)
            if refused is not None:
                return ReserveResult(False, states, refused[0], refused[1], refused[2])
            for c, nanos in quantized:
                if stored[c.bucket.id] != _config_of(c.bucket):
                    _upsert_bucket(conn, c.bucket)  # new bucket, or the config changed
                conn.execute(
                    "INSERT INTO reservations (request_id, bucket_id, amount_nanos, tokens, "
                    "lease_until_ms) VALUES (?, ?, ?, ?, ?)",
                    (request_id, c.bucket.id, nanos, c.tokens, lease_until),
                )
                states[c.bucket.id] = _plus(states[c.bucket.id], from_nanos(nanos), c.tokens)
            if interrupted_json is not None and quantized:
                conn.execute(
                    "INSERT INTO if_interrupted (request_id, json) VALUES (?, ?)", (request_id, interrupted_json)
                )
            return ReserveResult(True, states)

        return await self.db.transact(body)

    # -- settle / release / expire ---------------------------------------------------

    async def settle(
        self, request_id: str, actual: Sequence[Charge], spend_row: SpendRow | None, now: datetime
    ) -> list[Settled]:
        _check_charges(actual)
        now_ms = epoch_ms(now)

        def body(conn: sqlite3.Connection) -> list[Settled]:
            cur = conn.execute(
                "INSERT OR IGNORE INTO settled (request_id, at_ms) VALUES (?, ?)", (request_id, now_ms)
            )
            if cur.rowcount == 0:
                return []  # settled before: exactly once
            out = []
            for c in actual:
                nanos = spend_nanos(c.amount)
                # The limits follow the config, as _upsert_bucket would set them; the row
                # exists unless the reservation was lost (lease expired, ledger replaced).
                counted = conn.execute(
                    "UPDATE buckets SET spent_nanos = spent_nanos + ?, tokens = tokens + ?, "
                    "requests = requests + 1, action = ?, limit_nanos = ?, limit_tokens = ?, "
                    "limit_requests = ? WHERE id = ? RETURNING spent_nanos - ?, spent_nanos",
                    (nanos, c.tokens, *_config_of(c.bucket), c.bucket.id, nanos),
                ).fetchone()
                if counted is None:
                    _upsert_bucket(conn, c.bucket)
                    counted = conn.execute(
                        "UPDATE buckets SET spent_nanos = spent_nanos + ?, tokens = tokens + ?, "
                        "requests = requests + 1 WHERE id = ? RETURNING spent_nanos - ?, spent_nanos",
                        (nanos, c.tokens, c.bucket.id, nanos),
                    ).fetchone()
                before, after = counted
                out.append(Settled(c.bucket.id, from_nanos(before), from_nanos(after)))
            conn.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))
            conn.execute("DELETE FROM if_interrupted WHERE request_id = ?", (request_id,))
            if spend_row is not None:
                insert_spend_row(conn, request_id, spend_row)
            return out

        return await self.db.transact(body)

    async def release(self, request_id: str, now: datetime) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM if_interrupted WHERE request_id = ?", (request_id,))
            cur = conn.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))
            return cur.rowcount > 0

        return await self.db.transact(body)

    async def abandon(self, request_id: str, now: datetime) -> bool:
        now_ms = epoch_ms(now)

        def body(conn: sqlite3.Connection) -> bool:
            # The settled marker makes a later reserve of this id a duplicate, refused.
            conn.execute("INSERT OR IGNORE INTO settled (request_id, at_ms) VALUES (?, ?)", (request_id, now_ms))
            conn.execute("DELETE FROM if_interrupted WHERE request_id = ?", (request_id,))
            return conn.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,)).rowcount > 0

        return await self.db.run(lambda conn: transaction(conn, body))

    async def renew(self, request_ids: Sequence[str], lease_seconds: float, now: datetime) -> int:
        ids = list(request_ids)
        if not ids:
            return 0
        lease_until = epoch_ms(now) + int(lease_seconds * 1000)

        def body(conn: sqlite3.Connection) -> int:
            renewed: set[str] = set()
            for i in range(0, len(ids), RENEW_BATCH):
                batch = ids[i : i + RENEW_BATCH]
                marks = ", ".join("?" for _ in batch)
                rows = conn.execute(
                    f"UPDATE reservations SET lease_until_ms = ? WHERE request_id IN ({marks}) RETURNING request_id",
                    (lease_until, *batch),
                ).fetchall()
                renewed.update(r[0] for r in rows)
            return len(renewed)

        return await self.db.run(lambda conn: transaction(conn, body))

    async def expire(self, now: datetime) -> int:
        """Drop reservations whose lease ended; returns how many requests they belonged to.

        Also forgets settled markers older than a week (the idempotency window)."""
        now_ms = epoch_ms(now)

        def body(conn: sqlite3.Connection) -> tuple[int, int]:
            dead = conn.execute(
                "SELECT r.request_id, r.bucket_id, i.json FROM reservations AS r "
                "LEFT JOIN if_interrupted AS i ON i.request_id = r.request_id WHERE r.lease_until_ms <= ?",
                (now_ms,),
            ).fetchall()
            by_request: dict[str, tuple[list[str], str | None]] = {}
            for rid, bid, text in dead:
                by_request.setdefault(rid, ([], text))[0].append(bid)
            interrupted = 0
            for rid, (bids, text) in by_request.items():
                if text is not None:
                    _settle_interrupted(conn, rid, bids, IfInterrupted.from_json(text), now_ms)
                    interrupted += 1
            conn.execute("DELETE FROM reservations WHERE lease_until_ms <= ?", (now_ms,))
            conn.executemany("DELETE FROM if_interrupted WHERE request_id = ?", [(rid,) for rid in by_request])
            conn.execute("DELETE FROM settled WHERE at_ms < ?", (now_ms - SETTLED_RETENTION_MS,))
            return len(by_request), interrupted

        count, interrupted = await self.db.run(lambda conn: transaction(conn, body))
        self.interrupted += interrupted
        return count

    # -- reading ---------------------------------------------------------------------

    async def state(self, buckets: Sequence[Bucket], now: datetime) -> dict[str, BucketState]:
        now_ms = epoch_ms(now)
        ids = [b.id for b in buckets]
        return await self.db.run(lambda conn: {i: _bucket_state(conn, i, now_ms) for i in ids})

    async def spend_report(self, start: datetime, end: datetime, group_by: Sequence[GroupBy]) -> list[dict[str, Any]]:
        return await self.db.run(lambda c: query_spend(c, start, end, group_by))

    async def budget_report(self, now: datetime) -> list[dict[str, Any]]:
        """Every bucket whose window contains `now` and that has seen a request."""
        now_ms = epoch_ms(now)

        def body(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(OPEN_BUCKETS_SQL, (now_ms, now_ms, now_ms)).fetchall()
            # The live reservations in one pass over the table of requests in flight,
            # instead of one look-up per bucket.
            live = {
                bid: (amount, tokens, n)
                for bid, amount, tokens, n in conn.execute(
                    "SELECT bucket_id, SUM(amount_nanos), SUM(tokens), COUNT(*) FROM reservations "
                    "WHERE lease_until_ms > ? GROUP BY bucket_id",
                    (now_ms,),
                )
            }
            out = []
            for r in rows:
                amount, rtokens, n = live.get(r[0], (0, 0, 0))
                state = BucketState(
                    spent=from_nanos(r[10]), reserved=from_nanos(amount), tokens=r[11],
                    requests=r[12], reserved_tokens=rtokens, reserved_requests=n,
                )
                out.append(budget_row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], state, team=r[13]))
            return out

        return await self.db.run(body)

    async def close(self) -> None:
        await self.db.close()


_BUCKET_COLUMNS = (
    "SELECT id, name, key_name, user_name, action, start_ms, end_ms, limit_nanos, "
    "limit_tokens, limit_requests, spent_nanos, tokens, requests, team_name FROM buckets "
)
# The buckets of windows open at ?, and total budgets, ordered by name: two ranges of the
# buckets_end index. Rows of finished windows are never read, however many users they had.
OPEN_BUCKETS_SQL = (
    f"{_BUCKET_COLUMNS} WHERE end_ms > ? AND start_ms <= ? "
    f"UNION ALL {_BUCKET_COLUMNS} WHERE end_ms IS NULL AND start_ms <= ? ORDER BY 2, 1"
)


def budget_row(
    bucket_id: str, name: str, key: str | None, user: str | None, action: str,
    start_ms: int, end_ms: int | None, limit_nanos: int | None, limit_tokens: int | None,
    limit_requests: int | None, st: BucketState, team: str | None = None,
) -> dict[str, Any]:
    """One line of `tollgate budgets` / `GET /v1/tollgate/budgets` (both backends)."""
    limit = from_nanos(limit_nanos) if limit_nanos is not None else None
    return {
        "bucket": bucket_id,
        "name": name,
        "key": key,
        "user": user,
        "team": team,
        "action": action,
        "window_start": from_ms(start_ms),
        "window_end": from_ms(end_ms) if end_ms is not None else None,
        "limit_usd": limit,
        "limit_tokens": limit_tokens,
        "limit_requests": limit_requests,
        "spent": st.spent,
        "reserved": st.reserved,
        "remaining": max(Decimal(0), limit - st.used) if limit is not None else None,
        "tokens": st.tokens,
        "reserved_tokens": st.reserved_tokens,
        "requests": st.requests,
        "reserved_requests": st.reserved_requests,
    }

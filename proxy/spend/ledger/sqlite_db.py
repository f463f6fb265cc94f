"""The SQLite file under the embedded ledger: its schema and migrations, and `SqliteDb`, which
runs transactions on the event loop when the write lock is free and on a thread when not
(the module docstring of proxy/spend/ledger/sqlite.py says why)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from proxy.spend.ledger.base import (
    LedgerError,
)

T = TypeVar("T")

log = logging.getLogger("tollgate.ledger")

# 2: the spend log is keyed by Tollgate's own ledger id; request_id (a client may reuse its
# x-request-id) became a plain column. Version 1 files are migrated when opened.
# 3: the team (a virtual key's metadata.team) on spend rows and buckets, and the key's whole
# metadata on spend rows; the columns are added to version 2 files when opened.
V1_SPEND_COLUMNS = (
    "request_id", "time", "key_name", "user_name", "model", "upstream", "endpoint",
    "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens",
    "cache_write_tokens", "input_source", "output_source", "cost_nanos", "outcome", "status",
)

ADDED_IN_3 = (("spend_log", "team_name"), ("spend_log", "key_metadata"), ("buckets", "team_name"))
# 4: `seq`, the spend log's commit order, which `tollgate export --since-cursor` resumes
# from (time cannot serve: a Redis instance's recovered rows arrive late with old times).
# Rows of older files are numbered in (time, ledger_id) order when the file is opened.

# 5: `body_sha256` and `finish_reason` on spend rows, for `tollgate advise`; older rows
# keep NULL there.
ADDED_IN_5 = (("spend_log", "body_sha256"), ("spend_log", "finish_reason"))

# 6: `saved_nanos` and `cache` on spend rows: a response-cache hit costs 0 and records what
# it saved; older rows read as saved 0, cache NULL.
ADDED_IN_6 = (("spend_log", "saved_nanos", "INTEGER NOT NULL DEFAULT 0"), ("spend_log", "cache", "TEXT"))

SCHEMA_VERSION = 6
# Settled markers make settle idempotent; a week covers any retry of a finished request.
SETTLED_RETENTION_MS = 7 * 24 * 3600 * 1000
# Request ids per statement when leases are renewed (SQLite binds at most 32766 values).
RENEW_BATCH = 500

SPEND_LOG_SCHEMA = """
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
    key_metadata TEXT,                -- JSON object, or NULL
    seq INTEGER,                      -- commit order: MAX + 1 under the write lock
    body_sha256 TEXT,                 -- sha256 hex of the request body, never the body
    finish_reason TEXT,               -- of the first choice (NULL when none was seen)
    saved_nanos INTEGER NOT NULL DEFAULT 0,  -- nano-USD a response-cache hit did not spend
    cache TEXT                        -- hit or miss or bypass (NULL when the cache is off)
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

LEDGER_SCHEMA = """
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
# Loop turns a group waits for more bodies, for as long as it grows in each. A commit costs
# ~30 us of CPU whatever it holds (its WAL frames and locks: some nine pwrite and six fcntl
# calls), a settlement ~16 us more. Under load settlements finish on consecutive turns:
# committing once per turn made groups of 5-6 on average at 64 concurrent requests; waiting
# while the group grows makes them ~28 (ledger CPU per settlement 29 against 45 us, and 12-23 %
# less CPU per request for the whole proxy). A group that did not grow in a turn commits at
# once, so an idle proxy waits one empty turn (microseconds).
GROUP_TURNS = 4
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
        self._gathering = False  # a _gather is scheduled for the group
        self._turns = 0  # turns the group has waited
        self._seen = 0  # its size at the last of them
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

        Group commit: bodies submitted over consecutive turns of the event loop run in one
        transaction (a commit costs more than a reserve or a settle itself), committed at the
        first turn in which no body joined, GROUP_TURNS turns after the first at the latest,
        on the loop if the write lock is free at once, else on the ledger thread, which
        waits for it. If any body raises, the group is rolled back and each
        body runs in a transaction of its own, so one failure never touches another's work.
        Bodies must be pure functions of the database (re-runnable after a rollback) and
        short: no I/O but the database's."""
        if self._closed:
            raise LedgerError("the ledger is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._group.append((body, fut))
        if not self._gathering:
            self._gathering = True
            loop.call_soon(self._gather)
        return await fut  # type: ignore[no-any-return]

    def _gather(self) -> None:
        """Wait another turn while the group grows and may (GROUP_TURNS), else commit it."""
        size = len(self._group)
        if 0 < size < MAX_GROUP and self._turns < GROUP_TURNS and size > self._seen:
            self._turns += 1
            self._seen = size
            asyncio.get_running_loop().call_soon(self._gather)
            return
        self._gathering = False
        self._turns = self._seen = 0
        self._flush()

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


def _number_spend_rows(c: sqlite3.Connection) -> None:
    """Give the rows of a pre-4 file their `seq`, oldest first, and index it (the index
    cannot be in the script: on such a file the column does not exist yet there)."""
    have = {r[1] for r in c.execute("PRAGMA table_info(spend_log)")}
    if "seq" not in have:
        c.execute("ALTER TABLE spend_log ADD COLUMN seq INTEGER")
    start = c.execute("SELECT COALESCE(MAX(seq), 0) FROM spend_log").fetchone()[0]
    ids = c.execute("SELECT ledger_id FROM spend_log WHERE seq IS NULL ORDER BY time, ledger_id").fetchall()
    c.executemany("UPDATE spend_log SET seq = ? WHERE ledger_id = ?", [(start + i, lid) for i, (lid,) in enumerate(ids, 1)])
    # Not UNIQUE: the insert is OR IGNORE (a retried settle), and a uniqueness conflict
    # there would drop a row silently; MAX + 1 under the write lock never repeats anyway.
    c.execute("CREATE INDEX IF NOT EXISTS spend_log_seq ON spend_log(seq)")


def init_schema(conn: sqlite3.Connection, script: str) -> None:
    def body(c: sqlite3.Connection) -> None:
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(f"ledger schema version {version} is newer than this Tollgate ({SCHEMA_VERSION})")
        old_spend_log = _set_aside_v1_spend_log(c)
        for statement in script.split(";"):
            if statement.strip():
                c.execute(statement)
        # CREATE TABLE IF NOT EXISTS keeps an older table as it was: add what 3, 5 and 6 added.
        added = [(t, col, "TEXT") for t, col in (*ADDED_IN_3, *ADDED_IN_5)] + list(ADDED_IN_6)
        for table, column, decl in added:
            have = {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
            if have and column not in have:
                c.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        if old_spend_log:
            # Version 1 keyed rows by request id, so each was one settlement: its id serves.
            columns = ", ".join(V1_SPEND_COLUMNS)
            c.execute(f"INSERT INTO spend_log (ledger_id, {columns}) SELECT request_id, {columns} FROM spend_log_v1")
            c.execute("DROP TABLE spend_log_v1")
        if version < 4:
            _number_spend_rows(c)
        c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    transaction(conn, body)

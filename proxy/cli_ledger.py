"""`tollgate keys`, `tollgate spend`, `tollgate budgets`: the ledger from a terminal.

These read the same ledger the proxy writes (the config's `ledger:` section), so they work
while the proxy runs: SQLite's WAL lets a reader in beside the writer, and the Redis
ledger's budget state is shared anyway (its spend log is the local SQLite file).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from proxy.config_file import collect_overrides, load_settings
from proxy.errors import ConfigError
from proxy.keys import generate_key, hash_key
from proxy.settings import Settings
from proxy.spend.budgets import (
    TEMPLATE,
    BudgetRule,
    format_usd,
    from_nanos,
    iso_utc,
    to_nanos,
    window,
)
from proxy.spend.forecast import forecast_fields
from proxy.spend.ledger import Ledger, LedgerError, open_ledger
from proxy.spend.ledger.base import GROUP_BY_FIELDS, check_group_by
from proxy.spend.money import report_value

DEFAULT_CONFIG = "config/tollgate.yaml"
# The spend log's whole range when no dates are given.
_BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)
_END_OF_TIME = datetime(9999, 1, 1, tzinfo=UTC)

_SUM_COLUMNS = ("requests", "input_tokens", "cached_input_tokens", "output_tokens", "reasoning_tokens", "cost")


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `keys`, `spend` and `budgets` on the `tollgate` parser's subcommands."""
    keys = sub.add_parser("keys", help="virtual keys: hash a secret for the config, or make a new key")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    hash_p = keys_sub.add_parser("hash", help="print the sha256 of a key (for keys[].key_sha256)")
    hash_p.add_argument("secret", nargs="?", help="the key; read from stdin when left out")
    hash_p.set_defaults(func=cmd_keys_hash)
    new_p = keys_sub.add_parser("new", help="print a fresh random key and its sha256")
    new_p.set_defaults(func=cmd_keys_new)

    spend = sub.add_parser("spend", help="spend totals from the spend log, as a table or CSV")
    spend.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="YAML config file")
    spend.add_argument("--from", dest="start", type=moment_arg, help="start (UTC date or ISO time), inclusive")
    spend.add_argument("--to", dest="end", type=moment_arg, help="end (UTC date: through that day; ISO time: exclusive)")
    spend.add_argument(
        "--by", default="key,model", type=_group_by,
        help=f"comma-separated grouping, from {','.join(GROUP_BY_FIELDS)} (default key,model; '' for one total)",
    )
    spend.add_argument("--csv", action="store_true", help="CSV to stdout instead of a table")
    spend.set_defaults(func=cmd_spend)

    budgets = sub.add_parser("budgets", help="each budget's spent, limit, remaining and reset")
    budgets.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="YAML config file")
    budgets.add_argument("--json", action="store_true", help="JSON (as GET /v1/tollgate/budgets) instead of a table")
    budgets.set_defaults(func=cmd_budgets)


# ---------------------------------------------------------------------------------------
# Argument types


class Moment:
    """A --from/--to value: a date means its whole UTC day, a time means that instant."""

    def __init__(self, moment: datetime, whole_day: bool) -> None:
        self.moment = moment
        self.whole_day = whole_day


def moment_arg(text: str) -> Moment:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return Moment(datetime.combine(day, time(0), tzinfo=UTC), True)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (2025-06-01) or ISO time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return Moment(moment, False)


def _group_by(text: str) -> list[str]:
    fields = [f.strip() for f in text.split(",") if f.strip()]
    try:
        return list(check_group_by(fields))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ---------------------------------------------------------------------------------------
# keys


def cmd_keys_hash(args: argparse.Namespace) -> int:
    secret = args.secret if args.secret is not None else sys.stdin.readline().rstrip("\r\n")
    if not secret:
        print("no key given (pass it as an argument or on stdin)", file=sys.stderr)
        return 2
    print(hash_key(secret))
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    key = generate_key()
    print(f"key: {key}")
    print(f"key_sha256: {hash_key(key)}")
    return 0


# ---------------------------------------------------------------------------------------
# Opening the ledger


def report_settings(path: Path) -> Settings | None:
    try:
        # The TOLLGATE_* variables serve obeys, so a report reads the ledger serve writes.
        return load_settings(path, overrides=collect_overrides({}, os.environ))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _with_ledger(settings: Settings, body: Callable[[Ledger], Any]) -> Any:
    async def run() -> Any:
        ledger = await open_ledger(settings.ledger)
        try:
            return await body(ledger)
        finally:
            await ledger.close()

    return asyncio.run(run())


def no_ledger(settings: Settings) -> bool:
    # A report must not create an empty ledger where the proxy never wrote one.
    path = Path(settings.ledger.path)
    if not path.exists():
        print(f"no ledger at {path} (nothing has been spent yet, or check ledger.path)", file=sys.stderr)
        return True
    return False


# ---------------------------------------------------------------------------------------
# spend


def spend_window(start: Moment | None, end: Moment | None) -> tuple[datetime, datetime]:
    lo = start.moment if start is not None else _BEGINNING
    if end is None:
        hi = _END_OF_TIME
    else:
        hi = end.moment + timedelta(days=1) if end.whole_day else end.moment
    return lo, hi


def cmd_spend(args: argparse.Namespace) -> int:
    settings = report_settings(args.config)
    if settings is None:
        return 2
    if no_ledger(settings):
        return 1
    start, end = spend_window(args.start, args.end)
    if end <= start:
        print("--to must be after --from", file=sys.stderr)
        return 2
    try:
        rows = _with_ledger(settings, lambda led: led.spend_report(start, end, args.by))
    except LedgerError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.csv:
        write_spend_csv(rows, args.by, sys.stdout)
    else:
        write_spend_table(rows, args.by, sys.stdout)
    return 0


def _any_saved(rows: Sequence[dict[str, Any]]) -> bool:
    # The saved_usd column (response-cache hits) appears only where the cache saved
    # something, so reports of a proxy without the cache read as they always did.
    return any(r.get("saved", 0) for r in rows)


def write_spend_csv(rows: Sequence[dict[str, Any]], group_by: Sequence[str], out: IO[str]) -> None:
    writer = csv.writer(out, lineterminator="\n")
    saved = _any_saved(rows)
    writer.writerow([*group_by, *_SUM_COLUMNS[:-1], "cost_usd", *(["saved_usd"] if saved else [])])
    for r in rows:
        writer.writerow(
            [*("" if r[g] is None else r[g] for g in group_by), *(r[c] for c in _SUM_COLUMNS[:-1]), f"{r['cost']:f}",
             *([f"{r.get('saved', Decimal(0)):f}"] if saved else [])]
        )


def write_spend_table(rows: Sequence[dict[str, Any]], group_by: Sequence[str], out: IO[str]) -> None:
    saved = _any_saved(rows)
    header = [*group_by, "requests", "input", "cached", "output", "reasoning", "cost_usd", *(["saved_usd"] if saved else [])]
    lines = [
        [*("-" if r[g] is None else str(r[g]) for g in group_by), *(str(r[c]) for c in _SUM_COLUMNS[:-1]), f"{r['cost']:f}",
         *([f"{r.get('saved', Decimal(0)):f}"] if saved else [])]
        for r in rows
    ]
    totals = [sum(int(r[c]) for r in rows) for c in _SUM_COLUMNS[:-1]]
    cost = sum((r["cost"] for r in rows), Decimal(0))
    money = [f"{cost:f}", *([f"{sum((r.get('saved', Decimal(0)) for r in rows), Decimal(0)):f}"] if saved else [])]
    lines.append(["total", *([""] * (len(group_by) - 1)), *(str(t) for t in totals), *money] if group_by
                 else [*(str(t) for t in totals), *money])
    _table(header, lines, numeric_from=len(group_by), out=out)


def _table(header: list[str], lines: list[list[str]], numeric_from: int, out: IO[str]) -> None:
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(len(header))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i >= numeric_from else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out.write(fmt(header) + "\n")
    for line in lines:
        out.write(fmt(line) + "\n")


# ---------------------------------------------------------------------------------------
# budgets


def budget_rows(rules: Sequence[BudgetRule], report: Sequence[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """The ledger's buckets in their current windows, plus a zero row for each configured
    rule that has no bucket yet (no traffic in this window), so every budget is listed."""
    rows = [dict(r) for r in report]
    seen = {r["name"] for r in rows}
    for rule in rules:
        if rule.name in seen:
            continue
        start, end = window(rule.period, now, rule.timezone)
        rows.append({
            "bucket": None,
            "name": rule.name,
            "key": TEMPLATE if rule.scope.key == TEMPLATE else rule.scope.key,
            "user": TEMPLATE if rule.scope.user == TEMPLATE else rule.scope.user,
            "team": TEMPLATE if rule.scope.team == TEMPLATE else rule.scope.team,
            "action": rule.action,
            "window_start": start,
            "window_end": end,
            "limit_usd": _usd(rule.limit_usd),
            "limit_tokens": rule.limit_tokens,
            "limit_requests": rule.limit_requests,
            "spent": from_nanos(0),
            "reserved": from_nanos(0),
            "remaining": _usd(rule.limit_usd),
            "tokens": 0,
            "reserved_tokens": 0,
            "requests": 0,
            "reserved_requests": 0,
        })
    rows.sort(key=lambda r: (r["name"], r["bucket"] or ""))
    return rows


def _usd(amount: Decimal | None) -> Decimal | None:
    # Nine decimals, as the ledger's own rows have them.
    return None if amount is None else from_nanos(to_nanos(amount))


def cmd_budgets(args: argparse.Namespace) -> int:
    settings = report_settings(args.config)
    if settings is None:
        return 2
    now = datetime.now(UTC)
    report: list[dict[str, Any]] = []
    if settings.ledger.backend == "redis" or Path(settings.ledger.path).exists():
        try:
            report = _with_ledger(settings, lambda led: led.budget_report(now))
        except LedgerError as exc:
            print(exc, file=sys.stderr)
            return 1
    rows = [forecast_fields(r, now) for r in budget_rows(settings.budgets, report, now)]
    if args.json:
        data = [{k: report_value(v) for k, v in r.items()} for r in rows]
        json.dump({"object": "list", "now": report_value(now), "data": data}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header = ["budget", "scope", "action", "spent", "reserved", "limit", "remaining", "projected", "limit hit", "resets"]
    lines = []
    for r in rows:
        scope = ", ".join(f"{k} {r[k]}" for k in ("key", "user", "team") if r.get(k) is not None) or "global"
        limit = r["limit_usd"]
        lines.append([
            r["name"], scope, r["action"], format_usd(r["spent"]), format_usd(r["reserved"]),
            format_usd(limit) if limit is not None else "-",
            format_usd(r["remaining"]) if r["remaining"] is not None else "-",
            format_usd(r["projected_usd"]) if r["projected_usd"] is not None else r["forecast"],
            iso_utc(r["limit_at"]) if r["limit_at"] is not None else ("now" if r["forecast"] == "exceeded" else "-"),
            iso_utc(r["window_end"]) if r["window_end"] is not None else "never",
        ])
    if not lines:
        print("no budgets configured", file=sys.stderr)
        return 0
    _table(header, lines, numeric_from=3, out=sys.stdout)
    return 0


__all__ = [
    "add_commands", "budget_rows", "cmd_budgets", "cmd_keys_hash", "cmd_keys_new", "cmd_spend",
    "spend_window", "write_spend_csv", "write_spend_table",
]

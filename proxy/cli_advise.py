"""`tollgate advise`: what the spend log says would save money, each with its figures.

It reads the SQLite spend log (read-only: `mode=ro`, beside a running proxy under WAL) over
a period, and reports four kinds of finding: identical requests repeated (response-cache
candidates, found by body hash; the log never holds payloads), long prompts that the
provider's prompt cache rarely hits, models whose outputs are short enough for a cheaper
model of the same family, and requests cut off by their output cap (`finish_reason: length`).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

from proxy.cli_ledger import DEFAULT_CONFIG, moment_arg, no_ledger, report_settings
from proxy.pricing import shipped_text
from proxy.spend.ledger.sqlite_db import log_time
from proxy.spend.money import from_nanos, iso_utc

DEFAULT_DAYS = 7
# OpenAI caches prompts from 1024 tokens on: shorter ones cannot hit the cache at all.
LONG_PROMPT_TOKENS = 1024
# Below this share of input tokens read from the cache, a long-prompt model is worth a look
# (a stable prefix first, the varying part last).
LOW_CACHE_HIT_RATIO = Decimal("0.5")
# An output this short rarely needs the bigger model; a model qualifies when at least
# SHORT_SHARE of its requests (and MIN_REQUESTS of them) stay under it.
SHORT_OUTPUT_TOKENS = 100
SHORT_SHARE = Decimal("0.8")
MIN_REQUESTS = 5
# Size suffixes that name a smaller model of the same family ("gpt-4o" → "gpt-4o-mini").
_SIZES = ("-mini", "-nano")


@dataclass(frozen=True, slots=True)
class Row:
    model: str | None
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost: Decimal
    body_sha256: str | None
    finish_reason: str | None


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("advise", help="what the spend log says would save money, with the figures behind it")
    p.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="YAML config file")
    p.add_argument("--since", type=moment_arg, help=f"start (UTC date or ISO time); default {DEFAULT_DAYS} days ago")
    p.add_argument("--until", type=moment_arg, help="end (a UTC date: through that day; an ISO time: exclusive); default now")
    p.add_argument("--json", action="store_true", help="one JSON object instead of tables")
    p.set_defaults(func=cmd_advise)


def read_rows(path: Path, since: datetime, until: datetime) -> list[Row]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        have = {r[1] for r in conn.execute("PRAGMA table_info(spend_log)")}
        # A file not yet opened by a schema-5 Tollgate has no such columns: NULL, no finding.
        extra = [c if c in have else f"NULL AS {c}" for c in ("body_sha256", "finish_reason")]
        sql = (
            "SELECT model, input_tokens, cached_input_tokens, output_tokens, cost_nanos, "
            f"{', '.join(extra)} FROM spend_log WHERE time >= ? AND time < ?"
        )
        return [
            # normalize(): the log's nano-USD scale would print 0.030000000 for $0.03.
            Row(m, i, c, o, from_nanos(n).normalize(), h, f)
            for m, i, c, o, n, h, f in conn.execute(sql, (log_time(since), log_time(until)))
        ]
    finally:
        conn.close()


def output_prices() -> dict[str, Decimal]:
    """Model → USD per 1M output tokens, from the shipped price table."""
    table = yaml.safe_load(shipped_text()) or {}
    out = {}
    for name, price in table.items():
        if isinstance(price, dict) and price.get("output") is not None:
            out[str(name)] = Decimal(str(price["output"]))
    return out


def family(model: str) -> str:
    for size in _SIZES:
        if model.endswith(size):
            return model.removesuffix(size)
    return model


def cheaper_in_family(model: str, prices: dict[str, Decimal]) -> str | None:
    """The priciest model of `model`'s family that is still cheaper per output token (the
    smallest step down), or None: other families are never named, their quality differs."""
    own = prices.get(model)
    if own is None:
        return None
    fam = family(model)
    candidates = [(p, m) for m, p in prices.items() if m != model and family(m) == fam and p < own]
    return max(candidates)[1] if candidates else None


def _ratio(part: int | Decimal, whole: int | Decimal) -> Decimal:
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.001")) if whole else Decimal(0)


def advise(rows: list[Row], prices: dict[str, Decimal]) -> dict[str, list[dict[str, Any]]]:
    """The findings, by kind; a kind with nothing to say is an empty list."""
    repeats: dict[tuple[str, str | None], list[Row]] = defaultdict(list)
    by_model: dict[str | None, list[Row]] = defaultdict(list)
    for r in rows:
        by_model[r.model].append(r)
        if r.body_sha256 is not None:
            repeats[(r.body_sha256, r.model)].append(r)

    found: list[tuple[Decimal, str, dict[str, Any]]] = []
    for (sha, model), same in repeats.items():
        if len(same) < 2:
            continue
        total = sum((r.cost for r in same), Decimal(0))
        # Every send after the first could have been a cache hit, billed at 0.
        saving = (total - total / len(same)).quantize(Decimal("0.000000001")).normalize()
        found.append((saving, sha, {"body_sha256": sha, "model": model, "requests": len(same), "cost_usd": total,
                                    "saving_usd": saving}))
    repeated = [item for _, _, item in sorted(found, key=lambda t: (-t[0], t[1]))]

    low_cache, short, capped = [], [], []
    for model, mine in sorted(by_model.items(), key=lambda kv: kv[0] or ""):
        long = [r for r in mine if r.input_tokens >= LONG_PROMPT_TOKENS]
        if long:
            inp = sum(r.input_tokens for r in long)
            cached = sum(r.cached_input_tokens for r in long)
            ratio = _ratio(cached, inp)
            if ratio < LOW_CACHE_HIT_RATIO:
                low_cache.append({"model": model, "requests": len(long), "input_tokens": inp,
                                  "cached_input_tokens": cached, "hit_ratio": ratio})
        n_short = sum(1 for r in mine if r.output_tokens <= SHORT_OUTPUT_TOKENS)
        share = _ratio(n_short, len(mine))
        if len(mine) >= MIN_REQUESTS and share >= SHORT_SHARE:
            short.append({"model": model, "requests": len(mine), "short_requests": n_short, "short_share": share,
                          "cost_usd": sum((r.cost for r in mine), Decimal(0)),
                          "cheaper_model": cheaper_in_family(model, prices) if model else None})
        cut = [r for r in mine if r.finish_reason == "length"]
        if cut:
            capped.append({"model": model, "requests": len(mine), "hit_max_tokens": len(cut),
                           "share": _ratio(len(cut), len(mine)), "cost_usd": sum((r.cost for r in cut), Decimal(0))})
    return {"repeated_requests": repeated, "low_prompt_cache_hits": low_cache,
            "short_outputs": short, "hit_max_tokens": capped}


_TITLES = {
    "repeated_requests": "Repeated identical requests (response-cache candidates: each repeat could cost 0)",
    "low_prompt_cache_hits": f"Long prompts (>= {LONG_PROMPT_TOKENS} tokens) with a low prompt-cache hit ratio",
    "short_outputs": f"Models whose outputs are short (<= {SHORT_OUTPUT_TOKENS} tokens): a cheaper model may do",
    "hit_max_tokens": "Requests cut off by max_tokens (finish_reason length): paid for, possibly retried",
}


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return f"{value:f}"
    return str(value)


def render(findings: dict[str, list[dict[str, Any]]], since: datetime, until: datetime) -> str:
    lines = [f"tollgate advise: {iso_utc(since)} to {iso_utc(until)}"]
    for kind, items in findings.items():
        if not items:
            continue
        cols = list(items[0])
        cells = [[_text(item[c]) for c in cols] for item in items]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines += ["", _TITLES[kind], "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def cmd_advise(args: argparse.Namespace) -> int:
    settings = report_settings(args.config)
    if settings is None:
        return 2
    if no_ledger(settings):
        return 1
    if args.until is None:
        until = datetime.now(UTC)
    else:  # a date means through the end of that UTC day
        until = args.until.moment + (timedelta(days=1) if args.until.whole_day else timedelta(0))
    since = args.since.moment if args.since is not None else until - timedelta(days=DEFAULT_DAYS)
    try:
        rows = read_rows(Path(settings.ledger.path), since, until)
    except sqlite3.Error as exc:
        print(f"cannot read the spend log at {settings.ledger.path}: {exc}", file=sys.stderr)
        return 1
    findings = advise(rows, output_prices())
    if args.json:
        print(json.dumps({"since": iso_utc(since), "until": iso_utc(until), "requests": len(rows), **findings},
                         default=_text, indent=2))
    elif not any(findings.values()):
        print(f"nothing to advise ({len(rows)} requests from {iso_utc(since)} to {iso_utc(until)})")
    else:
        print(render(findings, since, until))
    return 0


__all__ = ["add_commands", "advise", "cmd_advise", "read_rows", "render"]

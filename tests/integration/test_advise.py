"""`tollgate advise` over a spend log written by the ledger: every row at a fixed instant, and
the period given with --since/--until, so the result holds on any date and clock."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.spend.ledger import SpendRow
from proxy.spend.ledger.sqlite import SqliteLedger
from tests.integration.test_export import write_config

D = Decimal
T = datetime(2031, 3, 1, 12, 0, tzinfo=UTC)
PERIOD = ["--since", "2031-03-01", "--until", "2031-03-01"]


def settle(path: Path, rows: list[SpendRow]) -> None:
    async def run() -> None:
        ledger = await SqliteLedger.open(path)
        try:
            for r in rows:
                await ledger.settle(r.request_id, [], r, T)
        finally:
            await ledger.close()

    asyncio.run(run())


def row(i: int, model: str, *, inp: int = 100, cached: int = 0, out: int = 20, sha: str | None = None,
        finish: str | None = "stop", cost: str = "0.01", when: datetime = T) -> SpendRow:
    return SpendRow(when + timedelta(seconds=i), f"r{i}", "alpha", None, model, "openai", "chat.completions",
                    input_tokens=inp, cached_input_tokens=cached, output_tokens=out, cost=D(cost),
                    outcome="ok", status=200, body_sha256=sha, finish_reason=finish)


def test_advise_reports_each_finding_with_its_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    rows = [row(i, "gpt-4o", sha="a" * 64) for i in range(3)]  # one body sent 3 times, short outputs
    rows += [row(3 + i, "gpt-4o", sha=f"{i:064x}", out=50) for i in range(3)]
    rows += [row(10 + i, "gpt-5-nano", inp=4000, cached=400, out=500, finish="length") for i in range(2)]
    rows += [row(20, "gpt-4o", when=T - timedelta(days=2))]  # outside the period
    settle(tmp_path / "ledger.db", rows)

    assert main(["advise", "--config", str(cfg), *PERIOD, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["requests"] == 8 and got["since"] == "2031-03-01T00:00:00Z" and got["until"] == "2031-03-02T00:00:00Z"
    assert got["repeated_requests"] == [
        {"body_sha256": "a" * 64, "model": "gpt-4o", "requests": 3, "cost_usd": "0.03", "saving_usd": "0.02"}
    ]
    assert got["low_prompt_cache_hits"] == [
        {"model": "gpt-5-nano", "requests": 2, "input_tokens": 8000, "cached_input_tokens": 800, "hit_ratio": "0.100"}
    ]
    # gpt-4o's family has gpt-4o-mini: named; other families are never suggested.
    assert got["short_outputs"] == [
        {"model": "gpt-4o", "requests": 6, "short_requests": 6, "short_share": "1.000", "cost_usd": "0.06",
         "cheaper_model": "gpt-4o-mini"}
    ]
    assert got["hit_max_tokens"] == [
        {"model": "gpt-5-nano", "requests": 2, "hit_max_tokens": 2, "share": "1.000", "cost_usd": "0.02"}
    ]

    assert main(["advise", "--config", str(cfg), *PERIOD]) == 0
    table = capsys.readouterr().out
    assert "Repeated identical requests" in table and "gpt-4o-mini" in table and "0.100" in table


def test_nothing_to_advise_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    settle(tmp_path / "ledger.db", [row(0, "gpt-4o")])
    assert main(["advise", "--config", str(cfg), *PERIOD]) == 0
    assert capsys.readouterr().out.startswith("nothing to advise (1 requests")

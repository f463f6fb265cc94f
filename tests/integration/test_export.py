"""`tollgate export`: raw and FOCUS rows, and cursors that neither skip nor repeat a row,
even while other processes write the spend log."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.cli_export import open_spend_log, write_export
from proxy.spend.ledger import SpendRow
from proxy.spend.ledger.export import FOCUS_FIELDS, RAW_FIELDS, spend_log_identity
from proxy.spend.ledger.sqlite import SqliteLedger

ROOT = Path(__file__).resolve().parents[2]
D = Decimal


def write_config(tmp_path: Path, name: str = "ledger.db") -> Path:
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"""
upstreams:
  openai: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
routes:
  - {{models: ["gpt-*"], upstream: openai}}
ledger: {{path: {tmp_path / name}}}
""")
    return cfg


def settle_rows(path: Path, rows: list[tuple[str, Decimal]], when: datetime) -> None:
    async def run() -> None:
        ledger = await SqliteLedger.open(path)
        try:
            for i, (rid, cost) in enumerate(rows):
                row = SpendRow(
                    when + timedelta(seconds=i), rid, "alpha", "alice", "gpt-5-nano", "openai", "chat.completions",
                    input_tokens=100, cached_input_tokens=40, output_tokens=20, cost=cost, outcome="ok", status=200,
                    team="search", key_metadata={"team": "search", "cost_center": "cc-7"},
                )
                await ledger.settle(rid, [], row, when)
        finally:
            await ledger.close()

    asyncio.run(run())


def export(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err


def cursor_of(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("cursor: ")]
    assert len(lines) == 1, err
    return lines[0].removeprefix("cursor: ")


def test_jsonl_then_only_newer_rows_after_the_cursor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    now = datetime.now(UTC)
    settle_rows(tmp_path / "ledger.db", [("r1", D("0.25")), ("r2", D("0.000000125"))], now - timedelta(hours=2))
    code, out, err = export(["--config", str(cfg)], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["ledger_id"] for r in rows] == ["r1", "r2"]
    assert list(rows[0]) == list(RAW_FIELDS)
    assert [r["cost_usd"] for r in rows] == ["0.250000000", "0.000000125"]  # exact, never 1.25E-7
    assert rows[0]["key_metadata"] == {"team": "search", "cost_center": "cc-7"} and rows[0]["team"] == "search"
    first = cursor_of(err)

    # A row written later with an *older* time (a Redis instance's recovered row) is still
    # after the cursor: the cursor follows commit order, not time.
    settle_rows(tmp_path / "ledger.db", [("r3", D("1"))], now - timedelta(days=3))
    code, out, err = export(["--config", str(cfg), "--since-cursor", first], capsys)
    assert code == 0, err
    assert [json.loads(line)["ledger_id"] for line in out.splitlines()] == ["r3"]
    second = cursor_of(err)

    code, out, err = export(["--config", str(cfg), "--since-cursor", second], capsys)
    assert (code, out) == (0, "")
    assert cursor_of(err) == second  # nothing new: the same cursor again


def test_csv_and_the_focus_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    when = datetime.now(UTC).replace(minute=30, second=0, microsecond=0) - timedelta(days=1)
    settle_rows(tmp_path / "ledger.db", [("r1", D("0.5")), ("r2", D("0.125"))], when)
    code, out, err = export(["--config", str(cfg), "--format", "csv"], capsys)
    assert code == 0, err
    raw = list(csv.DictReader(io.StringIO(out)))
    assert [r["cost_usd"] for r in raw] == ["0.500000000", "0.125000000"]
    assert raw[0]["user"] == "alice" and json.loads(raw[0]["key_metadata"])["cost_center"] == "cc-7"

    code, out, err = export(["--config", str(cfg), "--format", "csv", "--focus"], capsys)
    assert code == 0, err
    reader = csv.DictReader(io.StringIO(out))
    assert tuple(reader.fieldnames or ()) == FOCUS_FIELDS
    focus = list(reader)
    assert sum(D(r["BilledCost"]) for r in focus) == D("0.625")
    r = focus[0]
    hour = when.replace(minute=0)
    assert r["ChargePeriodStart"] == hour.isoformat().replace("+00:00", "Z")
    assert r["ChargePeriodEnd"] == (hour + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert (r["BillingCurrency"], r["ChargeCategory"], r["ConsumedUnit"], r["ConsumedQuantity"]) == (
        "USD", "Usage", "Tokens", "120",
    )
    assert (r["SkuId"], r["ResourceId"], r["ProviderName"], r["SubAccountId"]) == (
        "gpt-5-nano", "openai/gpt-5-nano", "openai", "alpha",
    )
    assert r["EffectiveCost"] == r["ListCost"] == r["BilledCost"] == "0.500000000"
    assert r["RegionId"] == "" and r["InvoiceId"] == "" and r["CommitmentDiscountId"] == ""
    tags = json.loads(r["Tags"])
    assert tags["cost_center"] == "cc-7" and tags["tollgate/user"] == "alice" and tags["tollgate/team"] == "search"

    code, out, err = export(["--config", str(cfg), "--focus"], capsys)
    assert code == 0, err
    line = json.loads(out.splitlines()[0])
    assert line["Tags"]["tollgate/key"] == "alpha" and line["RegionName"] is None


def test_bad_cursors_and_missing_ledger_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    code, _, err = export(["--config", str(cfg)], capsys)
    assert code == 1 and "no ledger at" in err and len(err.strip().splitlines()) == 1
    settle_rows(tmp_path / "ledger.db", [("r1", D("1"))], datetime.now(UTC))
    for bad in ("nonsense", "dGdlMTp4OnNldmVu"):
        code, out, err = export(["--config", str(cfg), "--since-cursor", bad], capsys)
        assert (code, out) == (2, "")
        assert err.startswith("--since-cursor:") and len(err.strip().splitlines()) == 1

    other = write_config(tmp_path, "other.db")
    settle_rows(tmp_path / "other.db", [("o1", D("1"))], datetime.now(UTC))
    code, _, err = export(["--config", str(other)], capsys)
    foreign = cursor_of(err)
    code, out, err = export(["--config", str(cfg), "--since-cursor", foreign], capsys)
    assert (code, out) == (2, "") and "another spend log" in err

    with pytest.raises(SystemExit) as exc:
        main(["export", "--config", str(cfg), "--format", "xml"])
    assert exc.value.code == 2


WRITER = textwrap.dedent("""
    import asyncio, sys
    from datetime import UTC, datetime
    from decimal import Decimal
    from proxy.spend.ledger import SpendRow
    from proxy.spend.ledger.sqlite import SqliteLedger

    async def run(path, name, n):
        ledger = await SqliteLedger.open(path)
        try:
            for i in range(n):
                now = datetime.now(UTC)
                rid = f"{name}-{i}"
                await ledger.settle(rid, [], SpendRow(now, rid, name, None, "m", "u", "e", cost=Decimal("0.001")), now)
        finally:
            await ledger.close()

    asyncio.run(run(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


def test_cursors_never_skip_or_repeat_a_row_while_two_processes_write(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    settle_rows(path, [("seed", D("1"))], datetime.now(UTC))
    per_writer = 300
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(per_writer)], cwd=ROOT)
        for name in ("w1", "w2")
    ]
    conn = open_spend_log(path)
    identity = spend_log_identity(conn)
    seen: list[str] = []
    after = 0
    exports = 0
    try:
        while True:
            running = any(w.poll() is None for w in writers)
            out = io.StringIO()
            after = write_export(conn, identity, after, "jsonl", False, out)
            seen += [json.loads(line)["ledger_id"] for line in out.getvalue().splitlines()]
            exports += 1
            if not running:
                break
    finally:
        for w in writers:
            w.wait(timeout=120)
        conn.close()
    assert all(w.returncode == 0 for w in writers)
    expected = {"seed"} | {f"{n}-{i}" for n in ("w1", "w2") for i in range(per_writer)}
    assert len(seen) == len(set(seen)), "a row was exported twice"
    assert set(seen) == expected, "a row was skipped"
    assert exports > 2  # the exports really interleaved with the writes

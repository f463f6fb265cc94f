"""`tollgate keys`, `tollgate spend`, `tollgate budgets` against a real ledger file."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.config_file import load_settings
from proxy.keys import hash_key
from proxy.spend.budgets import buckets_for, charges
from proxy.spend.ledger import SpendRow
from proxy.spend.ledger.sqlite import SqliteLedger

ROOT = Path(__file__).resolve().parents[2]
D = Decimal


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "tollgate.yaml"
    cfg.write_text(f"""
upstreams:
  openai: {{kind: openai, base_url: "http://127.0.0.1:9/v1"}}
routes:
  - {{models: ["gpt-*"], upstream: openai}}
budgets:
  - name: team-daily
    period: daily
    limit_usd: 5
  - name: per-user
    period: monthly
    limit_usd: 1
    scope: {{user: "*"}}
  - name: quiet
    period: weekly
    limit_usd: 2
    action: warn
    scope: {{model: "gpt-4o*"}}
ledger: {{path: {tmp_path / "ledger.db"}}}
""")
    return cfg


def seed(cfg: Path) -> None:
    """Three settled requests on two days (spend log), and today's budgets touched by them."""
    settings = load_settings(cfg, env={})
    rows = [
        ("r1", datetime(2025, 6, 1, 10, tzinfo=UTC), "alpha", "alice", "gpt-5-nano", D("0.25")),
        ("r2", datetime(2025, 6, 1, 23, tzinfo=UTC), "alpha", "bob", "gpt-5-nano", D("0.5")),
        ("r3", datetime(2025, 6, 2, 1, tzinfo=UTC), "beta", None, "gpt-5", D("1.125")),
    ]

    async def run() -> None:
        ledger = await SqliteLedger.open(settings.ledger.path)
        try:
            now = datetime.now(UTC)
            for rid, t, key, user, model, cost in rows:
                buckets = buckets_for(settings.budgets, key, user, model, now)
                assert (await ledger.reserve(rid, charges(buckets, cost), 60, now)).ok
                row = SpendRow(t, rid, key, user, model, "openai", "chat.completions",
                               input_tokens=10, output_tokens=20, cost=cost, outcome="ok", status=200)
                await ledger.settle(rid, charges(buckets, cost, 30), row, now)
            # One request still in flight for alice.
            await ledger.reserve("r4", charges(buckets_for(settings.budgets, None, "alice", "gpt-5", now), D("0.1")), 600, now)
        finally:
            await ledger.close()

    asyncio.run(run())


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_hash_from_argument_and_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run_main(["keys", "hash", "tg-secret"], capsys)
    assert code == 0 and out == hash_key("tg-secret") + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("tg-secret\n"))
    code, out, _ = run_main(["keys", "hash"], capsys)
    assert code == 0 and out == hash_key("tg-secret") + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code, out, err = run_main(["keys", "hash"], capsys)
    assert code == 2 and out == "" and "no key given" in err


def test_keys_new_prints_a_fresh_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    _, first, _ = run_main(["keys", "new"], capsys)
    _, second, _ = run_main(["keys", "new"], capsys)
    key_line, hash_line = first.splitlines()
    key = key_line.removeprefix("key: ")
    assert key.startswith("tg-") and len(key) > 40
    assert hash_line == f"key_sha256: {hash_key(key)}"
    assert first != second


def test_spend_csv_grouped_and_filtered_by_date(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    seed(cfg)
    code, out, _ = run_main(["spend", "--config", str(cfg), "--by", "key,day", "--csv"], capsys)
    assert code == 0
    assert out.splitlines() == [
        "key,day,requests,input_tokens,cached_input_tokens,output_tokens,reasoning_tokens,cost_usd",
        "alpha,2025-06-01,2,20,0,40,0,0.750000000",
        "beta,2025-06-02,1,10,0,20,0,1.125000000",
    ]
    # --to a date includes that whole day; --from is inclusive.
    _, out, _ = run_main(["spend", "--config", str(cfg), "--by", "user", "--csv", "--to", "2025-06-01"], capsys)
    assert out.splitlines()[1:] == ["alice,1,10,0,20,0,0.250000000", "bob,1,10,0,20,0,0.500000000"]
    _, out, _ = run_main(
        ["spend", "--config", str(cfg), "--by", "model", "--csv", "--from", "2025-06-01T23:00:00Z"], capsys
    )
    assert out.splitlines()[1:] == ["gpt-5,1,10,0,20,0,1.125000000", "gpt-5-nano,1,10,0,20,0,0.500000000"]


def test_spend_table_is_aligned_with_a_total(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    seed(cfg)
    code, out, _ = run_main(["spend", "--config", str(cfg), "--by", "user"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["user", "requests", "input", "cached", "output", "reasoning", "cost_usd"]
    assert [line.split()[0] for line in lines[1:]] == ["-", "alice", "bob", "total"]
    assert lines[-1].split() == ["total", "3", "30", "0", "60", "0", "1.875000000"]
    # Numbers are right-aligned: every line ends its cost column at the same place.
    assert len({len(line) for line in lines}) == 1


def test_spend_rejects_bad_arguments_and_missing_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit) as bad:
        main(["spend", "--config", str(cfg), "--by", "colour"])
    assert bad.value.code == 2 and "cannot group spend by 'colour'" in capsys.readouterr().err
    code, _, err = run_main(["spend", "--config", str(cfg)], capsys)
    assert code == 1 and "no ledger at" in err
    assert not (tmp_path / "ledger.db").exists()  # a report never creates one


def test_budgets_json_lists_every_rule_including_untouched_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    seed(cfg)
    code, out, _ = run_main(["budgets", "--config", str(cfg), "--json"], capsys)
    assert code == 0
    data = json.loads(out)["data"]
    got = [(d["name"], d["user"], d["spent"], d["reserved"], d["limit_usd"], d["remaining"]) for d in data]
    assert got == [
        ("per-user", "alice", "0.250000000", "0.100000000", "1.000000000", "0.650000000"),
        ("per-user", "bob", "0.500000000", "0.000000000", "1.000000000", "0.500000000"),
        ("quiet", None, "0.000000000", "0.000000000", "2.000000000", "2.000000000"),  # no gpt-4o traffic yet: listed from the config
        ("team-daily", None, "1.875000000", "0.100000000", "5.000000000", "3.025000000"),
    ]
    assert all(d["window_end"].endswith("Z") for d in data)
    # The forecast's figures depend on the time of day the test runs: check their shape.
    for d in data:
        assert d["forecast"] in ("under", "over", "exceeded", "too-early")
        if d["projected_usd"] is not None:
            assert Decimal(d["projected_usd"]) >= Decimal(d["spent"])
        assert d["limit_at"] is None or d["limit_at"].endswith("Z")


def test_budgets_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path)
    seed(cfg)
    code, out, _ = run_main(["budgets", "--config", str(cfg)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "budget", "scope", "action", "spent", "reserved", "limit", "remaining", "projected", "limit", "hit", "resets",
    ]
    assert lines[1].split()[:8] == ["per-user", "user", "alice", "block", "$0.25", "$0.10", "$1.00", "$0.65"]
    assert lines[3].split()[:5] == ["quiet", "global", "warn", "$0.00", "$0.00"]
    assert lines[4].split()[:7] == ["team-daily", "global", "block", "$1.875", "$0.10", "$5.00", "$3.025"]


def test_cli_as_a_subprocess(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    seed(cfg)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "spend", "--config", str(cfg), "--by", "", "--csv"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "requests,input_tokens,cached_input_tokens,output_tokens,reasoning_tokens,cost_usd",
        "3,30,0,60,0,1.875000000",
    ]
    hashed = subprocess.run(
        [sys.executable, "-m", "proxy", "keys", "hash"], input="tg-x\n", cwd=ROOT,
        capture_output=True, text=True, timeout=60,
    )
    assert hashed.returncode == 0 and hashed.stdout.strip() == hash_key("tg-x")


def test_version_default_config_and_a_closed_pipe(tmp_path: Path) -> None:
    version = subprocess.run([sys.executable, "-m", "proxy", "--version"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("tollgate 0.")
    # check-config with no argument checks the documented default, as its header says.
    checked = subprocess.run([sys.executable, "-m", "proxy", "check-config"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and checked.stdout.startswith("config/tollgate.yaml: ok"), checked.stderr
    # A reader that stops early (`| head -c 1`) ends the output quietly.
    cfg = write_config(tmp_path)
    seed(cfg)
    piped = subprocess.run(
        f"{sys.executable} -m proxy budgets --config {cfg} --json | head -c 1",
        shell=True, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert piped.stdout == "{" and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr

"""`python -m bench run --smoke`: every server starts, every target answers every workload, the
report renders. The figures of a smoke run mean nothing and are not checked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import nginx

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_smoke_run_measures_every_target(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# Tollgate benchmark — SMOKE RUN")

    targets = [
        "direct (no proxy)",
        "bare aiohttp passthrough",
        "Tollgate (all on)",
        "Tollgate (all on + OTLP tracing)",
    ]
    if nginx.find_nginx() is not None:
        targets.append("proxy_pass")
    sections = text.split("### ")[1:5]
    assert len(sections) == 4
    for section in sections:
        for target in targets:
            row = next((line for line in section.splitlines() if target in line), None)
            assert row is not None, f"{target} missing in:\n{section}"
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert float(cells[1]) > 0, row  # rps
            errors, total = map(int, cells[-1].split("/"))
            assert errors == 0 and total > 0, row
            if target != "direct (no proxy)":
                assert float(cells[7]) > 0, row  # CPU ms per request was measured
    # Worker scaling is measured where there is concurrency.
    assert sum("2 workers" in s for s in sections) == 2
    goals = text.split("## Goals")[1]
    assert len(re.findall(r"^\| .* \| (met|\*\*not met\*\*|n/a) \|$", goals, re.MULTILINE)) == 7


def test_bench_ledger_measures_settlements_per_process_count() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "ledger", "--processes", "1,2", "--seconds", "0.5", "--concurrency", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = re.findall(r"^\| (\d+) \| (\d+) \| ([\d.]+) \|$", proc.stdout, re.MULTILINE)
    assert [int(n) for n, _, _ in rows] == [1, 2], proc.stdout
    assert all(int(rate) > 0 and float(cpu) > 0 for _, rate, cpu in rows), proc.stdout

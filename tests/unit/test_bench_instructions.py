"""The arithmetic of `python -m bench instructions` (the valgrind runs themselves are the
bench's, not the suite's: minutes each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.instructions import VARIANTS, per_request, render, summary_instructions, tollgate_config

CACHEGRIND_OUT = """desc: I1 cache: 32768 B, 64 B, 8-way associative
cmd: python -m proxy serve
events: Ir
fl=???
fn=0x0000000000001100
0 3
summary: 1161241983
"""


def test_the_total_is_read_from_the_summary_line() -> None:
    assert summary_instructions(CACHEGRIND_OUT) == 1_161_241_983
    with pytest.raises(ValueError, match="summary"):
        summary_instructions("events: Ir\n")


def test_start_up_and_shutdown_cancel_out() -> None:
    fixed = 900_000_000
    assert per_request(fixed + 100 * 1_800_000, fixed + 500 * 1_800_000, 100, 500) == 1_800_000
    with pytest.raises(ValueError):
        per_request(1, 2, 500, 100)


def test_each_variant_switches_off_what_it_says() -> None:
    configs = {v.name: tollgate_config(v, 8000, Path("/tmp/l.db")) for v in VARIANTS}
    assert "budgets:" in configs["tollgate"] and "leasing:" in configs["tollgate"]
    assert "budgets:" in configs["tollgate-perreq"] and "leasing:" not in configs["tollgate-perreq"]
    assert "budgets:" not in configs["tollgate-nobudget"] and "access_log: true" in configs["tollgate-nobudget"]
    assert "access_log: false" in configs["tollgate-nolog"]


def test_the_report_gives_ratios_to_the_passthrough_and_the_cost_of_each_part() -> None:
    rows = {"non-stream": {"passthrough": 600_000.0, "tollgate": 1_800_000.0, "tollgate-nobudget": 1_500_000.0,
                           "tollgate-nolog": 1_450_000.0, "tollgate-perreq": 2_400_000.0}}
    labels = {"passthrough": "bare", **{v.name: v.label for v in VARIANTS}}
    text = render(rows, labels, {"non-stream": (100, 500)})
    assert "| Tollgate (all on: budget from quota leases) | 1800.0 | 3.00 |" in text
    assert "the access log 50.0k" in text and "the budget from leases 300.0k" in text
    assert "the budget reserved per request 900.0k" in text


def test_another_trees_tollgate_runs_that_trees_code(tmp_path: Path) -> None:
    """`python -m proxy` imports its working directory's package before PYTHONPATH's: an A/B
    run (`bench run --ref-tree`, `bench instructions --tree`) that only set PYTHONPATH ran this
    repository's Tollgate against itself."""
    from bench import procs
    from bench.runner import PY

    tree = tmp_path / "ref"
    (tree / "proxy").mkdir(parents=True)
    (tree / "proxy" / "__init__.py").write_text("")
    (tree / "proxy" / "__main__.py").write_text("import proxy\nprint('READY', proxy.__file__, flush=True)\n")
    child = procs.start("which-proxy", [PY, "-m", "proxy"], tmp_path, ready=r"READY", env={"PYTHONPATH": str(tree)},
                        cwd=tree)
    child.proc.wait(10)
    assert f"READY {tree / 'proxy' / '__init__.py'}" in child.log_path.read_text()

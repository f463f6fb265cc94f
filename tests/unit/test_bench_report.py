"""The LiteLLM goal of bench/RESULTS.md comes from LiteLLM measured in the same run, paired per
repetition with Tollgate, and says so when LiteLLM was not run instead of using old figures."""

from __future__ import annotations

from typing import Any

import yaml

from bench import litellm, loadgen, report, runner


def _load(rps: float, completed: int = 100) -> dict[str, Any]:
    return {
        "completed": completed,
        "errors": 0,
        "elapsed_s": completed / rps,
        "rps": rps,
        "latency_p50_ms": 10.0,
        "latency_p99_ms": 20.0,
        "ttft_p50_ms": 1.0,
        "ttft_p99_ms": 2.0,
        "gap_p50_ms": 1.0,
        "gap_p99_ms": 2.0,
        "error_samples": [],
    }


def _result(rps: dict[tuple[str, str, int], float], with_litellm: bool) -> runner.RunResult:
    plan = runner.full_plan(reps=2, workloads=("ns-c64", "s64-c256"))
    names = ["direct", "tollgate"] + (["litellm"] if with_litellm else [])
    targets = [runner.Target(n, f"label of {n}", "http://127.0.0.1:1", None) for n in names]
    result = runner.RunResult(plan=plan, targets=targets)
    result.litellm_version = litellm.VERSION if with_litellm else None
    for (target, workload, rep), value in rps.items():
        if target in names:
            result.measures.append(runner.Measure(target, workload, rep, _load(value), 1.0, 50.0))
    return result


RPS = {
    ("direct", "ns-c64", 0): 5000.0,
    ("direct", "ns-c64", 1): 5000.0,
    ("tollgate", "ns-c64", 0): 900.0,
    ("tollgate", "ns-c64", 1): 1000.0,
    ("litellm", "ns-c64", 0): 30.0,  # 30×
    ("litellm", "ns-c64", 1): 40.0,  # 25×
    ("direct", "s64-c256", 0): 600.0,
    ("direct", "s64-c256", 1): 600.0,
    ("tollgate", "s64-c256", 0): 400.0,
    ("tollgate", "s64-c256", 1): 300.0,
    ("litellm", "s64-c256", 0): 10.0,  # 40×
    ("litellm", "s64-c256", 1): 5.0,  # 60×
}


def _litellm_goal(result: runner.RunResult) -> report.Goal:
    return next(g for g in report.goals(result) if "LiteLLM" in g.text)


def test_goal_is_the_median_of_tollgate_over_litellm_per_repetition() -> None:
    goal = _litellm_goal(_result(RPS, with_litellm=True))
    assert "ns-c64: 950 / 35.0 rps = 27.5×" in goal.measured
    assert "s64-c256: 350 / 7.5 rps = 50.0×" in goal.measured
    assert goal.ok is False  # 27.5× < 30× on ns-c64


def test_goal_is_met_when_both_workloads_reach_30x() -> None:
    rps = {**RPS, ("litellm", "ns-c64", 0): 20.0, ("litellm", "ns-c64", 1): 25.0}
    assert _litellm_goal(_result(rps, with_litellm=True)).ok is True


def test_without_litellm_the_goal_says_not_measured_and_is_not_judged() -> None:
    result = _result(RPS, with_litellm=False)
    goal = _litellm_goal(result)
    assert goal.ok is None
    assert goal.measured == "ns-c64: LiteLLM not measured in this run; s64-c256: LiteLLM not measured in this run"
    text = report.render(result, "python -m bench run")
    assert "- LiteLLM: not measured in this run" in text
    assert "| n/a |" in next(line for line in text.splitlines() if "LiteLLM's throughput" in line)


def test_render_shows_litellm_rows_and_version() -> None:
    text = report.render(_result(RPS, with_litellm=True), "python -m bench run")
    assert f"- LiteLLM: {litellm.VERSION} " in text
    sections = text.split("### ")[1:3]
    assert all("| label of litellm |" in s for s in sections)


def test_only_a_full_run_or_a_named_target_brings_litellm() -> None:
    assert runner.full_plan().litellm
    assert runner.full_plan(targets=("tollgate", "litellm")).litellm
    assert not runner.full_plan(targets=("tollgate",)).litellm
    assert not runner.smoke_plan().litellm


def test_litellm_config_routes_the_model_to_the_upstream_with_the_clients_key() -> None:
    cfg = yaml.safe_load(litellm.config_yaml(41234))
    (entry,) = cfg["model_list"]
    assert entry["model_name"] == "gpt-4o-mini"
    assert entry["litellm_params"]["model"] == "openai/gpt-4o-mini"
    assert entry["litellm_params"]["api_base"] == "http://127.0.0.1:41234/v1"
    assert cfg["general_settings"]["master_key"] == loadgen.CLIENT_KEY
    assert "database_url" not in cfg["general_settings"]
    assert cfg["litellm_settings"]["telemetry"] is False

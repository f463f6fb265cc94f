"""Medians, ratios and the goals of issue 6, rendered as bench/RESULTS.md."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from bench.runner import Measure, RunResult, median_of


@dataclass(frozen=True)
class Row:
    target: str
    rps: float | None
    rps_reps: list[float]
    latency_p50: float | None
    latency_p99: float | None
    ttft_p50: float | None
    gap_p50: float | None
    gap_p99: float | None
    cpu_ms: float | None
    rss_mb: float | None
    errors: int
    completed: int


def rows(result: RunResult, workload: str) -> dict[str, Row]:
    out: dict[str, Row] = {}
    for t in result.targets:
        ms = [m for m in result.measures if m.target == t.name and m.workload == workload]
        if not ms:
            continue
        out[t.name] = Row(
            target=t.name,
            rps=median_of([m.load["rps"] for m in ms]),
            rps_reps=[m.load["rps"] for m in ms],
            latency_p50=median_of([m.load["latency_p50_ms"] for m in ms]),
            latency_p99=median_of([m.load["latency_p99_ms"] for m in ms]),
            ttft_p50=median_of([m.load["ttft_p50_ms"] for m in ms]),
            gap_p50=median_of([m.load["gap_p50_ms"] for m in ms]),
            gap_p99=median_of([m.load["gap_p99_ms"] for m in ms]),
            cpu_ms=median_of([m.cpu_ms_per_request for m in ms]),
            rss_mb=max((m.peak_rss_mb for m in ms if m.peak_rss_mb is not None), default=None),
            errors=sum(m.load["errors"] for m in ms),
            completed=sum(m.load["completed"] for m in ms),
        )
    return out


def paired(
    result: RunResult, workload: str, target: str, ref: str, key: str, op: str = "ratio"
) -> float | None:
    """Median over repetitions of target-vs-ref in the same repetition (measured moments
    apart), which cancels drift of the machine that the medians of each alone would keep."""

    def value(m: Measure) -> float | None:
        return m.cpu_ms_per_request if key == "cpu" else m.load[key]

    by_rep: dict[int, dict[str, float | None]] = {}
    for m in result.measures:
        if m.workload == workload and m.target in (target, ref):
            by_rep.setdefault(m.rep, {})[m.target] = value(m)
    out: list[float | None] = []
    for pair in by_rep.values():
        a, b = pair.get(target), pair.get(ref)
        if a is None or b is None:
            continue
        out.append(a - b if op == "diff" else _ratio(a, b))
    return median_of(out)


def _f(v: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if v is None else f"{v:.{digits}f}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


@dataclass(frozen=True)
class Goal:
    text: str
    measured: str
    ok: bool | None  # None: could not be judged


def goals(result: RunResult) -> list[Goal]:
    out: list[Goal] = []

    def row(workload: str, target: str) -> Row | None:
        return rows(result, workload).get(target)

    # 1. non-stream CPU per request vs the bare passthrough
    parts: list[str] = []
    oks: list[bool | None] = []
    for wl in ("ns-c1", "ns-c64"):
        tg, bare = row(wl, "tollgate"), row(wl, "passthrough")
        r = paired(result, wl, "tollgate", "passthrough", "cpu")
        parts.append(
            f"{wl}: {_f(tg.cpu_ms if tg else None, 3)} / {_f(bare.cpu_ms if bare else None, 3)} ms = {_f(r)}×"
        )
        oks.append(None if r is None else r <= 1.5)
    out.append(
        Goal(
            "Non-stream CPU/request ≤ 1.5 × bare passthrough, budget on (stretch: 1.25 ×)",
            "; ".join(parts),
            _all(oks),
        )
    )

    # 2. stream CPU per stream
    parts, oks = [], []
    for wl in ("s64-c1", "s64-c256"):
        tg = row(wl, "tollgate")
        v = tg.cpu_ms if tg else None
        r = paired(result, wl, "tollgate", "passthrough", "cpu")
        parts.append(f"{wl}: {_f(v, 3)} ms = {_f(r)}× passthrough")
        oks.append(None if r is None else r <= 1.3)
    out.append(Goal("64-chunk stream CPU/stream ≤ 1.3 × bare passthrough", "; ".join(parts), _all(oks)))

    # 3. stream throughput vs direct
    r = paired(result, "s64-c256", "tollgate", "direct", "rps")
    out.append(Goal("c=256 stream rps ≥ 0.75 × direct", f"{_f(r)}×", None if r is None else r >= 0.75))

    # 4. added TTFT
    added = paired(result, "s64-c1", "tollgate", "direct", "ttft_p50_ms", op="diff")
    out.append(
        Goal("Added TTFT p50 at c=1 ≤ 1 ms", f"{_f(added, 3)} ms", None if added is None else added <= 1.0)
    )

    # 5. RSS
    tg = row("s64-c256", "tollgate")
    rss = tg.rss_mb if tg else None
    out.append(
        Goal("RSS ≤ 80 MB with 256 open streams", f"{_f(rss, 1)} MB peak", None if rss is None else rss <= 80)
    )

    # 6. vs LiteLLM, measured in this run (no figure carried over from another machine or day)
    parts, oks = [], []
    for wl in ("ns-c64", "s64-c256"):
        tg, lite = row(wl, "tollgate"), row(wl, "litellm")
        if lite is None or not lite.completed:
            parts.append(f"{wl}: LiteLLM not measured in this run")
            oks.append(None)
            continue
        times = paired(result, wl, "tollgate", "litellm", "rps")
        parts.append(
            f"{wl}: {_f(tg.rps if tg else None, 0)} / {_f(lite.rps, 1)} rps = {_f(times, 1)}×"
        )
        oks.append(None if times is None else times >= 30)
    out.append(
        Goal(
            "≥ 30 × LiteLLM's throughput (Tollgate rps / LiteLLM rps, same run)",
            "; ".join(parts),
            _all(oks),
        )
    )

    # 7. workers
    parts, oks = [], []
    for wl in ("ns-c64", "s64-c256"):
        r = paired(result, wl, "tollgate-2w", "tollgate", "rps")
        parts.append(f"{wl}: {_f(r)}×")
        oks.append(None if r is None else r >= 1.6)
    out.append(
        Goal(
            f"2 workers ≥ 1.6 × 1 worker's rps (this machine: {os.cpu_count()} cores, shared with "
            "the load generator and the upstream)",
            "; ".join(parts),
            _all(oks),
        )
    )
    return out


def _all(oks: list[bool | None]) -> bool | None:
    if any(o is None for o in oks):
        return None
    return all(oks)


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "unknown"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "proxy"], capture_output=True, text=True, check=False
    )
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem}; {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()}, aiohttp {_pkg('aiohttp')}, uvloop {_pkg('uvloop')}, "
        f"orjson {_pkg('orjson')}, prometheus-client {_pkg('prometheus-client')}, "
        f"opentelemetry-sdk {_pkg('opentelemetry-sdk')}",
        f"- Tollgate at git {rev.stdout.strip() or 'unknown'}"
        + (" (with uncommitted changes in proxy/)" if dirty.stdout.strip() else ""),
    ]


TARGET_ORDER = (
    "direct",
    "nginx",
    "passthrough",
    "tollgate",
    "tollgate-ref",
    "tollgate-nobudget",
    "tollgate-perreq",
    "tollgate-otel",
    "tollgate-2w",
    "litellm",
)


def render(result: RunResult, command: str) -> str:
    plan = result.plan
    labels = {t.name: t.label for t in result.targets}
    lines: list[str] = []
    title = (
        "Tollgate benchmark — SMOKE RUN (checks the machinery; figures mean nothing)"
        if plan.smoke
        else "Tollgate benchmark"
    )
    lines += [f"# {title}", ""]
    lines += [
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(result.started))} "
        f"in {result.wall_s:.0f} s. Do not edit by hand: rerun the command.",
        "",
        "## Machine",
        "",
        *machine(),
        f"- nginx: {result.nginx_version or 'not installed'} (1 worker process)",
        "- LiteLLM: "
        + (
            f"{result.litellm_version} (`litellm[proxy]` in its own venv, 1 worker)"
            if result.litellm_version
            else "not measured in this run"
        ),
        f"- Load average (1/5/15 min) before the run: {result.loadavg[0] if result.loadavg else '?'}; "
        f"after: {result.loadavg[1] if len(result.loadavg) > 1 else '?'} (anything above what the bench "
        "itself adds means other work shared the cores: rps figures are noisier than CPU/request).",
        "",
        "## Setup",
        "",
        f"- Fake OpenAI upstream (bench/upstream.py, its own process): chat completions, "
        f"{plan.chunks} content chunks per stream (+ role, finish, usage chunks and `[DONE]`) in "
        f"the shape OpenAI writes since 2025 (no logprobs, an `obfuscation` string last), "
        f"TTFT {plan.ttft_ms:g} ms, {plan.gap_ms:g} ms between chunks; non-stream body after "
        f"{plan.latency_ms:g} ms.",
        f"- Load generator (bench/loadgen.py, aiohttp + uvloop, the runner's process): fixed "
        f"concurrency, {plan.duration_s:g} s per measure (at most {plan.max_requests} requests), "
        f"{plan.reps} repetitions interleaved across targets; figures are medians of the repetitions.",
        "- Tollgate: `tollgate serve` with measurement, pricing, Prometheus (metrics port on) and the "
        "JSON access log (to /dev/null) on"
        + (
            ", and a daily USD budget on the SQLite ledger, admitted from quota leases (the "
            "per-request variant reserves and settles each request in the ledger)"
            if result.budget_on
            else ""
        )
        + "; the tracing variant also exports every span over OTLP/HTTP to a local receiver that "
        "discards them (bench/sink.py).",
        *(
            [
                "- LiteLLM proxy (bench/litellm.py): `litellm --config` with one model routed to the "
                "same upstream (`openai/` provider, `api_base`), master key auth, no database (so no "
                "spend logs), usage telemetry off; checked to proxy a completion and a stream before "
                "measuring. Same workloads and concurrency as every other target."
            ]
            if result.litellm_version
            else []
        ),
        "- CPU = the proxy's processes (all threads, all children) run time from "
        "/proc/<pid>/task/*/schedstat, divided by requests completed. RSS = VmRSS of the same "
        "processes, peak of 100 ms samples.",
        "- TTFT = request sent to the first read holding a content delta, at the client. Gaps = "
        "time between successive reads of a stream.",
        "",
    ]
    for note in result.notes:
        lines.append(f"> {note}")
    if result.notes:
        lines.append("")

    lines += ["## Results", ""]
    for wl in plan.workloads:
        table = rows(result, wl.name)
        lines += [
            f"### {wl.label}",
            "",
            "| target | rps | × direct¹ | p50 ms | p99 ms | TTFT p50 ms | gap p50 / p99 ms "
            "| CPU ms/req | peak RSS MB | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in TARGET_ORDER:
            r = table.get(name)
            if r is None:
                continue
            x = paired(result, wl.name, name, "direct", "rps")
            gaps = f"{_f(r.gap_p50, 3)} / {_f(r.gap_p99, 2)}" if wl.stream else "–"
            lines.append(
                f"| {labels.get(name, name)} | {_f(r.rps, 0)} | {_f(x)} | {_f(r.latency_p50)} | {_f(r.latency_p99)} | "
                f"{_f(r.ttft_p50, 3) if wl.stream else '–'} | {gaps} | {_f(r.cpu_ms, 3)} | {_f(r.rss_mb, 1)} | "
                f"{r.errors}/{r.completed + r.errors} |"
            )
        rep_text = "; ".join(
            f"{name} " + "/".join(f"{v:.0f}" for v in table[name].rps_reps)
            for name in TARGET_ORDER
            if name in table
        )
        lines += ["", f"rps per repetition: {rep_text}", ""]
    lines += [
        "¹ median over repetitions of (target rps / direct rps in the same repetition); the "
        "goal ratios below are paired the same way.",
        "",
    ]

    lines += ["## Goals (issues 6 and 16), from this run", "", "| goal | measured | verdict |", "|---|---|---|"]
    for g in goals(result):
        verdict = "n/a" if g.ok is None else ("met" if g.ok else "**not met**")
        lines.append(f"| {g.text} | {g.measured} | {verdict} |")
    lines.append("")
    lines += [
        "Reference (issue 6, same kind of machine): nginx 0.08–0.13 ms CPU per non-stream request, "
        "bare aiohttp passthrough 0.57–0.74 ms, LiteLLM 26–28 ms; per 64-chunk stream nginx "
        "0.76–1.36 ms, passthrough 0.99–1.9 ms, LiteLLM 132–142 ms.",
        "",
    ]
    return "\n".join(lines)

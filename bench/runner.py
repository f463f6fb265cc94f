"""One benchmark run: start every server, measure every (workload, target) pair interleaved,
repeat, and reduce to medians.

Order: for each repetition, for each workload, every target in turn (the order rotates per
repetition), so slow drift of the machine (thermal, noisy neighbours) spreads over all
targets instead of favouring whichever ran first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import litellm, loadgen, nginx, procs

PY = sys.executable
_TOLLGATE_READY = r"tollgate ready on http://127\.0\.0\.1:(\d+)/v1"

# Every Tollgate target keeps its ledger (and spend log) in the run's work directory; the
# budgeted ones add a daily USD budget far above what a run spends, so every request is
# admitted, reserved and settled (the work users pay for) and none is refused.
LEDGER_YAML = """
ledger:
  backend: sqlite
  path: {ledger_path}
"""
# Quota leasing (README "Quota leasing"): what "all on" runs with; the per-request variant
# shows what a ledger transaction per request would cost.
LEASING_YAML = """  leasing:
    enabled: true
"""
BUDGET_YAML = """
budgets:
  - name: bench-global
    period: daily
    limit_usd: 1000000
    action: block
"""


@dataclass(frozen=True)
class Workload:
    name: str
    label: str
    stream: bool
    concurrency: int


@dataclass(frozen=True)
class Plan:
    workloads: tuple[Workload, ...]
    chunks: int
    ttft_ms: float
    gap_ms: float
    latency_ms: float
    duration_s: float
    max_requests: int
    reps: int
    warmup_s: float
    smoke: bool
    # Quick A/B runs: measure only these targets / workloads (None: all). Servers not
    # selected are not started.
    only_targets: tuple[str, ...] | None = None
    # A/B while tuning: also run the Tollgate of another source tree (its `proxy` package
    # first on PYTHONPATH), as target "tollgate-ref", interleaved with the rest.
    ref_tree: Path | None = None
    # LiteLLM proxy as target "litellm" (its own venv, installed on first use): in a full
    # run, and in a --targets run that names it; never in the smoke run, which must not
    # install anything.
    litellm: bool = False


FULL_WORKLOADS = (
    Workload("ns-c1", "non-stream, c=1", False, 1),
    Workload("ns-c64", "non-stream, c=64", False, 64),
    Workload("s64-c1", "64-chunk stream, c=1", True, 1),
    Workload("s64-c256", "64-chunk stream, c=256", True, 256),
)


def full_plan(
    reps: int = 3,
    duration_s: float = 3.0,
    targets: tuple[str, ...] | None = None,
    workloads: tuple[str, ...] | None = None,
    ref_tree: Path | None = None,
) -> Plan:
    unknown = set(workloads or ()) - {w.name for w in FULL_WORKLOADS}
    if unknown:
        raise ValueError(f"unknown workloads {sorted(unknown)}; choose from {[w.name for w in FULL_WORKLOADS]}")
    return Plan(
        workloads=tuple(w for w in FULL_WORKLOADS if workloads is None or w.name in workloads),
        chunks=64,
        ttft_ms=0.0,
        gap_ms=1.0,
        latency_ms=0.0,
        duration_s=duration_s,
        max_requests=1_000_000,
        reps=reps,
        warmup_s=0.5,
        smoke=False,
        only_targets=targets,
        ref_tree=ref_tree,
        litellm=targets is None or "litellm" in targets,
    )


def smoke_plan() -> Plan:
    """Every target and workload, tiny: proves the machinery works, says nothing of speed."""
    return Plan(
        workloads=(
            Workload("ns-c1", "non-stream, c=1", False, 1),
            Workload("ns-c64", "non-stream, c=8 (smoke)", False, 8),
            Workload("s64-c1", "8-chunk stream, c=1 (smoke)", True, 1),
            Workload("s64-c256", "8-chunk stream, c=16 (smoke)", True, 16),
        ),
        chunks=8,
        ttft_ms=0.0,
        gap_ms=1.0,
        latency_ms=0.0,
        duration_s=0.4,
        max_requests=60,
        reps=1,
        warmup_s=0.0,
        smoke=True,
    )


@dataclass
class Target:
    name: str
    label: str
    url: str
    child: procs.Child | None  # None: the upstream itself (direct)
    only_concurrent: bool = False  # measured only where concurrency > 1 (worker scaling)


@dataclass
class Measure:
    target: str
    workload: str
    rep: int
    load: dict[str, Any]
    cpu_ms_per_request: float | None
    peak_rss_mb: float | None


@dataclass
class RunResult:
    plan: Plan
    targets: list[Target]
    measures: list[Measure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    wall_s: float = 0.0
    nginx_version: str | None = None
    litellm_version: str | None = None
    budget_on: bool = False
    loadavg: list[str] = field(default_factory=list)


def tollgate_yaml(upstream_port: int, ledger_path: Path, with_budget: bool, leasing: bool = False) -> str:
    base = f"""
server:
  host: 127.0.0.1
  port: 0
upstreams:
  openai:
    kind: openai
    base_url: http://127.0.0.1:{upstream_port}/v1
    api_key: sk-bench-upstream
    # The default pool (100) would queue the c=256 streams; nginx and the passthrough have
    # no such cap, so neither does Tollgate here.
    max_connections: 1024
routes:
  - models: ["gpt-*"]
    upstream: openai
metrics:
  enabled: true
  host: 127.0.0.1
  port: 0
logging:
  level: info
  access_log: true
"""
    base += LEDGER_YAML.format(ledger_path=ledger_path)
    if with_budget and leasing:
        base += LEASING_YAML
    if with_budget:
        base += BUDGET_YAML
    return base


def leasing_supported() -> bool:
    from proxy.spend.rules import LedgerSettings

    return "leasing" in LedgerSettings.model_fields


def budgets_supported() -> bool:
    from proxy.settings import Settings

    return "budgets" in Settings.model_fields


def _clean_env() -> dict[str, str]:
    """The environment for Tollgate children: no tracing or multiprocess settings leaking in
    from the shell that runs the bench."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROMETHEUS_MULTIPROC"))}
    env["OTEL_SDK_DISABLED"] = "true"
    return env


def start_servers(
    plan: Plan, workdir: Path, log: Callable[[str], None]
) -> tuple[list[procs.Child], list[Target], RunResult]:
    children: list[procs.Child] = []
    targets: list[Target] = []
    result = RunResult(plan=plan, targets=targets)

    def keep(child: procs.Child) -> procs.Child:
        children.append(child)
        return child

    def wanted(name: str) -> bool:
        return plan.only_targets is None or name in plan.only_targets

    try:
        upstream = keep(
            procs.start(
                "upstream",
                [
                    PY,
                    "-m",
                    "bench",
                    "upstream",
                    "--chunks",
                    str(plan.chunks),
                    "--ttft-ms",
                    str(plan.ttft_ms),
                    "--gap-ms",
                    str(plan.gap_ms),
                    "--latency-ms",
                    str(plan.latency_ms),
                ],
                workdir,
                ready=r"READY (\d+)",
            )
        )
        up_url = f"http://127.0.0.1:{upstream.port}"
        log(f"upstream on {up_url}")
        targets.append(Target("direct", "direct (no proxy)", up_url, None))

        binary = nginx.find_nginx() if wanted("nginx") else None
        if binary is not None:
            result.nginx_version = nginx.version(binary)
            ngx = keep(nginx.start(binary, workdir, upstream.port))
            targets.append(
                Target(
                    "nginx", f"nginx {result.nginx_version} proxy_pass", f"http://127.0.0.1:{ngx.port}", ngx
                )
            )
        elif wanted("nginx"):
            result.notes.append("nginx not installed: its column is missing.")

        bare = None if not wanted("passthrough") else keep(
            procs.start(
                "passthrough",
                [PY, "-m", "bench", "passthrough", "--upstream", up_url],
                workdir,
                ready=r"READY (\d+)",
            )
        )
        if bare is not None:
            targets.append(
                Target("passthrough", "bare aiohttp passthrough", f"http://127.0.0.1:{bare.port}", bare)
            )

        if plan.litellm:
            try:
                lite_bin = litellm.ensure_installed(log)
                lite = keep(litellm.start(lite_bin, workdir, upstream.port))
            except RuntimeError as exc:
                result.notes.append(f"LiteLLM not measured: {exc}".replace("\n", " "))
                log(f"LiteLLM not measured: {exc}")
            else:
                result.litellm_version = litellm.version_of() or litellm.VERSION
                targets.append(
                    Target(
                        "litellm",
                        f"LiteLLM {result.litellm_version} proxy, 1 worker",
                        f"http://127.0.0.1:{lite.port}",
                        lite,
                    )
                )

        sink = keep(procs.start("otlp-sink", [PY, "-m", "bench", "sink"], workdir, ready=r"READY (\d+)"))

        result.budget_on = budgets_supported()
        if not result.budget_on:
            result.notes.append(
                "proxy/settings.py has no `budgets` section yet: Tollgate ran without a budget "
                "(bench/runner.py BUDGET_YAML is applied as soon as it has)."
            )
        env = _clean_env()
        # (name, label, extra argv, environment, budget, only on concurrent workloads)
        variants = [
            ("tollgate", "Tollgate (all on)", [], env, result.budget_on, False),
            (
                "tollgate-otel",
                "Tollgate (all on + OTLP tracing)",
                [],
                {
                    **env,
                    "OTEL_SDK_DISABLED": "false",
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{sink.port}/v1/traces",
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                },
                result.budget_on,
                False,
            ),
            ("tollgate-2w", "Tollgate (all on), 2 workers", ["--workers", "2"], env, result.budget_on, True),
        ]
        if result.budget_on:
            # What the budget costs: the same Tollgate with everything on except the ledger.
            variants.insert(
                1, ("tollgate-nobudget", "Tollgate (all on but no budget)", [], env, False, False)
            )
        leasing = result.budget_on and leasing_supported()
        if leasing:
            variants.insert(
                2, ("tollgate-perreq", "Tollgate (all on, budget without leasing)", [], env, True, False)
            )
        if plan.ref_tree is not None:
            ref = str(plan.ref_tree.resolve())
            ref_env = {**env, "PYTHONPATH": os.pathsep.join([ref, *filter(None, [env.get("PYTHONPATH")])])}
            variants.append(("tollgate-ref", f"Tollgate (all on), tree {ref}", [], ref_env, result.budget_on, False))
        for name, label, extra, child_env, budget, only_concurrent in variants:
            if not wanted(name) and name != "tollgate-ref":
                continue
            cfg = workdir / f"{name}.yaml"
            # A reference tree that predates leasing runs a ledger transaction per request.
            ref_leases = plan.ref_tree is not None and (plan.ref_tree / "proxy/spend/quota.py").exists()
            lease = leasing and name != "tollgate-perreq" and (name != "tollgate-ref" or ref_leases)
            cfg.write_text(tollgate_yaml(upstream.port, workdir / f"{name}-ledger.db", budget, lease))
            child = keep(
                procs.start(
                    name,
                    [PY, "-m", "proxy", "serve", "--config", str(cfg), *extra],
                    workdir,
                    ready=_TOLLGATE_READY,
                    env=child_env,
                    stdout_to_log=False,  # the access log: one JSON line per request
                    # `-m proxy` imports its working directory's proxy first, PYTHONPATH's after.
                    cwd=plan.ref_tree.resolve() if name == "tollgate-ref" and plan.ref_tree is not None else None,
                )
            )
            targets.append(Target(name, label, f"http://127.0.0.1:{child.port}", child, only_concurrent))
        log("servers: " + ", ".join(f"{t.name}={t.url}" for t in targets))
    except BaseException:
        for child in reversed(children):
            child.stop()
        raise
    return children, targets, result


async def _sample_rss(pid: int, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], procs.tree_rss_bytes(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


async def measure(
    target: Target, wl: Workload, plan: Plan, *, seconds: float, sample_rss: bool
) -> tuple[loadgen.LoadResult, float | None, float | None]:
    url = target.url + "/v1/chat/completions"
    pid = target.child.pid if target.child is not None else None
    cpu0 = procs.cpu_mark(pid) if pid else None
    peak = [0]
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(pid, peak, stop)) if (pid and sample_rss) else None
    try:
        res = await loadgen.run_load(
            url,
            stream=wl.stream,
            concurrency=wl.concurrency,
            max_requests=plan.max_requests,
            max_seconds=seconds,
        )
    finally:
        stop.set()
        if sampler is not None:
            await sampler
    cpu_per = None
    if pid and cpu0 is not None and res.completed:
        cpu_per = procs.cpu_between(cpu0, procs.cpu_mark(pid)) / res.completed / 1e6
    rss = peak[0] / 2**20 if sampler is not None else None
    return res, cpu_per, rss


async def run_all(result: RunResult, log: Callable[[str], None]) -> None:
    plan = result.plan
    targets = result.targets
    for rep in range(plan.reps):
        for wl in plan.workloads:
            eligible = [t for t in targets if wl.concurrency > 1 or not t.only_concurrent]
            k = rep % len(eligible)
            for target in eligible[k:] + eligible[:k]:
                if target.child is not None and target.child.proc.poll() is not None:
                    raise RuntimeError(
                        f"{target.name} died (exit {target.child.proc.returncode}); see {target.child.log_path}"
                    )
                if rep == 0 and plan.warmup_s > 0:
                    await measure(target, wl, plan, seconds=plan.warmup_s, sample_rss=False)
                res, cpu, rss = await measure(target, wl, plan, seconds=plan.duration_s, sample_rss=True)
                summary = res.summary()
                result.measures.append(Measure(target.name, wl.name, rep, summary, cpu, rss))
                log(
                    f"rep {rep + 1}/{plan.reps} {wl.name:9s} {target.name:14s} rps={summary['rps']:8.1f} "
                    f"p50={_fmt(summary['latency_p50_ms'])} ttft={_fmt(summary['ttft_p50_ms'])} "
                    f"cpu/req={_fmt(cpu, 3)} ms rss={_fmt(rss, 1)} MB errors={res.errors}"
                )
                if res.errors:
                    log(f"    errors: {res.error_samples[:3]}")


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def median_of(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def run(plan: Plan, log: Callable[[str], None] = print) -> RunResult:
    import uvloop

    t0 = time.monotonic()
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="tollgate-bench-") as tmp:
        workdir = Path(tmp)
        children, targets, result = start_servers(plan, workdir, log)
        try:
            uvloop.run(run_all(result, log))
        finally:
            for child in reversed(children):
                code = child.stop()
                if child.name.startswith("tollgate") and code not in (0, None):
                    result.notes.append(f"{child.name} exited with {code} on SIGTERM.")
    result.wall_s = time.monotonic() - t0
    result.loadavg = [load_before, _loadavg()]
    return result


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"

"""`python -m bench instructions`: CPU instructions per request, counted by valgrind.

`python -m bench run` measures CPU time, which on a shared 2-core machine moves by ±20%
from one run to the next: a change worth 3% cannot be seen in it. An instruction count does
not move: each server runs under `valgrind --tool=cachegrind` (no cache or branch
simulation), serves N1 sequential requests in one process and N2 in another, and
(Ir(N2) - Ir(N1)) / (N2 - N1) is its instructions per request, start-up and shutdown
cancelled out. Two runs of the same tree agree to about 0.1%.

What it cannot say: how work batches under concurrency (group commits, coalesced reads),
and what an instruction costs (Python's interpreter loop and C libraries differ in
instructions per cycle). Time figures stay `bench run`'s; this one says, exactly, whether a
change added or removed work, and which part of Tollgate the work is in (the variants
switch parts off one at a time). Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench import loadgen, procs
from bench.runner import PY, _clean_env, tollgate_yaml

OUT = Path(__file__).with_name("INSTRUCTIONS.md")
_TOLLGATE_READY = r"tollgate ready on http://127\.0\.0\.1:(\d+)/v1"
# Valgrind runs a server ~50x slower: start-up alone takes seconds.
_START_TIMEOUT_S = 300.0
# `bench run` streams a chunk per ms; under valgrind the server would still be busy with one
# chunk when the next came, and read several at once, fewer the slower the variant. Chunks 5 ms
# apart arrive one read each, as they do at full speed.
STREAM_GAP_MS = 5
IDLE_S = 20.0


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    budget: bool = True
    leasing: bool = True
    access_log: bool = True


VARIANTS = (
    Variant("tollgate", "Tollgate (all on: budget from quota leases)"),
    Variant("tollgate-perreq", "Tollgate, budget reserved per request (no leasing)", leasing=False),
    Variant("tollgate-nobudget", "Tollgate, no budget", budget=False),
    Variant("tollgate-nolog", "Tollgate, no budget, no access log", budget=False, access_log=False),
)


def tollgate_config(v: Variant, upstream_port: int, ledger: Path) -> str:
    text = tollgate_yaml(upstream_port, ledger, v.budget, v.leasing)
    if not v.access_log:
        text = text.replace("access_log: true", "access_log: false")
    return text


def summary_instructions(cachegrind_out: str) -> int:
    """The total instructions (Ir) of a cachegrind output file."""
    m = re.search(r"^summary:\s+(\d+)", cachegrind_out, re.M)
    if m is None:
        raise ValueError("no `summary:` line in the cachegrind output")
    return int(m.group(1))


def per_request(ir_small: int, ir_large: int, n_small: int, n_large: int, chores: float = 0.0) -> float:
    """Instructions per request from two runs, less `chores`: what the runs' periodic work
    (instructions per second idle, times the seconds the larger run took longer) added."""
    if n_large <= n_small:
        raise ValueError("the larger run must serve more requests")
    return (ir_large - ir_small - chores) / (n_large - n_small)


@dataclass(frozen=True)
class Run:
    instructions: int
    seconds: float  # from ready to the end of the load (or of the idle wait)


def _serve_and_count(
    name: str, argv: list[str], ready: str, workdir: Path, stream: bool, requests: int, env: dict[str, str],
    cwd: Path | None, idle_s: float = 0.0,
) -> Run:
    out = workdir / f"{name}-{requests}-{idle_s:g}.cachegrind"
    valgrind = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--branch-sim=no", f"--cachegrind-out-file={out}"]
    child = procs.start(f"{name}-{requests}", [*valgrind, *argv], workdir, ready=ready, env=env,
                        timeout=_START_TIMEOUT_S, cwd=cwd)
    try:
        started = time.monotonic()
        url = f"http://127.0.0.1:{child.port}/v1/chat/completions"
        res = uvloop.run(loadgen.run_load(url, stream=stream, concurrency=1, max_requests=requests, max_seconds=900))
        if res.completed != requests or res.errors:
            raise RuntimeError(f"{name}: {res.completed} of {requests} completed, {res.errors} errors")
        time.sleep(idle_s)
        seconds = time.monotonic() - started
    finally:
        # SIGTERM: a graceful exit, so valgrind writes its counts.
        child.proc.send_signal(signal.SIGTERM)
        child.proc.wait(_START_TIMEOUT_S)
    return Run(summary_instructions(out.read_text()), seconds)


def count(
    name: str, argv_for: Callable[[int], list[str]], ready: str, workdir: Path, stream: bool,
    n_small: int, n_large: int, env: dict[str, str], cwd: Path | None = None,
) -> float:
    """Instructions per request. Periodic work (ledger chores every 2 s, housekeeping) runs
    ~50x more often per request under valgrind than at full speed: a third run, the small
    one followed by IDLE_S seconds of nothing, measures it per second, and what it added to
    the larger run is taken out."""
    small = _serve_and_count(name, argv_for(n_small), ready, workdir, stream, n_small, env, cwd)
    large = _serve_and_count(name, argv_for(n_large), ready, workdir, stream, n_large, env, cwd)
    idle = _serve_and_count(name, argv_for(n_small), ready, workdir, stream, n_small, env, cwd, IDLE_S)
    per_second = max(0.0, (idle.instructions - small.instructions) / (idle.seconds - small.seconds))
    return per_request(small.instructions, large.instructions, n_small, n_large,
                       per_second * (large.seconds - small.seconds))


def render(rows: dict[str, dict[str, float]], labels: dict[str, str], sizes: dict[str, tuple[int, int]]) -> str:
    import platform
    import subprocess

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Instructions per request",
        "",
        f"Generated by `python -m bench instructions` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"Tollgate at git {git or 'unknown'}, Python {platform.python_version()}. Do not edit by hand: rerun the "
        "command. How it counts, and what it cannot say: bench/instructions.py.",
        "",
        "Sequential requests (c=1) to the benchmark's fake upstream, the configurations of `bench run` "
        f"(stream chunks {STREAM_GAP_MS} ms apart, so that each arrives in a read of its own under valgrind). "
        + "; ".join(f"{w}: {a} and {b} requests" for w, (a, b) in sizes.items()) + ".",
        "",
        "| target | " + " | ".join(f"{w}: k instructions | × passthrough" for w in rows) + " |",
        "|---|" + "---:|---:|" * len(rows),
    ]
    names = list(next(iter(rows.values())))
    for name in names:
        cells = []
        for by_target in rows.values():
            base = by_target.get("passthrough")
            value = by_target[name]
            cells += [f"{value / 1000:.1f}", f"{value / base:.2f}" if base else "–"]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    lines += ["", "What each part costs (differences of the rows above):", ""]
    for w, t in rows.items():
        parts = []
        if "tollgate-nolog" in t and "passthrough" in t:
            parts.append(f"measuring, metrics and the spend log {(t['tollgate-nolog'] - t['passthrough']) / 1000:.1f}k")
        if "tollgate-nobudget" in t and "tollgate-nolog" in t:
            parts.append(f"the access log {(t['tollgate-nobudget'] - t['tollgate-nolog']) / 1000:.1f}k")
        if "tollgate" in t and "tollgate-nobudget" in t:
            parts.append(f"the budget from leases {(t['tollgate'] - t['tollgate-nobudget']) / 1000:.1f}k")
        if "tollgate-perreq" in t and "tollgate-nobudget" in t:
            parts.append(f"the budget reserved per request {(t['tollgate-perreq'] - t['tollgate-nobudget']) / 1000:.1f}k")
        lines.append(f"- {w}: " + "; ".join(parts) + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench instructions", description=__doc__.split("\n")[0])
    p.add_argument("--targets", default=None, help="comma-separated subset of passthrough," + ",".join(v.name for v in VARIANTS))
    p.add_argument("--workloads", default="non-stream,stream", help="non-stream and/or stream (64 chunks)")
    p.add_argument("--tree", type=Path, default=None, help="run the Tollgate of this source tree instead (A/B)")
    p.add_argument("--out", type=Path, default=OUT, help=f"default: {OUT}; '-' prints only")
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    wanted = set(a.targets.split(",")) if a.targets else None
    sizes = {"non-stream": (100, 500), "stream": (20, 80)}
    workloads = [w for w in a.workloads.split(",") if w in sizes]
    labels = {"passthrough": "bare aiohttp passthrough", **{v.name: v.label for v in VARIANTS}}
    workdir = Path(tempfile.mkdtemp(prefix="tollgate-instructions-"))
    env = _clean_env()
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run
    # `-m proxy` imports its working directory's proxy first: another tree's runs in that tree.
    tree = a.tree.resolve() if a.tree is not None else None
    upstream = procs.start(
        "upstream",
        [PY, "-m", "bench", "upstream", "--chunks", "64", "--ttft-ms", "0", "--gap-ms", str(STREAM_GAP_MS),
         "--latency-ms", "0"],
        workdir, ready=r"READY (\d+)",
    )
    rows: dict[str, dict[str, float]] = {w: {} for w in workloads}
    try:
        for w in workloads:
            small, large = sizes[w]
            stream = w == "stream"
            if wanted is None or "passthrough" in wanted:
                bare = [PY, "-m", "bench", "passthrough", "--upstream", f"http://127.0.0.1:{upstream.port}"]
                rows[w]["passthrough"] = count("passthrough", lambda n, bare=bare: bare, r"READY (\d+)", workdir,
                                               stream, small, large, env)
                print(f"{w} passthrough: {rows[w]['passthrough'] / 1000:.1f}k", file=sys.stderr, flush=True)
            for v in VARIANTS:
                if wanted is not None and v.name not in wanted:
                    continue

                def argv_for(n: int, v: Variant = v, w: str = w) -> list[str]:
                    cfg = workdir / f"{v.name}-{w}-{n}.yaml"
                    cfg.write_text(tollgate_config(v, upstream.port, workdir / f"{v.name}-{w}-{n}.db"))
                    return [PY, "-m", "proxy", "serve", "--config", str(cfg)]

                rows[w][v.name] = count(v.name, argv_for, _TOLLGATE_READY, workdir, stream, small, large, env, tree)
                print(f"{w} {v.name}: {rows[w][v.name] / 1000:.1f}k", file=sys.stderr, flush=True)
    finally:
        upstream.stop()
    text = render(rows, labels, {w: sizes[w] for w in workloads})
    if str(a.out) != "-":
        a.out.write_text(text)
        print(f"wrote {a.out}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

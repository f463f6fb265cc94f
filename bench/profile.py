"""Where Tollgate's CPU goes: py-spy samples a `tollgate serve` process while the load
generator drives one workload at a time, and the samples are summed three ways.

* by area: each sample goes to the package of its innermost Python frame (proxy/<module>,
  aiohttp, asyncio, prometheus_client, ...); time in C code (uvloop, aiohttp's parser,
  orjson) is charged to the Python frame that called it;
* by proxy function, inclusive: samples with that function anywhere on the stack;
* by function, self: the innermost frame.

`python -m bench profile` writes bench/PROFILE.md. py-spy must be installed
(`.venv/bin/pip install py-spy`) and allowed to ptrace the child (it is a child of this
process, so the default Yama setting allows it).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import loadgen, procs, runner

OUT = Path(__file__).with_name("PROFILE.md")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def area_of(path: str) -> str:
    """A frame's file as a short area name: proxy/forward.py, aiohttp, asyncio, ..."""
    p = path.replace("\\", "/")
    if "/proxy/" in p or p.startswith("proxy/"):
        return "proxy/" + p.rsplit("/proxy/", 1)[-1] if "/proxy/" in p else p
    m = re.search(r"site-packages/([^/]+)", p)
    if m:
        return m.group(1).removesuffix(".py")
    m = re.search(r"python3\.\d+/(?:([^/]+)/)?([^/]+)\.py$", p)
    if m:
        return f"stdlib {m.group(1) or m.group(2)}"
    return p


def parse_raw(text: str) -> list[tuple[list[tuple[str, str]], int]]:
    """py-spy's raw (collapsed) output: `frame;frame;... count`, outermost first."""
    stacks: list[tuple[list[tuple[str, str]], int]] = []
    for line in text.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        frames: list[tuple[str, str]] = []
        for part in stack_text.split(";"):
            m = _FRAME.match(part.strip())
            if m:
                frames.append((m.group("func"), m.group("file")))
        if frames:
            stacks.append((frames, int(count)))
    return stacks


def _idle(frames: list[tuple[str, str]]) -> bool:
    # A pool thread (the ledger's) waiting for work: blocked in queue.get's C code, which
    # py-spy does not always recognise as idle. Its run time per request is ~0 (schedstat).
    func, file = frames[-1]
    return func == "_worker" and file.endswith("concurrent/futures/thread.py")


def summarize(stacks: list[tuple[list[tuple[str, str]], int]], top: int = 25) -> list[str]:
    idle = sum(n for frames, n in stacks if _idle(frames))
    stacks = [(frames, n) for frames, n in stacks if not _idle(frames)]
    total = sum(n for _, n in stacks) or 1
    by_area: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    for frames, n in stacks:
        func, file = frames[-1]
        by_area[area_of(file)] += n
        self_time[f"{func} ({area_of(file)})"] += n
        seen: set[str] = set()
        for func, file in frames:
            area = area_of(file)
            if area.startswith("proxy/"):
                key = f"{func} ({area})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += n

    def table(title: str, counter: Counter[str]) -> list[str]:
        lines = [f"#### {title}", "", "| share | samples | where |", "|---:|---:|---|"]
        for key, n in counter.most_common(top):
            lines.append(f"| {100 * n / total:.1f}% | {n} | `{key}` |")
        return [*lines, ""]

    return [
        f"{total} samples ({idle} more of an idle worker thread waiting for work left out).",
        "",
        *table("By area (innermost Python frame)", by_area),
        *table("Tollgate functions, inclusive", inclusive),
        *table("Functions, self", self_time),
    ]


async def _drive(url: str, wl: runner.Workload, seconds: float) -> loadgen.LoadResult:
    return await loadgen.run_load(
        url, stream=wl.stream, concurrency=wl.concurrency, max_requests=10**9, max_seconds=seconds
    )


def main(argv: list[str]) -> int:
    import uvloop

    p = argparse.ArgumentParser(prog="python -m bench profile")
    p.add_argument("--seconds", type=float, default=8.0, help="sampling time per workload")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--raw-dir", type=Path, default=None, help="also keep py-spy's raw stacks here")
    a = p.parse_args(argv)
    spy = _py_spy()
    plan = runner.full_plan()
    workloads = [w for w in plan.workloads if w.name in ("ns-c64", "s64-c256")]
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tollgate-profile-") as tmp:
        wd = Path(tmp)
        up = procs.start(
            "upstream",
            [
                runner.PY,
                "-m",
                "bench",
                "upstream",
                "--chunks",
                str(plan.chunks),
                "--gap-ms",
                str(plan.gap_ms),
            ],
            wd,
            ready=r"READY (\d+)",
        )
        cfg = wd / "tollgate.yaml"
        budget = runner.budgets_supported()
        cfg.write_text(runner.tollgate_yaml(up.port, wd / "ledger.db", budget, budget and runner.leasing_supported()))
        tg = procs.start(
            "tollgate",
            [runner.PY, "-m", "proxy", "serve", "--config", str(cfg)],
            wd,
            ready=runner._TOLLGATE_READY,
            env=runner._clean_env(),
            stdout_to_log=False,
        )
        url = f"http://127.0.0.1:{tg.port}/v1/chat/completions"
        try:
            for wl in workloads:
                uvloop.run(_drive(url, wl, 1.0))  # warm
                raw = wd / f"{wl.name}.txt"
                spy_proc = subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(tg.pid),
                        "--rate",
                        str(a.rate),
                        "--duration",
                        str(int(a.seconds)),
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                time.sleep(0.5)  # let py-spy attach before the load starts
                cpu0 = procs.tree_cpu_ns(tg.pid)
                res = uvloop.run(_drive(url, wl, a.seconds - 1.0))
                cpu = (procs.tree_cpu_ns(tg.pid) - cpu0) / max(res.completed, 1) / 1e6
                _, err = spy_proc.communicate(timeout=a.seconds + 30)
                if spy_proc.returncode != 0 or not raw.exists():
                    raise SystemExit(f"py-spy failed: {err.decode(errors='replace')}")
                sections += [
                    f"### {wl.label}",
                    "",
                    f"{res.completed} requests at {res.rps:.0f} rps, {cpu:.3f} ms CPU per request "
                    f"(with py-spy attached: sampling slows the process, shares stay meaningful).",
                    "",
                    *summarize(parse_raw(raw.read_text())),
                ]
                if a.raw_dir is not None:
                    a.raw_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copy(raw, a.raw_dir / raw.name)
                print(f"profiled {wl.name}", file=sys.stderr)
        finally:
            tg.stop()
            up.stop()
    text = "\n".join(
        [
            "# Where Tollgate's CPU goes",
            "",
            f"Generated by `python -m bench profile` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"py-spy at {a.rate} Hz on one `tollgate serve` (the benchmark's configuration"
            + (", budget on" if budget else "")
            + "), fake upstream and load generator as in RESULTS.md.",
            "",
            *sections,
        ]
    )
    a.out.write_text(text)
    print(text)
    return 0

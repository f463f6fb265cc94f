"""`python -m bench <command>`:

run          the whole benchmark; writes bench/RESULTS.md (`--smoke`: ~30 s, checks it works)
profile      Tollgate under py-spy while a load runs; prints where its CPU goes
upstream     the fake OpenAI upstream (used by run)
passthrough  the bare aiohttp passthrough (used by run)
sink         the OTLP/HTTP receiver that discards (used by run)
fidelity     the local token estimate vs OpenAI's real count, per recorded capture
ledger       settlements per second the shared SQLite ledger takes from 1, 2... processes
instructions CPU instructions per request under valgrind: exact A/B on a noisy machine; writes bench/INSTRUCTIONS.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def cmd_run(argv: list[str]) -> int:
    from bench import report, runner

    p = argparse.ArgumentParser(prog="python -m bench run")
    p.add_argument("--smoke", action="store_true", help="tiny run that only checks the machinery")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per measure")
    p.add_argument(
        "--targets", default=None,
        help="comma-separated subset, e.g. passthrough,tollgate (direct always runs); litellm runs only "
        "in a run without --targets or when named here, and installs LiteLLM into its own venv on first use",
    )
    p.add_argument("--workloads", default=None, help="comma-separated subset of ns-c1,ns-c64,s64-c1,s64-c256")
    p.add_argument("--out", type=Path, default=None, help=f"default: {RESULTS} (smoke: stdout only)")
    p.add_argument(
        "--ref-tree", type=Path, default=None,
        help="A/B: also run the Tollgate of this source tree (target tollgate-ref), interleaved",
    )
    a = p.parse_args(argv)
    plan = runner.smoke_plan() if a.smoke else runner.full_plan(
        reps=a.reps,
        duration_s=a.duration,
        targets=tuple(a.targets.split(",")) if a.targets else None,
        workloads=tuple(a.workloads.split(",")) if a.workloads else None,
        ref_tree=a.ref_tree,
    )
    result = runner.run(plan, log=lambda s: print(s, file=sys.stderr, flush=True))
    command = "python -m bench run" + (" --smoke" if a.smoke else "")
    text = report.render(result, command)
    out = a.out if a.out is not None else (None if a.smoke else RESULTS)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    print(text)
    failed = [m for m in result.measures if m.load["completed"] == 0]
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "instructions":
        from bench import instructions

        return instructions.main(rest)
    if command == "profile":
        from bench import profile

        return profile.main(rest)
    if command == "upstream":
        from bench import upstream

        return upstream.main(rest)
    if command == "passthrough":
        from bench import passthrough

        return passthrough.main(rest)
    if command == "fidelity":
        from bench import fidelity

        return fidelity.main(rest)
    if command == "ledger":
        from bench import ledger

        return ledger.main(rest)
    if command == "sink":
        from bench import sink

        return sink.main(rest)
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m bench ledger`: the ceiling the shared SQLite ledger puts on N worker processes.

With quota leasing a budgeted request costs the ledger one write: its settlement (group
committed: up to 64 settlements of one process in one transaction). Workers share the file,
so their transactions take turns on its write lock: that lock is the one part of the request
path that does not scale with processes. This measures it alone: P processes (each pinned
to its own core where there are enough), each settling as fast as `concurrency` tasks can,
through the production `SqliteLedger`, for `seconds`; it prints settlements per second in
all and CPU per settlement. The scaling model in bench/README.md combines this ceiling with
a worker's CPU per request from `python -m bench run`.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from proxy.spend.budgets import BudgetRule, Charge, bucket_for
from proxy.spend.ledger import SpendRow
from proxy.spend.ledger.sqlite import SqliteLedger
from proxy.usage import Usage


async def _settle_loop(path: Path, tag: str, seconds: float, concurrency: int) -> int:
    ledger = await SqliteLedger.open(path)
    rule = BudgetRule.model_validate({"name": "bench", "period": "daily", "limit_usd": "1000000"})
    now = datetime.now(UTC)
    bucket = bucket_for(rule, None, None, None, now)
    assert bucket is not None
    usage = Usage(input_tokens=20, output_tokens=64, input_source="upstream", output_source="upstream")
    done = 0
    deadline = time.monotonic() + seconds

    async def one(worker: int) -> None:
        nonlocal done
        n = 0
        while time.monotonic() < deadline:
            rid = f"{tag}-{worker}-{n}"
            n += 1
            row = SpendRow.from_usage(
                usage, Decimal("0.0000414"), time=now, request_id=rid, key="k", user=None, model="gpt-4o-mini",
                upstream="openai", endpoint="chat.completions", outcome="ok", status=200,
            )
            await ledger.settle(rid, [Charge(bucket, Decimal("0.0000414"), 84)], row, now)
            done += 1

    try:
        await asyncio.gather(*(one(i) for i in range(concurrency)))
    finally:
        await ledger.close()
    return done


def _worker(path: str, index: int, seconds: float, concurrency: int, out: multiprocessing.Queue[tuple[int, float]]) -> None:
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[index % len(cores)]})
    done = asyncio.run(_settle_loop(Path(path), f"p{index}", seconds, concurrency))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((done, usage.ru_utime + usage.ru_stime))


def measure(processes: int, seconds: float, concurrency: int) -> tuple[float, float]:
    """(settlements per second in all, CPU ms per settlement)."""
    with tempfile.TemporaryDirectory(prefix="tollgate-ledger-bench-") as tmp:
        path = str(Path(tmp) / "ledger.db")
        asyncio.run(_settle_loop(Path(path), "warm", 0.2, 1))  # create the schema once
        ctx = multiprocessing.get_context("fork")
        out: multiprocessing.Queue[tuple[int, float]] = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(path, i, seconds, concurrency, out)) for i in range(processes)]
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds + 60) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    total = sum(done for done, _ in results)
    cpu = sum(c for _, c in results)
    return total / seconds, cpu * 1000 / max(total, 1)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench ledger", description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=64, help="settling tasks per process")
    a = p.parse_args(argv)
    print(f"{os.cpu_count()} cores; {a.concurrency} settling tasks per process, {a.seconds:g} s each")
    print("| processes | settlements/s | CPU ms per settlement |")
    print("|---:|---:|---:|")
    for n in (int(x) for x in a.processes.split(",")):
        rate, cpu = measure(n, a.seconds, a.concurrency)
        print(f"| {n} | {rate:.0f} | {cpu:.3f} |", flush=True)
    return 0

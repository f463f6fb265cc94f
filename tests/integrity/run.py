"""The budget-integrity suite: mixed traffic at hundreds of concurrent requests against a small
budget, with processes killed under it, and the books checked against what the upstream billed.

    python -m tests.integrity.run                               # all three set-ups
    python -m tests.integrity.run --setup redis2 --requests 600 --concurrency 300 --seed 7
    python -m tests.integrity.run --leasing on                  # quota leasing only (default: both)

Set-ups: `sqlite` (one process), `sqlite2` (one process, 2 workers), `redis2` (two instances
sharing a Redis that keeps an fsync-always append-only file, as a production Redis would).

The upstream is this module's own billing fake: every output token is one ` w` content event
(one token for tiktoken too), and it bills each token as it writes it, so what it billed is the
truth whatever the client or the proxy did. Output costs $0.001 a token, input is free.

Traffic, drawn from a seeded mix: chat streams and bodies with `n` up to 3; completions with
`best_of` and prompt batches; embeddings; streams longer than the 6 s lease; the same client
`x-request-id` over and over; clients that hang up mid-stream; a model endpoint under another
spelling (`/v1/chat/completions/`); and llama.cpp's `/v1/messages`, a path Tollgate cannot
meter, which must be refused. Faults at seeded moments: kill -9 of a proxy process (restarted
at once), and with Redis, SIGSTOP for 3 s and SIGKILL (restarted on its append-only file).

Printed per set-up, and required for exit 0:
- the ledger's spent never exceeds the limit, and it equals the spend log's total;
- no reservation is left once every request ended and a lease has passed;
- nothing reached the upstream on the unmeterable path;
- overspend (what the upstream billed beyond the limit) is at most the spend Tollgate could
  not see: requests in flight in a killed process (charged at their estimated prompt, as
  `interrupted`) and tokens generated between a client hanging up and the upstream stopping.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.spend.budgets import from_nanos
from tests.support.procs import free_port, stop_process, wait_started
from tests.support.redis_server import real_clock_env
from tests.support.tollgate_process import Tollgate, start_tollgate

# About a third of what the traffic asks for: the budget runs out while the faults hit.
LIMIT = Decimal("6.00")
TOKEN_USD = Decimal("0.001")
# Renewed every third of a lease; a ledger outage must stay under two thirds of it (the 3 s
# SIGSTOP here) or the reservations of requests still running could lapse: hence the
# default lease of 15 minutes, and 6 s here so that long streams outlive several leases.
LEASE_S = 6.0
ADMIN_KEY = "integrity-admin-key"
SETUPS = ("sqlite", "sqlite2", "redis2")


# --- the upstream: bills every token it writes ---------------------------------------------


class BillingUpstream:
    """An OpenAI-compatible upstream on its own thread that counts every token it sends."""

    def __init__(self) -> None:
        self.tokens = 0  # billed output tokens (written to the proxy's socket)
        self.unmetered_hits = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="billing-upstream", daemon=True)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _bill(self, tokens: int) -> None:
        with self._lock:
            self.tokens += tokens

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the billing upstream did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            app = web.Application(client_max_size=8 << 20)
            app.router.add_post("/v1/chat/completions", self._generate)
            app.router.add_post("/v1/completions", self._generate)
            app.router.add_post("/v1/embeddings", self._embeddings)
            app.router.add_post("/v1/messages", self._messages)
            runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = runner.addresses[0][1]
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

        asyncio.run(main())

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        with self._lock:
            self.requests += 1
        cap = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        n = body.get("n") or 1
        outputs = n
        if request.path.endswith("/completions") and "chat" not in request.path:
            prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
            outputs = max(n, body.get("best_of") or 1) * prompts
        gap = float(request.headers.get("x-integrity-gap", "0.01"))
        chat = "chat" in request.path
        if not body.get("stream"):
            await asyncio.sleep(gap * cap)
            tokens = cap * outputs
            self._bill(tokens)
            return web.json_response({
                "id": "x", "object": "chat.completion" if chat else "text_completion", "model": body["model"],
                "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": tokens, "total_tokens": 10 + tokens},
            })
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(cap):
            await asyncio.sleep(gap)
            for index in range(outputs):
                choice: dict[str, Any] = {"index": index, "delta": {"content": " w"}} if chat else {"index": index, "text": " w"}
                event = {"id": "s", "object": "chat.completion.chunk", "model": body["model"], "choices": [choice]}
                await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
                self._bill(1)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 10, "completion_tokens": cap * outputs, "total_tokens": 10 + cap * outputs}
            await resp.write(b"data: " + orjson.dumps({"id": "s", "object": "chat.completion.chunk", "choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"object": "list", "data": [], "model": "text-embedding-3-small",
                                  "usage": {"prompt_tokens": 8, "total_tokens": 8}})

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self.unmetered_hits += 1
        self._bill(int(body.get("max_tokens", 60)))
        return web.json_response({"type": "message", "content": []})


# --- Redis with an append-only file, restartable on its data ------------------------------------


class DurableRedis:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir), "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=real_clock_env(),
        )

        def ping() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False

        if wait_started(self.proc, ping, 10.0, interval=0.05) != "ready":
            raise RuntimeError("redis-server did not start")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill_and_restart(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5, 5)


# --- one run ----------------------------------------------------------------------------------


def config(upstream: str, ledger: str) -> str:
    return f"""
server: {{host: 127.0.0.1, port: 0}}
timeouts: {{connect: 2, first_byte: 30, idle: 30}}
upstreams:
  openai: {{kind: openai, base_url: "{upstream}", api_key: sk-upstream}}
routes:
  - {{models: ["gpt-*", "text-embedding-*"], upstream: openai}}
default_upstream: openai
metrics: {{enabled: false}}
logging: {{access_log: false}}
admin: {{api_key: {ADMIN_KEY}}}
pricing:
  models:
    gpt-test: {{input: 0, output: 1000}}
    text-embedding-3-small: {{input: 0, output: 0}}
budgets:
  - name: integrity
    period: total
    limit_usd: {LIMIT}
{ledger}
"""


@dataclass
class Outcome:
    by_kind: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


KINDS = (
    ("chat", 30), ("chat_stream", 25), ("completions", 10), ("embeddings", 5), ("long_stream", 6),
    ("duplicate_id", 8), ("hang_up", 8), ("odd_spelling", 4), ("unmeterable", 4),
)


def pick(rng: random.Random) -> str:
    total = sum(w for _, w in KINDS)
    x = rng.uniform(0, total)
    for kind, weight in KINDS:
        x -= weight
        if x <= 0:
            return kind
    return KINDS[0][0]


async def one(session: aiohttp.ClientSession, bases: list[str], kind: str, rng: random.Random, out: Outcome) -> None:
    base = rng.choice(bases)
    headers = {"Content-Type": "application/json"}
    path = "/chat/completions"
    body: dict[str, Any] = {"model": "gpt-test", "messages": [{"role": "user", "content": "count"}],
                            "max_tokens": rng.randint(5, 30), "n": rng.choice((1, 1, 2, 3))}
    stream = kind in ("chat_stream", "long_stream", "hang_up", "duplicate_id") and rng.random() < 0.8
    if kind == "completions":
        path = "/completions"
        body = {"model": "gpt-test", "prompt": ["a", "b", "c"][: rng.randint(1, 3)], "max_tokens": rng.randint(5, 20),
                "best_of": rng.choice((1, 2)), "n": 1}
    elif kind == "embeddings":
        path, body = "/embeddings", {"model": "text-embedding-3-small", "input": "hello"}
    elif kind == "long_stream":
        headers["x-integrity-gap"] = "0.3"  # 25 tokens: 7.5 s, past the 6 s lease
        body["max_tokens"], body["n"] = 25, 1
    elif kind == "duplicate_id":
        headers["X-Request-Id"] = f"dup-{rng.randint(0, 4)}"
    elif kind == "odd_spelling":
        path = "/chat/completions/"
    elif kind == "unmeterable":
        path, body = "/messages", {"model": "gpt-test", "max_tokens": 60, "messages": []}
    if stream:
        body["stream"] = True
    out.by_kind[kind] += 1
    try:
        async with session.post(base + path, data=orjson.dumps(body), headers=headers) as r:
            if kind == "hang_up" and stream and r.status == 200:
                await r.content.readany()
                r.close()
                out.statuses["hung up"] += 1
                return
            await r.read()
            out.statuses[str(r.status)] += 1
            if kind == "unmeterable" and r.status != 403:
                out.unexpected.append(f"unmeterable path answered {r.status}")
            elif r.status not in (200, 429, 503, 403):
                out.unexpected.append(f"{kind}: status {r.status}")
    except (TimeoutError, aiohttp.ClientError) as exc:
        out.statuses[type(exc).__name__] += 1  # a killed proxy: expected while it restarts


async def budget_state(base: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/tollgate/budgets", headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as r:
            data = orjson.loads(await r.read())["data"]
    return data[0] if data else {"spent": "0", "reserved": "0", "reserved_requests": 0}


def logged_usd(paths: list[Path]) -> tuple[Decimal, Counter[str]]:
    total, outcomes = Decimal(0), Counter[str]()
    for path in paths:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            for outcome, n, nanos in conn.execute("SELECT outcome, COUNT(*), SUM(cost_nanos) FROM spend_log GROUP BY outcome"):
                outcomes[str(outcome)] += n
                total += from_nanos(int(nanos or 0))
        finally:
            conn.close()
    return total, outcomes


async def run_setup(
    setup: str, requests: int, concurrency: int, seed: int, workdir: Path, leasing: bool = False
) -> dict[str, Any]:
    rng = random.Random(seed)
    upstream = BillingUpstream()
    upstream.start()
    redis = DurableRedis(workdir) if setup == "redis2" else None
    procs: list[Tollgate] = []
    configs: list[Path] = []
    spend_logs: list[Path] = []
    out = Outcome()
    faults: list[str] = []
    lease_yaml = f"leasing: {{enabled: {str(leasing).lower()}}}"
    try:
        if redis is not None:
            redis.start()
            for i in range(2):
                spend_logs.append(workdir / f"spend-{i}.db")
                cfg = workdir / f"tollgate-{i}.yaml"
                cfg.write_text(config(upstream.api_base, f"ledger: {{backend: redis, redis_url: \"{redis.url}\", "
                                      f"path: {spend_logs[-1]}, lease_seconds: {LEASE_S}, {lease_yaml}}}"))
                configs.append(cfg)
        else:
            spend_logs.append(workdir / "ledger.db")
            cfg = workdir / "tollgate.yaml"
            cfg.write_text(config(upstream.api_base, f"ledger: {{backend: sqlite, path: {spend_logs[0]}, lease_seconds: {LEASE_S}, {lease_yaml}}}"))
            configs.append(cfg)
        workers = 2 if setup == "sqlite2" else 1
        for i, cfg in enumerate(configs):
            procs.append(await start_tollgate(cfg, workdir / f"serve-{i}.log", workers=workers))
        bases = [p.base_url for p in procs]

        async def fault_schedule(t_total: float) -> None:
            await asyncio.sleep(t_total * 0.3)
            victim = rng.randrange(len(procs))
            procs[victim].kill()
            faults.append(f"kill -9 proxy {victim}")
            procs[victim] = await start_tollgate(configs[victim], workdir / f"serve-{victim}.log", workers=workers)
            bases[victim] = procs[victim].base_url
            if redis is not None:
                await asyncio.sleep(t_total * 0.1)
                redis.signal(signal.SIGSTOP)
                faults.append("SIGSTOP redis 3 s")
                await asyncio.sleep(3.0)
                redis.signal(signal.SIGCONT)
                await asyncio.sleep(t_total * 0.05)
                await asyncio.to_thread(redis.kill_and_restart)
                faults.append("SIGKILL redis, restarted on its append-only file")

        sem = asyncio.Semaphore(concurrency)
        connector = aiohttp.TCPConnector(limit=0)
        t0 = time.monotonic()
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def guarded(kind: str) -> None:
                async with sem:
                    await one(session, bases, kind, rng, out)

            # Requests arrive over ~6 s, so the faults land in the middle of the traffic.
            fault_task = asyncio.ensure_future(fault_schedule(6.0))
            tasks = []
            for _ in range(requests):
                tasks.append(asyncio.ensure_future(guarded(pick(rng))))
                await asyncio.sleep(6.0 / requests)
            await asyncio.gather(*tasks)
            await fault_task
        # Every request has ended; a lease later, what a killed process held is swept.
        await asyncio.sleep(LEASE_S + 4.5)
        state = await budget_state(bases[0])
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            try:
                p.stop(30)
            except Exception:  # noqa: BLE001 - killed already
                p.kill()
        if redis is not None:
            redis.stop()
        upstream.stop()
    logged, outcomes = logged_usd(spend_logs)
    billed = upstream.tokens * TOKEN_USD
    spent = Decimal(str(state["spent"]))
    unseen = max(Decimal(0), billed - logged)
    overspend = max(Decimal(0), billed - LIMIT)
    problems = list(out.unexpected)
    if spent > LIMIT:
        problems.append(f"the ledger's spent {spent} exceeds the limit {LIMIT}")
    if spent != logged:
        problems.append(f"the ledger's spent {spent} differs from the spend log's {logged}")
    if Decimal(str(state["reserved"])) != 0 or int(state["reserved_requests"]) != 0:
        problems.append(f"reservations left with nothing in flight: {state['reserved']} ({state['reserved_requests']})")
    if upstream.unmetered_hits:
        problems.append(f"{upstream.unmetered_hits} requests reached the upstream on an unmeterable path")
    if overspend > unseen:
        problems.append(f"overspend {overspend} beyond what Tollgate could not see ({unseen})")
    return {
        "setup": setup, "leasing": leasing, "requests": requests, "concurrency": concurrency, "seed": seed,
        "seconds": round(elapsed, 1), "faults": faults, "by_kind": dict(out.by_kind),
        "statuses": dict(out.statuses), "spend_log_outcomes": dict(outcomes),
        "limit_usd": str(LIMIT), "ledger_spent_usd": str(spent), "spend_log_usd": str(logged),
        "upstream_billed_usd": str(billed), "overspend_usd": str(overspend),
        "billed_but_unlogged_usd": str(unseen),
        "reserved_left": f"{state['reserved']} ({state['reserved_requests']} requests)",
        "problems": problems,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.integrity.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=(*SETUPS, "all"), default="all")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=300)
    parser.add_argument("--seed", type=int, default=int.from_bytes(os.urandom(2), "big"))
    parser.add_argument(
        "--leasing", choices=("off", "on", "both"), default="both",
        help="quota leasing (ledger.leasing.enabled) in the proxies: off, on, or each set-up both ways",
    )
    args = parser.parse_args(argv)
    ok = True
    modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.leasing]
    for setup in SETUPS if args.setup == "all" else (args.setup,):
        for leasing in modes:
            with tempfile.TemporaryDirectory(prefix=f"tollgate-integrity-{setup}-") as tmp:
                report = asyncio.run(
                    run_setup(setup, args.requests, args.concurrency, args.seed, Path(tmp), leasing=leasing)
                )
            print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode(), flush=True)
            ok = ok and not report["problems"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

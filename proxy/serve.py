"""Running the app as a server process: one process, or a parent and N worker processes.

One process (`serve`): listen, wait for SIGINT/SIGTERM, shut down cleanly.

Several (`serve_workers`): the parent forks N workers that each run `serve` with their own
listening socket on the same port (SO_REUSEPORT: the kernel spreads connections across
them), so one Python process per core does the relaying. The parent only supervises:

* before any worker exists it points PROMETHEUS_MULTIPROC_DIR at a fresh directory, so every
  worker writes its metric values to mmap files there, and a scrape of the metrics port (which
  every worker also binds with SO_REUSEPORT) merges all of them;
* a port given as 0 is resolved once, in the parent, so all workers share the same one;
* a worker that exits is reaped (its live gauges removed with `mark_process_dead`) and
  restarted, at most `MAX_RESTARTS` times in `RESTART_WINDOW_S`, after which the parent
  gives up and stops everything;
* SIGTERM or SIGINT to the parent stops every worker with SIGTERM (each drains and exits),
  then the parent exits 0; SIGHUP to the parent is forwarded to every worker.

Signals, in every process that serves:

* SIGTERM/SIGINT drain: the listening socket closes at once (new connections are refused),
  idle keep-alive connections are closed, requests in flight get up to the grace period
  (env TOLLGATE_SHUTDOWN_GRACE_SECONDS, default SHUTDOWN_GRACE_S) to finish, after which
  they are cancelled (and recorded as such); then settlements are awaited, the ledger is
  closed, spans are flushed, and the process exits 0.
* SIGHUP reloads the YAML: the file is read and validated again; a valid one replaces the
  running configuration for requests that start from then on (requests in flight finish
  with what they started with: same listener, same app, new settings, see
  `proxy.app.reconfigure`), an invalid one is rejected with a log line and the old
  configuration keeps serving. Sections that hold sockets or files (server, metrics,
  logging, ledger) need a restart; a reload that changes them says so and keeps them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from aiohttp import web

from proxy.config_file import Override
from proxy.settings import Settings

log = logging.getLogger("tollgate")

# Idle keep-alive connections, and clients slow to send their headers, are cut after this.
KEEPALIVE_TIMEOUT_S = 75.0

MAX_RESTARTS = 10
RESTART_WINDOW_S = 60.0
# How long requests in flight may run on after SIGTERM before they are cancelled.
SHUTDOWN_GRACE_S = 25.0
GRACE_ENV = "TOLLGATE_SHUTDOWN_GRACE_SECONDS"


def shutdown_grace(env: Mapping[str, str] = os.environ) -> float:
    raw = env.get(GRACE_ENV, "").strip()
    if not raw:
        return SHUTDOWN_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number; using %.0f s", GRACE_ENV, raw, SHUTDOWN_GRACE_S)
        return SHUTDOWN_GRACE_S
    return max(0.0, value)


# How long the parent waits for a stopping worker beyond its grace (settling, closing).
STOP_MARGIN_S = 10.0
_PR_SET_PDEATHSIG = 1


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    raise RuntimeError("the server is not listening on a TCP socket")


async def serve(
    settings: Settings,
    started_at: float,
    *,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then drain (see the module docstring). With
    `reuse_port`, the API and metrics sockets are bound with SO_REUSEPORT so several
    processes can share their ports. `reload` reads the configuration again, for SIGHUP
    (without it, SIGHUP is logged and ignored)."""
    from proxy.app import METRICS_RUNNER, make_app
    from proxy.encodings import EncodingDataError
    from proxy.spend.ledger import LedgerError
    from proxy.state import RUNTIME

    app = make_app(settings, trace_from_env=True, reuse_port=reuse_port)
    # handler_cancellation: a client that disconnects cancels its handler at once, which is
    # how the upstream request gets cancelled while the upstream is still thinking.
    grace = shutdown_grace()
    # keepalive_timeout also bounds a client that trickles its request headers (slowloris):
    # aiohttp has no header timeout, and its default keep-alive is an hour.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=grace,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
    )
    try:
        await runner.setup()
        site = web.TCPSite(
            runner,
            settings.server.host,
            settings.server.port,
            reuse_address=True,
            reuse_port=True if reuse_port else None,
            backlog=1024,
        )
        await site.start()
    except (LedgerError, EncodingDataError, OSError) as exc:
        # One line that says what is wrong, not a traceback: a ledger that cannot open (serving
        # without it would lose spend silently), tokenizer data that fails its hash, a port
        # that is taken (uvloop's message names the address).
        log.error("cannot start: %s", exc)
        await runner.cleanup()
        raise SystemExit(1) from None

    metrics_runner = app[METRICS_RUNNER] if settings.metrics.enabled else None

    # What start-up built lives as long as the process: frozen, the cyclic GC stops walking
    # it on every full collection (the CLI turned the GC off for the start, see __main__).
    gc.freeze()
    gc.enable()
    metrics_url = (
        f"http://{settings.metrics.host}:{_bound_port(metrics_runner)}{settings.metrics.path}"
        if metrics_runner is not None
        else "off"
    )
    if on_ready is not None:
        log.debug("worker %d ready", os.getpid())
        on_ready()
    else:
        log.info(
            "tollgate ready on http://%s:%d/v1 in %.0f ms (metrics: %s)",
            settings.server.host,
            _bound_port(runner),
            (time.perf_counter() - started_at) * 1000,
            metrics_url,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloading: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(reload_config(app, reload))
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    who = f" worker {os.getpid()}" if reuse_port else ""
    log.info("shutting down%s: draining requests in flight (grace %.0f s)", who, grace)
    app[RUNTIME].drain_deadline = time.monotonic() + grace
    await runner.cleanup()
    log.info("stopped%s", who)


async def reload_config(app: web.Application, reload: Callable[[], Settings] | None) -> bool:
    """SIGHUP: read the configuration again and apply it, or keep the old one."""
    from proxy.app import reconfigure
    from proxy.errors import ConfigError
    from proxy.state import RUNTIME

    rt = app[RUNTIME]
    if reload is None:
        log.warning("SIGHUP ignored: this server was not started from a config file")
        return False
    try:
        # Reading and validating the file is quick and done once: no thread needed.
        new = reload()
    except ConfigError as exc:
        log.error("config reload rejected, the old configuration keeps serving: %s", str(exc).replace("\n", " "))
        rt.faults.reloads.labels("rejected").inc()
        return False
    except Exception as exc:  # noqa: BLE001 - a reload must never take the server down
        log.error("config reload failed, the old configuration keeps serving: %s", exc)
        rt.faults.reloads.labels("rejected").inc()
        return False
    kept = await reconfigure(app, new)
    if kept:
        log.warning("config reloaded, but changes to %s need a restart and were not applied", ", ".join(kept))
    log.info("config reloaded: %d upstreams, %d routes, %d budgets", len(new.upstreams), len(new.routes), len(new.budgets))
    rt.faults.reloads.labels("applied").inc()
    return True


def settings_loader(path: str | Path, overrides: tuple[Override, ...] = ()) -> Callable[[], Settings]:
    """What `serve(reload=...)` wants: read `path` again, with the flags and variables that
    overrode it at start (the same ones: a reload reads the file, not the environment)."""
    from proxy.config_file import load_settings

    def load() -> Settings:
        return load_settings(path, overrides=overrides)

    return load


def _reserve_port(host: str) -> socket.socket:
    """A socket bound (never listening) to a free port, with SO_REUSEPORT so the workers can
    bind the same port. Held by the parent for its lifetime so the port stays ours across
    worker restarts; a socket that does not listen never receives a connection."""
    family, type_, proto, _, addr = socket.getaddrinfo(
        host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(addr)
    return sock


def pin_ports(settings: Settings) -> tuple[Settings, list[socket.socket]]:
    """Resolve port 0 (API and metrics) to concrete ports every worker will share."""
    held: list[socket.socket] = []
    server_port = settings.server.port
    if server_port == 0:
        held.append(_reserve_port(settings.server.host))
        server_port = held[-1].getsockname()[1]
    metrics_port = settings.metrics.port
    if settings.metrics.enabled and metrics_port == 0:
        held.append(_reserve_port(settings.metrics.host))
        metrics_port = held[-1].getsockname()[1]
    if not held:
        return settings, held
    data = settings.model_dump()
    data["server"] = {**data["server"], "port": server_port}
    data["metrics"] = {**data["metrics"], "port": metrics_port}
    return Settings.model_validate(data), held


def _die_with_parent(parent_pid: int) -> None:
    # A parent killed with SIGKILL cannot stop its workers; ask the kernel to send them
    # SIGTERM when it goes, so no orphan keeps serving on the port.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _worker_main(
    settings: Settings,
    started_at: float,
    ready: Connection,
    parent_pid: int,
    reload: Callable[[], Settings] | None = None,
) -> None:
    # The parent's signal handlers were inherited by fork; the worker's own are installed by
    # serve() on its event loop.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _die_with_parent(parent_pid)
    # prometheus_client picks its value class when it is first imported, which may have been
    # in the parent before PROMETHEUS_MULTIPROC_DIR was set: pick again, now that it is.
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

    def on_ready() -> None:
        ready.send(os.getpid())

    asyncio.run(serve(settings, started_at, reuse_port=True, on_ready=on_ready, reload=reload))


def serve_workers(
    settings: Settings, workers: int, started_at: float, reload: Callable[[], Settings] | None = None
) -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT; the exit status for the CLI.
    SIGHUP is forwarded to the workers, each of which reloads with `reload`."""
    from prometheus_client.multiprocess import mark_process_dead

    gc.enable()  # each worker freezes its own start-up state in `serve`
    if workers < 1:
        raise ValueError(f"workers must be >= 1, not {workers}")
    inherited = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if inherited:
        log.warning("PROMETHEUS_MULTIPROC_DIR=%s is replaced by a fresh directory per run", inherited)
    os.environ.pop("prometheus_multiproc_dir", None)
    mp_dir = tempfile.mkdtemp(prefix="tollgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    settings, held = pin_ports(settings)

    ctx = multiprocessing.get_context("fork")
    ready_r, ready_w = ctx.Pipe(duplex=False)
    parent_pid = os.getpid()
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_hup(signum: int, frame: FrameType | None) -> None:
        for proc in list(slots.values()):
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP)

    signal.signal(signal.SIGHUP, on_hup)

    def spawn(slot: int) -> BaseProcess:
        proc = ctx.Process(
            target=_worker_main,
            args=(settings, started_at, ready_w, parent_pid, reload),
            name=f"tollgate-worker-{slot}",
        )
        proc.start()
        return proc

    slots: dict[int, BaseProcess] = {}
    slots.update({slot: spawn(slot) for slot in range(workers)})
    restarts: list[float] = []
    ready_pids: set[int] = set()
    announced = False
    status = 0
    try:
        while not stopping:
            sentinels = {p.sentinel: slot for slot, p in slots.items()}
            for obj in wait([ready_r, *sentinels], timeout=1.0):
                if obj is ready_r:
                    ready_pids.add(int(ready_r.recv()))
                    continue
                slot = sentinels[obj]  # type: ignore[index]
                dead = slots[slot]
                dead.join()
                mark_process_dead(dead.pid, mp_dir)  # type: ignore[no-untyped-call]
                ready_pids.discard(dead.pid or -1)
                if stopping:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                if len(restarts) > MAX_RESTARTS:
                    log.error("workers exited %d times in %.0f s; giving up", len(restarts), RESTART_WINDOW_S)
                    stopping = True
                    status = 1
                    break
                log.warning("worker %s exited with %s; restarting it", dead.pid, dead.exitcode)
                slots[slot] = spawn(slot)
            if not announced and len(ready_pids) >= workers:
                announced = True
                log.info(
                    "tollgate ready on http://%s:%d/v1 with %d workers in %.0f ms (metrics: %s)",
                    settings.server.host,
                    settings.server.port,
                    workers,
                    (time.perf_counter() - started_at) * 1000,
                    f"http://{settings.metrics.host}:{settings.metrics.port}{settings.metrics.path}"
                    if settings.metrics.enabled
                    else "off",
                )
    finally:
        log.info("stopping %d workers", len(slots))
        _stop_all(list(slots.values()))
        for proc in slots.values():
            if proc.pid is not None:
                mark_process_dead(proc.pid, mp_dir)  # type: ignore[no-untyped-call]
        for sock in held:
            sock.close()
        shutil.rmtree(mp_dir, ignore_errors=True)
    return status


def _stop_all(procs: list[BaseProcess]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    timeout = shutdown_grace() + STOP_MARGIN_S
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.warning("worker %s did not stop in %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.join(5)

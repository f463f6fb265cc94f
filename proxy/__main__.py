"""The `tollgate` command: serve, check-config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from proxy.errors import ConfigError
from proxy.settings import Settings, load_settings

DEFAULT_CONFIG = "config/tollgate.yaml"
log = logging.getLogger("tollgate")


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve(settings: Settings, started_at: float) -> None:
    from proxy.app import make_app
    from proxy.observers import make_tracer_provider

    tracer_provider = make_tracer_provider()
    app = make_app(settings, tracer_provider=tracer_provider)
    # handler_cancellation: a client that disconnects cancels its handler at once, which is
    # how the upstream request gets cancelled while the upstream is still thinking.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port, reuse_address=True)
    await site.start()
    log.info(
        "tollgate ready on http://%s:%d/v1 in %.0f ms (metrics: %s)",
        settings.server.host,
        settings.server.port,
        (time.perf_counter() - started_at) * 1000,
        f"http://{settings.metrics.host}:{settings.metrics.port}{settings.metrics.path}"
        if settings.metrics.enabled
        else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    if tracer_provider is not None:
        tracer_provider.shutdown()


def cmd_serve(args: argparse.Namespace) -> int:
    started_at = time.perf_counter()
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        # Validated again rather than model_copy'd: settings keep derived lookup tables.
        data = settings.model_dump()
        data["server"] = {**data["server"], **overrides}
        settings = Settings.model_validate(data)
    _configure_logging(settings.logging.level)
    loop_name = _install_uvloop()
    log.debug("event loop: %s", loop_name)
    asyncio.run(_serve(settings, started_at))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    routes = len(settings.routes)
    print(
        f"{args.config}: ok ({len(settings.upstreams)} upstreams, {routes} routes, "
        f"default upstream: {settings.default_upstream or 'none'})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollgate", description="A measuring OpenAI-compatible proxy.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="YAML config file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", type=Path)
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

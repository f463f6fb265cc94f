"""The `tollgate` command: serve, check-config, demo, keys, spend, budgets."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.config_file import Override

DEFAULT_CONFIG = "config/tollgate.yaml"
log = logging.getLogger("tollgate")


def _configure_logging(level: str, json_lines: bool = False) -> None:
    """stderr, for Tollgate's and every library's records. `json_lines` when the access log
    (JSON on stdout) is on: one format for everything the process writes, so a collector
    parses every line alike; otherwise plain text for a person at a terminal."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        from proxy.observers.access_log import JsonLogFormatter

        handler.setFormatter(JsonLogFormatter())
        # What would otherwise reach stderr outside logging: warnings, and an uncaught
        # exception's traceback.
        logging.captureWarnings(True)
        sys.excepthook = lambda kind, value, tb: log.critical("uncaught exception", exc_info=(kind, value, tb))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def _overrides(args: argparse.Namespace) -> tuple[Override, ...]:
    from proxy.config_file import OVERRIDABLE, collect_overrides

    flags = {flag: getattr(args, flag[2:].replace("-", "_"), None) for _, flag, _ in OVERRIDABLE}
    return collect_overrides(flags, os.environ)


def _add_override_flags(parser: argparse.ArgumentParser) -> None:
    from proxy.config_file import OVERRIDABLE

    for path, flag, variable in OVERRIDABLE:
        parser.add_argument(flag, type=int if path.endswith(".port") else str, help=f"override {path} (also ${variable})")


def cmd_serve(args: argparse.Namespace, started_at: float) -> int:
    from proxy.config_file import load_settings
    from proxy.errors import ConfigError

    overrides = _overrides(args)
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:  # also a flag or variable that makes a valid file unusable
        print(exc, file=sys.stderr)
        return 2
    _configure_logging(settings.logging.level, json_lines=settings.logging.access_log)
    import asyncio

    from proxy.serve import install_uvloop, serve, serve_workers, settings_loader

    log.debug("event loop: %s", install_uvloop())
    reload = settings_loader(args.config, overrides)  # SIGHUP reads the file again
    if args.workers > 1:
        return serve_workers(settings, args.workers, started_at, reload=reload)
    asyncio.run(serve(settings, started_at, reload=reload))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from proxy.config_file import load_settings
    from proxy.errors import ConfigError

    try:
        # The variables too: check what `serve` would run here.
        settings = load_settings(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    routes = len(settings.routes)
    print(
        f"{args.config}: ok ({len(settings.upstreams)} upstreams, {routes} routes, "
        f"default upstream: {settings.default_upstream or 'none'})"
    )
    from datetime import UTC, datetime

    from proxy.pricing import shipped_prices_date, stale_prices_warning

    # The real clock, at run time: the table ages after it ships. A warning, not an error:
    # the config is valid, and its own pricing entries may already cover what it serves.
    stale = stale_prices_warning(shipped_prices_date(), datetime.now(UTC).date())
    if stale is not None:
        print(stale, file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    import json

    from proxy.config_schema import config_json_schema

    print(json.dumps(config_json_schema(), indent=2))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 1")
    return value


def _version() -> str:
    try:
        return metadata.version("tollgate")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI, or, when `command` is serve or check-config, just those two: the other
    commands' modules cost `tollgate serve` ~15 ms of its start for nothing."""
    parser = argparse.ArgumentParser(prog="tollgate", description="A measuring OpenAI-compatible proxy.")
    parser.add_argument("--version", action="version", version=f"tollgate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", default=DEFAULT_CONFIG, type=Path, help="YAML config file")
    _add_override_flags(serve)
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes sharing the port (SO_REUSEPORT); about one per core",
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument(
        "config", type=Path, nargs="?", default=Path(DEFAULT_CONFIG), help=f"YAML config file (default: {DEFAULT_CONFIG})"
    )
    check.set_defaults(func=cmd_check_config)
    if command in ("serve", "check-config"):
        return parser
    schema = sub.add_parser(
        "schema", help="print the config's JSON schema (for editors; config/tollgate.schema.json is this output)"
    )
    schema.set_defaults(func=cmd_schema)

    from proxy import demo

    demo_parser = sub.add_parser("demo", help="try Tollgate with no key: a synthetic upstream and a short burst")
    demo.configure_parser(demo_parser)
    demo_parser.set_defaults(func=demo.run)
    from proxy import cli_ledger

    cli_ledger.add_commands(sub)
    from proxy import cli_export

    cli_export.add_commands(sub)
    from proxy import cli_advise

    cli_advise.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    started_at = time.perf_counter()
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if args.func is cmd_serve:
        # The cyclic GC would run dozens of times over the imports' objects on the way to
        # readiness (~30 ms); serve turns it back on once it listens, after freezing what
        # start-up left (see serve.serve).
        gc.disable()
        return int(cmd_serve(args, started_at))
    try:
        code = int(args.func(args))
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`tollgate budgets --json | head`): not an error of ours, and
        # no traceback. Python would fail once more flushing stdout at exit: point it at
        # /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main())

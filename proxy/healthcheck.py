"""`python -m proxy.healthcheck [CONFIG]`: exit 0 when the local Tollgate answers GET /healthz.

The image's HEALTHCHECK. It probes the port the server actually listens on, worked out as
`tollgate serve` works it out (the config file, then TOLLGATE_* variables), rather than a
port written into the Dockerfile: a config or `-e TOLLGATE_PORT=...` that moves the port
would otherwise leave a healthy container reported unhealthy. Standard library plus the
config loader: no curl in a slim image.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from proxy.config_file import collect_overrides, load_settings

DEFAULT_CONFIG = "/etc/tollgate/tollgate.yaml"
_ANY_ADDRESS = frozenset({"0.0.0.0", "::", "[::]", "*", ""})


def healthz_url(config: str | Path, env: Mapping[str, str]) -> str:
    """Where the server that `config` and `env` describe answers /healthz."""
    settings = load_settings(config, env=env, overrides=collect_overrides({}, env))
    host = settings.server.host
    if host in _ANY_ADDRESS:
        host = "127.0.0.1"  # listening on every interface: loopback is one of them
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.server.port}/healthz"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    config = args[0] if args else os.environ.get("TOLLGATE_CONFIG") or DEFAULT_CONFIG
    try:
        url = healthz_url(config, os.environ)
        with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our own http URL
            return 0 if resp.status == 200 else 1
    except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy", said in one line
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

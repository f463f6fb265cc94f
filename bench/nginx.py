"""nginx in front of the fake upstream: a foreground child with its own temporary prefix."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bench import procs

TEMPLATE = Path(__file__).with_name("nginx.conf.template")
CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for path in CANDIDATES:
        if Path(path).is_file():
            return path
    return None


def version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ").replace("nginx/", "")


def render(prefix: Path, port: int, upstream_port: int, workers: int = 1) -> str:
    # str.format would trip over nginx's own braces; the placeholders are few and fixed.
    text = TEMPLATE.read_text()
    for key, value in {
        "prefix": str(prefix),
        "port": str(port),
        "upstream_port": str(upstream_port),
        "workers": str(workers),
    }.items():
        text = text.replace("{" + key + "}", value)
    return text


def start(binary: str, workdir: Path, upstream_port: int, workers: int = 1) -> procs.Child:
    prefix = workdir / "nginx"
    prefix.mkdir(parents=True, exist_ok=True)
    port = procs.free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render(prefix, port, upstream_port, workers))
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
    # nginx says nothing when it is up; -t first catches a bad config with a message.
    check = subprocess.run([binary, "-t", "-p", str(prefix), "-c", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx config test failed:\n{check.stderr}")
    child = procs.start("nginx", argv, workdir, ready=r"", timeout=10)
    child.port = port
    procs.wait_listening(port)
    return child

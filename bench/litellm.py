"""LiteLLM proxy as a bench target: its own virtual environment (outside the repository's,
created on first use), a generated config that points one model at the fake upstream, and a
check that it really proxies before anything is measured.

The pinned `litellm[proxy]` extra pins `litellm-proxy-extras`, which holds only the Prisma
schema and migrations of LiteLLM's Postgres database; the bench runs LiteLLM without a
database, and the exact build it pins is not always on the package index the machine
reaches, so the venv gets litellm and every other requirement of its `proxy` extra, without
that one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from bench import loadgen, procs

VERSION = "1.109.1"
_STAMP = ".tollgate-bench-installed"
_INSTALL_TIMEOUT_S = 900.0
# Importing the proxy (FastAPI app, every provider's module) takes 10-30 s on a busy 2-core machine.
_START_TIMEOUT_S = 180.0

# Run inside the LiteLLM venv: the requirements of litellm's `proxy` extra that apply to this
# interpreter, less the database migrations package (see the module docstring).
_PROXY_REQUIREMENTS = """
import importlib.metadata as m
from packaging.requirements import Requirement
for text in m.requires("litellm") or []:
    req = Requirement(text)
    if req.marker is None or not req.marker.evaluate({"extra": "proxy"}):
        continue
    if not req.marker.evaluate({"extra": ""}) and req.name != "litellm-proxy-extras":
        req.marker = None
        print(req)
"""


def venv_dir() -> Path:
    override = os.environ.get("TOLLGATE_BENCH_LITELLM_VENV")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "tollgate" / f"litellm-{VERSION}"


def installed(venv: Path | None = None) -> bool:
    venv = venv or venv_dir()
    stamp = venv / _STAMP
    return (venv / "bin" / "litellm").is_file() and stamp.is_file() and stamp.read_text().strip() == VERSION


def ensure_installed(log: Callable[[str], None]) -> Path:
    """The venv's `litellm` executable; creates the venv and installs LiteLLM first when
    needed (a few minutes, once). Raises RuntimeError with pip's last words on failure."""
    venv = venv_dir()
    binary = venv / "bin" / "litellm"
    if installed(venv):
        return binary
    log(f"installing LiteLLM {VERSION} into {venv} (once; a few minutes)")
    (venv / _STAMP).unlink(missing_ok=True)
    py = venv / "bin" / "python"
    if not py.is_file():
        _run([sys.executable, "-m", "venv", "--clear", str(venv)], "create the venv")
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _run([*pip, f"litellm=={VERSION}"], f"install litellm=={VERSION}")
    reqs = [r for r in _run([str(py), "-c", _PROXY_REQUIREMENTS], "read the proxy extra").splitlines() if r]
    if not reqs:
        raise RuntimeError(f"litellm {VERSION} declares no `proxy` extra")
    _run([*pip, *reqs], "install the proxy extra")
    if not binary.is_file():
        raise RuntimeError(f"{binary} missing after install")
    (venv / _STAMP).write_text(VERSION + "\n")
    return binary


def _run(argv: list[str], what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_INSTALL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"LiteLLM set-up: {what} took over {exc.timeout:.0f} s") from exc
    if out.returncode != 0:
        tail = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("WARNING"))[-1500:]
        raise RuntimeError(f"LiteLLM set-up: {what} failed ({out.returncode}):\n{tail}")
    return out.stdout


def config_yaml(upstream_port: int, model: str = "gpt-4o-mini") -> str:
    # No database_url: no Postgres, so no spend logs or virtual keys; the master key (LiteLLM
    # refuses to start without one) is the bearer token the load generator sends, checked
    # per request without a database. Usage telemetry off; a request timeout far above
    # any stream's length under load.
    return f"""
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: sk-bench-upstream
litellm_settings:
  telemetry: false
  request_timeout: 120
general_settings:
  master_key: {loadgen.CLIENT_KEY}
  disable_spend_logs: true
"""


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "LITELLM_", "VIRTUAL_ENV"))}
    env.update(
        {
            # The bundled price table instead of fetching the newest one at import.
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # Production mode: no .env loading from the working directory.
            "LITELLM_MODE": "PRODUCTION",
            "DISABLE_ADMIN_UI": "True",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    return env


def start(binary: Path, workdir: Path, upstream_port: int) -> procs.Child:
    cfg = workdir / "litellm.yaml"
    cfg.write_text(config_yaml(upstream_port))
    port = procs.free_port()
    child = procs.start(
        "litellm",
        [str(binary), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        workdir,
        ready=r"Uvicorn running on",
        env=environment(),
        timeout=_START_TIMEOUT_S,
    )
    child.port = port
    try:
        check_proxies(f"http://127.0.0.1:{port}")
    except BaseException:
        child.stop()
        raise
    return child


def check_proxies(base_url: str, timeout_s: float = 60.0) -> None:
    """One non-stream and one stream request must come back 200 with the upstream's content,
    or LiteLLM is not proxying (wrong api_base, a refusal) and measuring it means nothing."""
    url = base_url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {loadgen.CLIENT_KEY}"}
    deadline = time.monotonic() + timeout_s
    for stream in (False, True):
        req = urllib.request.Request(url, data=loadgen.request_body(stream), headers=headers, method="POST")
        left = max(1.0, deadline - time.monotonic())
        try:
            with urllib.request.urlopen(req, timeout=left) as resp:  # noqa: S310 - 127.0.0.1 only
                status, body = resp.status, resp.read()
        except OSError as exc:
            raise RuntimeError(f"LiteLLM smoke request (stream={stream}) failed: {exc}") from exc
        if status != 200:
            raise RuntimeError(f"LiteLLM smoke request (stream={stream}): HTTP {status}: {body[:500]!r}")
        if stream:
            if not loadgen.has_content_delta(body) or b"data: [DONE]" not in body:
                raise RuntimeError(f"LiteLLM stream carried no content: {body[:500]!r}")
        else:
            content = json.loads(body)["choices"][0]["message"]["content"]
            if not content:
                raise RuntimeError(f"LiteLLM answered without content: {body[:500]!r}")


def version_of(venv: Path | None = None) -> str | None:
    py = (venv or venv_dir()) / "bin" / "python"
    if not py.is_file():
        return None
    out = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out.stdout.strip() or None if out.returncode == 0 else None

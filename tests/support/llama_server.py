"""A real `llama-server` for tests: 127.0.0.1, a free port, CPU, one thread, metrics on.

    with LlamaServer.from_env() as server:
        server.url        # the root: /health, /props, /metrics, /v1/...
        server.metrics()  # llama-server's own Prometheus counters, by sample name

The binary and the model come from `scripts/build-llama-server.sh`, which builds and caches
them and prints LLAMA_SERVER=... and LLAMA_MODEL=...; `scripts/test` exports both. Missing
either is an error, not a skip: CI always sets them, so a test that silently skipped would
hide a broken pipeline.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import free_port, stop_process, wait_started

# Loading the 253 MB model takes about 2 s on an idle 2-core machine; a busy CI runner can be
# many times slower, and waiting longer costs nothing when the server is healthy.
STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
HOW_TO_GET_IT = (
    "LLAMA_SERVER and LLAMA_MODEL must point at a llama-server binary and a .gguf model: "
    'run `eval "$(scripts/build-llama-server.sh)"; export LLAMA_SERVER LLAMA_MODEL` '
    "(scripts/test does this) before running the real llama-server tests"
)


class LlamaServerError(RuntimeError):
    pass


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value} for unlabelled samples (llama-server's are)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = float(sample.value)
    return out


class LlamaServer:
    def __init__(self, executable: str, model: str, extra_args: tuple[str, ...] = ()) -> None:
        if not os.access(executable, os.X_OK):
            raise LlamaServerError(f"LLAMA_SERVER={executable} is not an executable file. {HOW_TO_GET_IT}")
        if not Path(model).is_file():
            raise LlamaServerError(f"LLAMA_MODEL={model} does not exist. {HOW_TO_GET_IT}")
        self.executable = executable
        self.model = model
        self.extra_args = extra_args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._log: Any = None  # the server's stderr/stdout, kept for error messages

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> LlamaServer:
        env = dict(os.environ) if env is None else env
        executable, model = env.get("LLAMA_SERVER"), env.get("LLAMA_MODEL")
        if not executable or not model:
            raise LlamaServerError(HOW_TO_GET_IT)
        return cls(executable, model)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.url + "/v1"

    def start(self) -> None:
        # llama-server does not report a port chosen by the OS, so take a free one.
        self.port = free_port()
        self._log = tempfile.TemporaryFile(prefix="tollgate-llama-")
        self.process = subprocess.Popen(
            [
                self.executable, "-m", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--metrics", "-c", "2048", "--threads", "1", *self.extra_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        started = wait_started(self.process, self._healthy, STARTUP_TIMEOUT_S, interval=0.05)
        if started == "ready":
            return
        tail = self.log_tail()
        self.stop()
        if started == "exited":
            raise LlamaServerError(f"llama-server exited at start:\n{tail}")
        raise LlamaServerError(f"llama-server not healthy within {STARTUP_TIMEOUT_S} s:\n{tail}")

    def _healthy(self) -> bool:
        try:
            # 503 while the model loads, 200 once it can serve.
            return _get(self.url + "/health", timeout=1.0)[0] == 200
        except OSError:
            return False  # not listening yet

    def log_tail(self, chars: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, STOP_TIMEOUT_S, STOP_TIMEOUT_S)
            self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    # llama-server's own view (blocking; call through asyncio.to_thread from async tests)

    def metrics(self) -> dict[str, float]:
        status, body = _get(self.url + "/metrics")
        if status != 200:
            raise LlamaServerError(f"GET /metrics -> {status}: {body[:200]!r}")
        return parse_metrics(body.decode())

    def props(self) -> dict[str, Any]:
        status, body = _get(self.url + "/props")
        if status != 200:
            raise LlamaServerError(f"GET /props -> {status}: {body[:200]!r}")
        props = json.loads(body)
        assert isinstance(props, dict)
        return props

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

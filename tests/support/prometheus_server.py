"""A real `prometheus` for tests: 127.0.0.1, a free port, a temporary TSDB, a given config.

    async with PrometheusServer(config_yaml) as prom:
        await prom.wait_for_scrapes("tollgate", n=2)
        result = await prom.query('sum(rate(tollgate_requests_total[1m]))')

Missing `prometheus` is an error, not a skip: CI installs it (`apt-get install prometheus`),
so a test that silently skipped would hide a broken pipeline.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from tests.support.procs import free_port, stop_process

STARTUP_TIMEOUT_S = 20.0


class PrometheusServerError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(self, config_yaml: str, executable: str | None = None) -> None:
        found = executable or shutil.which("prometheus")
        if found is None:
            raise PrometheusServerError(
                "prometheus is not installed (apt-get install prometheus); "
                "the dashboard query tests need a real server"
            )
        self.executable = found
        self.config_yaml = config_yaml
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._tmp is None:
            raise PrometheusServerError("not started")
        return Path(self._tmp.name) / "prometheus.log"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="tollgate-prometheus-")
        tmp = Path(self._tmp.name)
        (tmp / "prometheus.yml").write_text(self.config_yaml, encoding="utf-8")
        self.port = free_port()  # prometheus cannot report a port it picked itself
        log = self.log_path.open("wb")
        try:
            self.process = subprocess.Popen(
                [
                    self.executable,
                    f"--config.file={tmp / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusServerError(f"prometheus exited at start:\n{self.log_tail()}")
            try:
                async with self._session.get(self.url + "/-/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise PrometheusServerError(f"prometheus not ready in {STARTUP_TIMEOUT_S} s:\n{self.log_tail()}")

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.process is not None:
            await asyncio.to_thread(stop_process, self.process, 10, 5)
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except (OSError, PrometheusServerError):
            return "(no log)"
        return "\n".join(lines[-n:])

    async def __aenter__(self) -> PrometheusServer:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- HTTP API -------------------------------------------------------------------------------

    async def api(self, path: str, params: dict[str, str] | list[tuple[str, str]]) -> Any:
        """GET /api/v1/<path>; returns `data`, raises with Prometheus's error text otherwise."""
        if self._session is None:
            raise PrometheusServerError("not started")
        async with self._session.get(f"{self.url}/api/v1/{path}", params=params) as r:
            body = await r.json()
        if body.get("status") != "success":
            raise PrometheusServerError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result vector (or a one-element list for a scalar)."""
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = await self.api("query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def label_values(self, label: str, match: str) -> list[str]:
        return list(await self.api(f"label/{label}/values", [("match[]", match)]))

    async def targets(self) -> list[dict[str, Any]]:
        return list((await self.api("targets", {"state": "active"}))["activeTargets"])

    async def wait_for_scrapes(self, job: str, n: int = 1, timeout: float = 15.0) -> None:
        """Wait until every active target of `job` was scraped successfully `n` more times
        (each new lastScrape time seen while the target is up counts once)."""
        seen: dict[str, set[str]] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [t for t in await self.targets() if t["labels"].get("job") == job]
            for t in jobs:
                if t["health"] == "up":
                    seen.setdefault(t["scrapeUrl"], set()).add(t["lastScrape"])
            if jobs and all(len(seen.get(t["scrapeUrl"], ())) > n for t in jobs):
                return
            await asyncio.sleep(0.2)
        raise PrometheusServerError(
            f"job {job!r}: fewer than {n} new successful scrapes in {timeout} s: {await self.targets()}"
        )

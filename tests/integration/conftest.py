"""Real sockets: the proxy app on an ephemeral port in front of fake upstreams."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from proxy.app import METRICS_RUNNER, make_app
from proxy.config_file import parse_settings
from proxy.observer import Observer
from proxy.observers.exposition import bound_port
from proxy.settings import Settings
from proxy.state import RUNTIME, Runtime
from tests.support.fake_upstream import FakeLlamaServer, FakeUpstream


def proxy_yaml(
    openai_base: str,
    *,
    llama_root: str | None = None,
    openai_key: str | None = "sk-upstream-secret",
    default_upstream: str | None = None,
    extra: str = "",
    inject: bool = True,
    idle: float = 5.0,
    first_byte: float = 5.0,
) -> str:
    """A config pointing at fake upstreams; metrics on an ephemeral port."""
    key = f"api_key: {openai_key}" if openai_key else "api_key: ''"
    llama = (
        f"""
  llamacpp:
    kind: llamacpp
    base_url: {llama_root}
"""
        if llama_root
        else ""
    )
    llama_route = (
        """
  - models: ["local"]
    upstream: llamacpp
    model: "models/gemma-3-270m-q4_k_m.gguf"
  - models: ["models/*"]
    upstream: llamacpp
"""
        if llama_root
        else ""
    )
    default = f"default_upstream: {default_upstream}" if default_upstream else ""
    return f"""
server:
  host: 127.0.0.1
  port: 0
timeouts:
  connect: 2
  first_byte: {first_byte}
  idle: {idle}
upstreams:
  openai:
    kind: openai
    base_url: {openai_base}
    {key}
    inject_stream_usage: {str(inject).lower()}
{llama}
routes:
  - models: ["gpt-*", "o*", "chatgpt-*", "text-embedding-*", "babbage-*", "davinci-*"]
    upstream: openai
{llama_route}
{default}
metrics:
  host: 127.0.0.1
  port: 0
{extra}
"""


@dataclass
class Proxy:
    server: TestServer
    app: web.Application
    access_log: io.BytesIO
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]

    @property
    def metrics_url(self) -> str:
        runner = self.app[METRICS_RUNNER]
        return f"http://127.0.0.1:{bound_port(runner)}/metrics"

    def log_lines(self) -> list[bytes]:
        return [line for line in self.access_log.getvalue().splitlines() if line]


StartProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def start_proxy(aiohttp_server: Callable[..., Awaitable[TestServer]], tmp_path: Path) -> StartProxy:
    async def start(
        config: str | Settings,
        *,
        observers: list[Observer] | None = None,
        **make_app_kwargs: object,
    ) -> Proxy:
        if isinstance(config, str) and "\nledger:" not in config:
            # Each proxy its own ledger file, never ./data of the checkout.
            config += f"\nledger:\n  path: {tmp_path / f'ledger-{len(list(tmp_path.iterdir()))}.db'}\n"
        settings = parse_settings(config, env={}) if isinstance(config, str) else config
        registry = CollectorRegistry()
        access_log = io.BytesIO()
        app = make_app(
            settings,
            registry=registry,
            access_log=access_log,
            extra_observers=observers,
            **make_app_kwargs,  # type: ignore[arg-type]
        )
        # aiohttp's TestServer runs with handler_cancellation=True, as `tollgate serve` does:
        # a client leaving cancels its handler.
        server = await aiohttp_server(app)
        return Proxy(server=server, app=app, access_log=access_log, registry=registry)

    return start


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
async def fake_llama() -> AsyncIterator[FakeLlamaServer]:
    async with FakeLlamaServer() as fake:
        yield fake

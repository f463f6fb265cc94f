"""What the running app holds, under typed AppKeys (one Runtime per application)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.exchange import Observers
from proxy.forward import Upstream
from proxy.pricing import PriceTable
from proxy.settings import Settings

log = logging.getLogger("tollgate")


@dataclass(eq=False)
class Runtime:
    settings: Settings
    prices: PriceTable
    observers: Observers
    upstreams: dict[str, Upstream] = field(default_factory=dict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    unpriced_warned: set[str] = field(default_factory=set)
    measure_failures: int = 0
    tokenizers_ready: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        return (
            self.tokenizers_ready.is_set()
            and bool(self.upstreams)
            and not any(u.closed for u in self.upstreams.values())
        )

    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        """Run work that must outlive the request (e.g. after a client disconnect) and is
        awaited at shutdown, so nothing is lost when the process drains."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self.background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background %s failed", what, exc_info=t.exception())

        task.add_done_callback(done)


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)

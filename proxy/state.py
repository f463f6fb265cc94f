"""What the running app holds, under typed AppKeys (one Runtime per application).

A request reads `policy` once (its configuration) and talks to `spend` (its budget
lifecycle) and `observers` (its measurements); nothing else here is for a request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from proxy.cache_store import ResponseCache
from proxy.faults import FaultMetrics
from proxy.keys import KeyRing
from proxy.observer import Observers
from proxy.policy import Policy
from proxy.ratelimit.limiter import Limiter
from proxy.settings import Settings
from proxy.spend.hold import Hold
from proxy.spend.ledger import Ledger
from proxy.spend.lifecycle import Spend, Unsettled
from proxy.upstream import Upstream

log = logging.getLogger("tollgate")


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(eq=False)
class Runtime:
    # Replaced whole by a reload (one assignment): a request captures it once.
    policy: Policy
    spend: Spend
    observers: Observers
    faults: FaultMetrics
    limiter: Limiter
    clock: Callable[[], datetime] = utc_now
    # The response cache; None when it is off (the request path then never touches it).
    response_cache: ResponseCache | None = None
    # Start-up look-ups (llama-server's /props) that nothing waits on: cancelled at
    # shutdown.
    probes: set[asyncio.Task[Any]] = field(default_factory=set)
    unpriced_warned: set[str] = field(default_factory=set)
    measure_failures: int = 0
    # Resources a config reload replaced (old upstream sessions): closed at `deadline`
    # (monotonic), once requests still using them have had time to finish, or at shutdown.
    retired: list[tuple[float, Callable[[], Awaitable[None]]]] = field(default_factory=list)
    # Set (monotonic) when SIGTERM starts a drain: requests still running at this moment
    # are cancelled by the server, and recorded as the proxy's doing, not the client's.
    drain_deadline: float | None = None

    # The policy in force now, field by field (for what is not a request: chores, reports).
    @property
    def settings(self) -> Settings:
        return self.policy.settings

    @property
    def keyring(self) -> KeyRing:
        return self.policy.keyring

    @property
    def upstreams(self) -> Mapping[str, Upstream]:
        return self.policy.upstreams

    # The spend lifecycle's state, for reports and tests.
    @property
    def ledger(self) -> Ledger:
        return self.spend.ledger

    @property
    def unsettled(self) -> deque[Unsettled]:
        return self.spend.outbox

    @property
    def abandoned(self) -> set[str]:
        return self.spend.abandoned

    @property
    def live_reservations(self) -> dict[str, Hold]:
        return self.spend.live

    @property
    def background(self) -> set[asyncio.Task[Any]]:
        return self.spend.background

    @property
    def ready(self) -> bool:
        upstreams = self.policy.upstreams
        return self.spend.opened and bool(upstreams) and not any(u.closed for u in upstreams.values())

    def probe(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a look-up that only informs (metrics) and may be cut short at shutdown: an
        idle proxy must stop at once, not wait out a retry loop against a server that is
        not there."""
        task = asyncio.get_running_loop().create_task(coro)
        self.probes.add(task)
        task.add_done_callback(self.probes.discard)

    async def cancel_probes(self) -> None:
        for task in self.probes:
            task.cancel()
        await asyncio.gather(*self.probes, return_exceptions=True)


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)

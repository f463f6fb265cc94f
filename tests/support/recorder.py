"""An extra observer for integration tests: keeps every Exchange the proxy finished.

    rec = Recorder()
    proxy = await start_proxy(yaml_text, observers=[rec])
    ...
    ex = await rec.wait()          # the first finished exchange
    both = await rec.wait_for(2)   # the first two, once both have finished
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from proxy.exchange import Exchange


class Recorder:
    """Keeps every started and finished exchange, when first tokens were reported, and how
    often each request was finished (the proxy finishes each exactly once)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout  # the default bound of `wait` and `wait_for`
        self.started: list[Exchange] = []
        self.first_token_ns: list[int] = []
        self.finished: list[Exchange] = []
        self.finish_calls: Counter[str] = Counter()
        self._changed = asyncio.Event()

    def on_start(self, ex: Exchange) -> None:
        self.started.append(ex)

    def on_first_token(self, ex: Exchange) -> None:
        self.first_token_ns.append(time.perf_counter_ns())

    def on_finish(self, ex: Exchange) -> None:
        self.finished.append(ex)
        self.finish_calls[ex.request_id] += 1
        self._changed.set()

    async def wait_for(self, n: int, timeout: float | None = None) -> list[Exchange]:
        """Every finished exchange, once at least `n` have finished. The client can have its
        last byte before the handler's `finish` has run, so this waits for it (bounded)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        while len(self.finished) < n:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"{len(self.finished)} exchanges finished, expected {n}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                continue
        assert all(c == 1 for c in self.finish_calls.values()), self.finish_calls
        return list(self.finished)

    async def wait(self, n: int = 1, timeout: float | None = None) -> Exchange:
        """The n-th finished exchange (1-based), once it has finished."""
        return (await self.wait_for(n, timeout))[n - 1]

"""Budget threshold webhooks: a JSON POST, retried with backoff, never on a request's path."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson

from proxy.spend.budgets import WebhookSettings

log = logging.getLogger("tollgate.webhook")


class WebhookSender:
    def __init__(self, settings: WebhookSettings, session: aiohttp.ClientSession | None = None) -> None:
        self.settings = settings
        self._session = session
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.settings.url is not None

    async def send(self, payload: dict[str, Any]) -> bool:
        """POST `payload`; retries 5xx, 429 and network errors with exponential backoff."""
        if self.settings.url is None:
            return False
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.settings.timeout))
        body = orjson.dumps(payload)
        delay = 0.5
        for attempt in range(self.settings.max_retries + 1):
            try:
                async with self._session.post(
                    self.settings.url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if resp.status < 300:
                        self.sent += 1
                        return True
                    if resp.status < 500 and resp.status != 429:
                        log.error("budget webhook refused with HTTP %d; not retrying", resp.status)
                        break
                    log.warning("budget webhook got HTTP %d (attempt %d)", resp.status, attempt + 1)
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("budget webhook failed (attempt %d): %s", attempt + 1, exc)
            if attempt < self.settings.max_retries:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.failed += 1
        return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

"""Observers: what watches an exchange, and the one place their hooks are called from.

Hooks are named after the moment they fire, in this order for every exchange that goes
upstream (`on_finish` fires for every exchange, including refused ones, exactly once):

    on_start              routed, about to be sent upstream
    on_request_headers    the upstream request's headers are built (a tracer injects its
                          propagation headers into `headers` here)
    on_response_headers   the upstream answered; `headers` are the client's response
                          headers, not yet sent (an observer may add its own)
    on_first_token        the first output token reached the client
    on_finish             the exchange is complete, on every path; nothing changes after

Observers run on the request's task, so they must be quick and must not block; an
exception raised by one is logged and counted, never propagated: measuring never breaks
forwarding. Per-exchange state an observer needs between hooks is its own (keyed by the
exchange, dropped at `on_finish`), never stored on the exchange.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping

from proxy.exchange import Exchange

log = logging.getLogger("tollgate.exchange")

HOOKS = ("on_start", "on_request_headers", "on_response_headers", "on_first_token", "on_finish")


class Observer:
    """Base class with a no-op for every hook: override the ones you need.

    Objects that do not derive from it work too, as long as the hooks they define have
    these signatures; a hook they lack is simply not called.
    """

    def on_start(self, ex: Exchange) -> None:
        """Routed and about to go upstream."""

    def on_request_headers(self, ex: Exchange, headers: MutableMapping[str, str]) -> None:
        """The headers about to be sent upstream; may add propagation headers."""

    def on_response_headers(self, ex: Exchange, headers: MutableMapping[str, str]) -> None:
        """The client's response headers, before they are sent; may add headers."""

    def on_first_token(self, ex: Exchange) -> None:
        """The first output token (on any channel) was relayed."""

    def on_finish(self, ex: Exchange) -> None:
        """The exchange ended; every measurement is final."""


def _overrides(observer: object, hook: str) -> bool:
    """Whether `observer` does something at `hook` (a base-class no-op does nothing)."""
    method = getattr(type(observer), hook, None)
    return method is not None and method is not getattr(Observer, hook)


class Observers:
    """Fans hooks out to every observer that implements them, containing failures."""

    def __init__(self, observers: list[object] | None = None) -> None:
        self.observers: list[object] = []
        # Per hook, the bound methods to call: built once, so a hook nobody implements
        # costs one empty loop per exchange.
        self._hooks: dict[str, list[Callable[..., None]]] = {hook: [] for hook in HOOKS}
        self.failures = 0
        self.on_failure: list[Callable[[str], None]] = []  # e.g. a metric counter
        for observer in observers or []:
            self.add(observer)

    def add(self, observer: object) -> None:
        self.observers.append(observer)
        for hook in HOOKS:
            if _overrides(observer, hook):
                self._hooks[hook].append(getattr(observer, hook))

    def _failed(self, method: Callable[..., None], hook: str) -> None:
        name = type(getattr(method, "__self__", method)).__name__
        self.failures += 1
        log.exception("observer %s failed in %s", name, hook)
        for callback in self.on_failure:
            try:
                callback(name)
            except Exception:  # noqa: BLE001 - a broken counter must not break the others
                log.exception("observer failure callback failed")

    def _fire(self, hook: str, *args: object) -> None:
        for method in self._hooks[hook]:
            try:
                method(*args)
            except Exception:  # noqa: BLE001 - measuring must never break forwarding
                self._failed(method, hook)

    def on_start(self, ex: Exchange) -> None:
        self._fire("on_start", ex)

    def on_request_headers(self, ex: Exchange, headers: MutableMapping[str, str]) -> None:
        self._fire("on_request_headers", ex, headers)

    def on_response_headers(self, ex: Exchange, headers: MutableMapping[str, str]) -> None:
        self._fire("on_response_headers", ex, headers)

    def on_first_token(self, ex: Exchange) -> None:
        self._fire("on_first_token", ex)

    def on_finish(self, ex: Exchange) -> None:
        self._fire("on_finish", ex)

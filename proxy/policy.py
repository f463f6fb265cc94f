"""The configuration one request runs under, captured once when it arrives.

A SIGHUP reload builds a new `Policy` and swaps it in with one assignment; a request that
started before keeps the one it captured, so its routing, admission, pricing and
settlement all agree with each other even when a reload lands mid-request (the upstream
sessions a reload replaces stay open until such requests are done).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from proxy.keys import KeyRing
from proxy.pricing import Price, PriceTable
from proxy.settings import Settings
from proxy.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Policy:
    settings: Settings
    prices: PriceTable
    keyring: KeyRing
    upstreams: Mapping[str, Upstream] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, settings: Settings, upstreams: Mapping[str, Upstream] | None = None) -> Policy:
        return cls(
            settings=settings,
            prices=PriceTable.shipped().merged(price_overrides(settings)),
            keyring=KeyRing(settings.keys),
            upstreams=MappingProxyType(dict(upstreams or {})),
        )

    def with_upstreams(self, upstreams: Mapping[str, Upstream]) -> Policy:
        return Policy(self.settings, self.prices, self.keyring, MappingProxyType(dict(upstreams)))


def price_overrides(settings: Settings) -> dict[str, Price]:
    return {
        pattern: Price(input=p.input, output=p.output, cached_input=p.cached_input, cache_write=p.cache_write)
        for pattern, p in settings.pricing.models.items()
    }

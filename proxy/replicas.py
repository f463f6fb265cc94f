"""Which replica of a replicated upstream takes the next request. Pure: the time is passed in.

A replica is eligible while it is up, or once its ejection (a failed connect) has run out:
it is then tried again without waiting for a health check. The least busy eligible replica
wins: where every candidate is a llama-server whose free slots are known (`/slots`), the
one with the most free slots now, estimated as the free slots at the last scrape less the
requests this process sent it since; otherwise the one with the fewest requests in flight
from this process. Ties go round-robin. When no replica is eligible, every one not yet
tried is a candidate: a health verdict can be stale, and a refused request is no better
than one that fails to connect.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit


@dataclass(slots=True, eq=False)
class ReplicaState:
    name: str
    in_flight: int = 0
    up: bool = True
    # Monotonic seconds until which a replica that is not up stays out of the choice; inf
    # while a health check says it is down.
    down_until: float = 0.0
    # llama-server's free slots at the last /slots scrape, and this process's requests in
    # flight to it at that moment.
    slots_free: int | None = None
    in_flight_at_scrape: int = 0

    def eligible(self, now: float) -> bool:
        return self.up or now >= self.down_until

    def free_estimate(self) -> int:
        assert self.slots_free is not None
        return self.slots_free - (self.in_flight - self.in_flight_at_scrape)

    def ejected(self, now: float, seconds: float) -> None:
        """A connect failed: out of the choice for `seconds`."""
        self.up = False
        self.down_until = now + seconds

    def checked(self, healthy: bool) -> None:
        """A health check's verdict: down stays down until a check (or a request) succeeds."""
        self.up = healthy
        self.down_until = 0.0 if healthy else math.inf


R = TypeVar("R", bound=ReplicaState)


def choose(replicas: Sequence[R], tried: Collection[R], now: float, turn: int) -> R | None:
    """The replica for the next attempt, or None when every one has been tried."""
    candidates = [r for r in replicas if r not in tried]
    if not candidates:
        return None
    pool = [r for r in candidates if r.eligible(now)] or candidates
    if len(pool) == 1:
        return pool[0]
    if all(r.slots_free is not None for r in pool):
        loads = [(-r.free_estimate(), r.in_flight) for r in pool]
    else:
        loads = [(r.in_flight, 0) for r in pool]
    least = min(loads)
    tied = [r for r, load in zip(pool, loads, strict=True) if load == least]
    return tied[turn % len(tied)]


def default_replica_name(url: str) -> str:
    """A replica's metric label when none is configured: host:port of its URL, never the
    URL itself (which may hold credentials or a path)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{host}:{port}"

"""The configuration sections that hold no routing: server, timeouts, metrics, logging,
passthrough, admin, response_cache."""

from __future__ import annotations

import fnmatch
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from proxy.config_base import Count, HeaderName, Host, Port, Seconds, Secret, Section, StrictBool
from proxy.globs import check_glob


class ServerSettings(Section):
    host: Host = "127.0.0.1"
    port: Port = 8080
    max_body_bytes: Count = 20 * 1024 * 1024
    request_id_header: HeaderName = "x-request-id"
    # Serve clients that present no virtual key on a non-loopback host while an upstream has
    # Tollgate's own api_key: anyone who can reach the port spends that key. Off, such a
    # config does not start (see Settings._anonymous_exposure).
    allow_anonymous: StrictBool = False

    @field_validator("request_id_header")
    @classmethod
    def _lowercase(cls, value: str) -> str:
        # aiohttp looks headers up case-insensitively, but logs and responses want one spelling.
        return value.lower()


class Timeouts(Section):
    """Seconds. first_byte: request sent -> response headers; idle: between two body chunks."""

    connect: Seconds = 10.0
    first_byte: Seconds = 120.0
    idle: Seconds = 120.0


class TimeoutOverrides(Section):
    """Per-upstream override; a field left out takes the global value."""

    connect: Seconds | None = None
    first_byte: Seconds | None = None
    idle: Seconds | None = None

    def over(self, defaults: Timeouts) -> Timeouts:
        return Timeouts(
            connect=self.connect if self.connect is not None else defaults.connect,
            first_byte=self.first_byte if self.first_byte is not None else defaults.first_byte,
            idle=self.idle if self.idle is not None else defaults.idle,
        )


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must start with '/'")
    return value


class MetricsSettings(Section):
    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 9464
    path: Annotated[str, AfterValidator(_check_path)] = "/metrics"


def _payloads_off(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as False.
    return "off" if value is False else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class LoggingSettings(Section):
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    access_log: bool = True
    payloads: Annotated[Literal["off", "truncated"], BeforeValidator(_payloads_off)] = "off"
    payload_max_chars: Count = 1000


class PassthroughSettings(Section):
    # Paths under /v1 other than the model endpoints that may be forwarded unmetered while
    # virtual keys or budgets apply (fnmatch globs on the request path, e.g. "/v1/files*").
    # Any other such path is refused: Tollgate cannot count what it does not understand.
    allow_unmetered: tuple[str, ...] = ()

    @field_validator("allow_unmetered")
    @classmethod
    def _paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for pattern in value:
            if not pattern.startswith("/v1/"):
                raise ValueError(f"{pattern!r} must be a path under /v1/ (a glob such as /v1/files*)")
            check_glob(pattern)
        return value

    def allows(self, path: str) -> str | None:
        """The pattern that lets `path` through unmetered, if any."""
        for pattern in self.allow_unmetered:
            if fnmatch.fnmatchcase(path, pattern):
                return pattern
        return None


class AdminSettings(Section):
    api_key: Secret = None
    # Who may read /v1/tollgate/summary once virtual keys exist: any valid key or the admin
    # key ("keys"), or the admin key alone ("admin"). Without keys it is open, like the API.
    summary_access: Literal["keys", "admin"] = "keys"


class HealthCheck(Section):
    """How the replicas of a replicated upstream are watched (README "Replicated upstreams")."""

    # A GET every `interval` seconds: llama-server's /health, otherwise {api base}/models;
    # any answer under 500 is up. Off: replicas are marked down only by failed connects.
    enabled: StrictBool = True
    interval: Seconds = 5.0
    timeout: Seconds = 2.0
    # How long a replica whose connect failed is left out before it is tried again.
    eject_for: Seconds = 10.0


CacheEndpoint = Literal["chat.completions", "completions", "embeddings"]


class ResponseCacheSettings(Section):
    """The exact-match response cache (README "Response cache"). Off unless enabled."""

    enabled: StrictBool = False
    backend: Literal["sqlite", "redis"] = "sqlite"
    # The SQLite file (its own, never the ledger's: a cache may be deleted at any time).
    path: str = "./data/response-cache.db"
    redis_url: str | None = None
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "tollgate"
    ttl_seconds: Seconds = 3600.0
    max_entries: Count = 10_000
    # An entry is one whole response; the sum of entries is bounded by max_bytes.
    max_entry_bytes: Count = 1024 * 1024
    max_bytes: Count = 256 * 1024 * 1024
    # Who shares entries: the virtual key (or, without keys, the client's credentials),
    # the end user within the key, the key's team, or everyone allowed the model.
    scope: Literal["key", "user", "team", "global"] = "key"
    endpoints: tuple[CacheEndpoint, ...] = ("chat.completions", "completions", "embeddings")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> ResponseCacheSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("redis_url is required when backend is redis")
        if self.max_entry_bytes > self.max_bytes:
            raise ValueError(f"max_entry_bytes ({self.max_entry_bytes}) must not exceed max_bytes ({self.max_bytes})")
        return self

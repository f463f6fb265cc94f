"""The configuration's model: one frozen, validated `Settings` (read by proxy/config_file.py).

Three steps, each reporting every problem it finds rather than stopping at the first:

1. parse the YAML (syntax errors carry their line; a key given twice in one mapping is an
   error, because PyYAML would silently keep the last one: two upstreams named alike);
2. interpolate `${VAR}`, `${VAR:-default}` and `$$` in string values (never in keys);
3. validate with pydantic, then check cross-references (routes name real upstreams).

Whatever goes wrong becomes one `ConfigError` whose problems each read
`<dotted.key[path]>: <bad value> <what is wrong>`. Pydantic's own error list is translated
into that form in exactly one place, `_problems_from_validation_error`.

Route lookup (`Settings.route_for`) runs per request, so its tables are built once, when the
model is validated: a dict for exact names, precompiled regexes for globs.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxy.config_base import (
    MANAGED_HEADERS,
    WILDCARD_HOSTS,
    Count,
    HeaderName,
    Pattern,
    Secret,
    Section,
    UpstreamName,
    UsdPerMillion,
    check_http_url,
    check_non_empty,
    is_loopback,
)
from proxy.config_sections import (
    AdminSettings,
    HealthCheck,
    LoggingSettings,
    MetricsSettings,
    PassthroughSettings,
    ResponseCacheSettings,
    ServerSettings,
    TimeoutOverrides,
    Timeouts,
)
from proxy.errors import ConfigError
from proxy.keys import VirtualKeys
from proxy.ratelimit.rules import LimitRules
from proxy.replicas import default_replica_name
from proxy.routing import ResolvedRoute, Router
from proxy.spend.budgets import BudgetRules, LedgerSettings, WebhookSettings

__all__ = [
    "AdminSettings",
    "LoggingSettings",
    "MetricsSettings",
    "HealthCheck",
    "ModelPrice",
    "Pricing",
    "ReplicaSettings",
    "ResolvedRoute",
    "Route",
    "ServerSettings",
    "Settings",
    "TimeoutOverrides",
    "Timeouts",
    "UpstreamSettings",
    "is_loopback",
]


_REPLICA_NAME = re.compile(r"[A-Za-z0-9_.:-]+")


def _check_replica_name(value: str) -> str:
    if not _REPLICA_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid replica name (use letters, digits, _ . : -)")
    return value


def _normalised_base(kind: str, url: str) -> str:
    """llamacpp: the server root (a trailing /v1 removed); azure: the resource endpoint (a
    trailing /openai removed); openai: the API base as given."""
    url = check_http_url(url)
    if kind == "llamacpp" and url.endswith("/v1"):
        url = url[: -len("/v1")]
    if kind == "azure" and url.endswith("/openai"):
        url = url[: -len("/openai")]
    return url


def _api_base(kind: str, base_url: str) -> str:
    if kind == "llamacpp":
        return base_url + "/v1"
    if kind == "azure":
        return base_url + "/openai"
    return base_url


def _root_url(kind: str, base_url: str) -> str:
    if kind in ("llamacpp", "azure"):
        return base_url
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


def _replica_shorthand(value: Any) -> Any:
    # A bare URL is a replica with nothing else to say.
    return {"base_url": value} if isinstance(value, str) else value


class ReplicaSettings(Section):
    """One server of a replicated upstream. It speaks the upstream's kind and serves the
    same model names; only its address, its metric name and (optionally) its key differ."""

    base_url: str
    # The `replica` label on metrics, spans and log lines; host:port of base_url by default.
    name: Annotated[str, AfterValidator(_check_replica_name)] | None = None
    # This replica's own key, in place of the upstream's (e.g. a second account or region).
    api_key: Secret = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_http_url(value)

    @property
    def label(self) -> str:
        return self.name if self.name is not None else default_replica_name(self.base_url)


class UpstreamSettings(Section):
    kind: Literal["openai", "llamacpp", "azure"] = "openai"
    # openai: the API base as the OpenAI SDK takes it (.../v1). llamacpp: the server root;
    # a trailing /v1 is removed here so `api_base` and `root_url` are always right.
    # azure: the resource endpoint as AzureOpenAI takes it (https://NAME.openai.azure.com);
    # a trailing /openai is removed. Its API lives under /openai: deployments
    # (/openai/deployments/{deployment}/...) and the v1 API (/openai/v1/...); the key goes
    # up as `api-key`.
    # Exactly one of base_url and replicas: several servers of the same kind serving the
    # same models, each request sent to the least busy one (README "Replicated upstreams").
    base_url: str | None = None
    replicas: (
        tuple[
            Annotated[ReplicaSettings, BeforeValidator(_replica_shorthand, json_schema_input_type=str | ReplicaSettings)],
            ...,
        ]
        | None
    ) = None
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    api_key: Secret = None
    inject_stream_usage: bool = True
    max_connections: Count = 100
    headers: dict[HeaderName, str] = Field(default_factory=dict)
    timeouts: TimeoutOverrides = Field(default_factory=TimeoutOverrides)
    default_max_tokens: Count | None = None

    @model_validator(mode="before")
    @classmethod
    def _stream_usage_default(cls, data: Any) -> Any:
        # llama-server already reports `timings` on its last chunk, so asking it for a usage
        # chunk buys nothing; OpenAI only reports stream usage when asked.
        if isinstance(data, dict) and data.get("inject_stream_usage") is None:
            data = {**data, "inject_stream_usage": data.get("kind", "openai") in ("openai", "azure")}
        return data

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else _normalised_base(info.data.get("kind", "openai"), value)

    @field_validator("replicas")
    @classmethod
    def _replicas(
        cls, value: tuple[ReplicaSettings, ...] | None, info: ValidationInfo
    ) -> tuple[ReplicaSettings, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("[] must list at least one replica (or use base_url)")
        kind = info.data.get("kind", "openai")
        seen: dict[str, str] = {}
        out = []
        for i, replica in enumerate(value):
            url = _normalised_base(kind, replica.base_url)
            if url in seen.values():
                raise ValueError(f"[{i}] {replica.base_url!r} is listed twice")
            label = replica.label
            if label in seen:
                raise ValueError(
                    f"[{i}] {label!r} names both {seen[label]!r} and {replica.base_url!r}: give one a distinct `name`"
                )
            seen[label] = url
            out.append(replica.model_copy(update={"base_url": url, "name": label}))
        return tuple(out)

    @model_validator(mode="after")
    def _one_address(self) -> UpstreamSettings:
        if (self.base_url is None) == (self.replicas is None):
            got = "both" if self.base_url is not None else "neither"
            raise ValueError(f"set exactly one of base_url and replicas (got {got})")
        # Compared with the default rather than asked whether it was given: a dumped and
        # revalidated config (workers, reloads) carries the default explicitly.
        if self.replicas is None and self.health_check != HealthCheck():
            raise ValueError("health_check applies only to an upstream with replicas")
        return self

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in MANAGED_HEADERS:
                raise ValueError(f"{name!r} is set by the proxy itself and cannot be configured")
        return value

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every base URL this upstream sends to: its one base_url, or its replicas'."""
        if self.replicas is not None:
            return tuple(r.base_url for r in self.replicas)
        assert self.base_url is not None
        return (self.base_url,)

    @property
    def api_base(self) -> str:
        """Where /v1/* requests go, without a trailing slash (for azure, the /openai root:
        /v1/... lands on Azure's v1 API, /deployments/... on a deployment). Of the first
        replica, for a replicated upstream."""
        return _api_base(self.kind, self.addresses[0])

    @property
    def root_url(self) -> str:
        """The server root: llama-server's /props, /health and /metrics live here."""
        return _root_url(self.kind, self.addresses[0])

    def api_base_of(self, base_url: str) -> str:
        return _api_base(self.kind, base_url)

    def root_url_of(self, base_url: str) -> str:
        return _root_url(self.kind, base_url)

    @property
    def keyed(self) -> bool:
        """Whether Tollgate holds a key of its own for this upstream (or any replica)."""
        return self.api_key is not None or any(r.api_key is not None for r in self.replicas or ())

    def effective_timeouts(self, defaults: Timeouts) -> Timeouts:
        return self.timeouts.over(defaults)


def _one_pattern_is_a_list(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


class Route(Section):
    models: Annotated[
        tuple[Pattern, ...], BeforeValidator(_one_pattern_is_a_list, json_schema_input_type=str | list[str])
    ]
    upstream: str
    model: Annotated[str, AfterValidator(check_non_empty)] | None = None
    default_max_tokens: Count | None = None

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("[] must list at least one model name or glob")
        seen: set[str] = set()
        for pattern in value:
            if pattern in seen:
                raise ValueError(f"{pattern!r} is listed twice")
            seen.add(pattern)
        return value


def _price_shorthand(value: Any) -> Any:
    # `"local/*": 0` prices every kind of token the same.
    if isinstance(value, (int, float, str, Decimal)) and not isinstance(value, bool):
        return {"input": value, "output": value}
    return value


class ModelPrice(Section):
    """USD per 1M tokens. None for cached_input / cache_write: the pricing code decides."""

    input: UsdPerMillion
    output: UsdPerMillion
    cached_input: UsdPerMillion | None = None
    cache_write: UsdPerMillion | None = None


class Pricing(Section):
    # Insertion order is kept: globs are tried in the order written.
    models: dict[
        Pattern,
        Annotated[ModelPrice, BeforeValidator(_price_shorthand, json_schema_input_type=ModelPrice | UsdPerMillion)],
    ] = Field(
        default_factory=dict
    )
    unpriced: Literal["allow", "refuse"] = "allow"


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    upstreams: dict[UpstreamName, UpstreamSettings]
    routes: tuple[Route, ...] = ()
    default_upstream: str | None = None
    pricing: Pricing = Field(default_factory=Pricing)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    passthrough: PassthroughSettings = Field(default_factory=PassthroughSettings)
    # Virtual keys: when any are configured, every request must present one.
    keys: VirtualKeys = ()
    # Header naming the end user (wins over the body's `user` field), for per-user budgets.
    user_header: str | None = None
    budgets: BudgetRules = ()
    # Requests and tokens per minute and requests in flight, per key, user, team or model.
    limits: LimitRules = ()
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    response_cache: ResponseCacheSettings = Field(default_factory=ResponseCacheSettings)
    # Output cap assumed for a budget reservation when neither the request nor its route or
    # upstream sets one; also written into such requests while a blocking budget applies,
    # so the worst case reserved is the worst case that can happen.
    default_max_tokens: Annotated[int, Field(ge=1)] = 4096

    @field_validator("upstreams")
    @classmethod
    def _at_least_one(cls, value: dict[str, UpstreamSettings]) -> dict[str, UpstreamSettings]:
        if not value:
            raise ValueError("{} must configure at least one upstream")
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> Settings:
        # Problems here span several keys, which a pydantic error location cannot name, so
        # they are raised as a ConfigError directly, already in the final form.
        problems = self._cross_reference_problems()
        if problems:
            raise ConfigError(problems)
        # Build the lookup tables now, while the values are known to be consistent.
        _ = self._router, self._timeouts
        return self

    # The derived tables live in cached properties rather than pydantic private attributes:
    # a cached property is a plain instance-dict hit, a private attribute goes through
    # pydantic's __getattr__ (about 3 us), which route_for pays on every request.
    # Derive new settings with parse_settings/model_validate: model_copy(update=...) would
    # copy these tables unchanged.
    @cached_property
    def _router(self) -> Router:
        return Router(self.routes, self.upstreams, self.default_upstream)

    @cached_property
    def _timeouts(self) -> dict[str, Timeouts]:
        return {name: u.effective_timeouts(self.timeouts) for name, u in self.upstreams.items()}

    def _cross_reference_problems(self) -> list[str]:
        problems: list[str] = []
        have = ", ".join(self.upstreams)

        def check_upstream(path: str, name: str) -> None:
            if name not in self.upstreams:
                problems.append(f"{path}: {name!r} is not a configured upstream (have: {have})")

        first_seen: dict[str, str] = {}
        for i, route in enumerate(self.routes):
            check_upstream(f"routes[{i}].upstream", route.upstream)
            for k, pattern in enumerate(route.models):
                here = f"routes[{i}].models[{k}]"
                if pattern in first_seen:
                    problems.append(
                        f"{here}: {pattern!r} is already routed by {first_seen[pattern]}"
                        " (this entry would never match)"
                    )
                else:
                    first_seen[pattern] = here
        if self.default_upstream is not None:
            check_upstream("default_upstream", self.default_upstream)
        elif not self.routes:
            problems.append(
                "routes: [] and no default_upstream: every model would be 404;"
                " add a route or set default_upstream"
            )

        key_names = {k.name for k in self.keys}
        teams = {k.metadata["team"] for k in self.keys if "team" in k.metadata}
        scoped = [("budgets", i, r.scope) for i, r in enumerate(self.budgets)]
        scoped += [("limits", i, r.scope) for i, r in enumerate(self.limits)]
        for section, i, scope in scoped:
            key = scope.key
            if key is not None and key != "*" and key not in key_names:
                known = ", ".join(sorted(key_names)) or "none configured"
                problems.append(f"{section}[{i}].scope.key: {key!r} is not a configured key (have: {known})")
        for section, i, scope in scoped:
            team = scope.team
            if team is not None and team != "*" and team not in teams:
                # It would never apply: a request's team is its key's metadata.team.
                known = ", ".join(sorted(teams)) or "no key has metadata.team"
                problems.append(f"{section}[{i}].scope.team: {team!r} is not the metadata.team of any configured key (have: {known})")

        exposure = self._anonymous_exposure()
        if exposure is not None:
            problems.append(exposure)

        m, s = self.metrics, self.server
        same_host = m.host == s.host or m.host in WILDCARD_HOSTS or s.host in WILDCARD_HOSTS
        if m.enabled and m.port != 0 and m.port == s.port and same_host:
            problems.append(f"metrics.port: {m.port} is also server.port on host {m.host!r}")
        return problems

    def _anonymous_exposure(self) -> str | None:
        """Why this config would hand an upstream key to whoever reaches the port, or None.

        With no `keys:`, Tollgate authenticates nobody, and an upstream with its own
        api_key gets that key instead of the client's: on an address other machines can
        reach, that is the operator's key for anyone. It takes `server.allow_anonymous:
        true` to say that is intended (another layer authenticates, the network is closed)."""
        server = self.server
        if self.keys or server.allow_anonymous or is_loopback(server.host):
            return None
        keyed = [name for name, u in self.upstreams.items() if u.keyed]
        if not keyed:
            return None  # each client's own Authorization goes upstream: nothing of ours to spend
        names = ", ".join(f"upstreams.{n}.api_key" for n in keyed)
        return (
            f"server.host: {server.host!r} is reachable from other machines, no keys: are "
            f"configured, and {names} would be sent upstream for any client; add keys:, "
            "listen on 127.0.0.1, or set server.allow_anonymous: true if something in front "
            "authenticates clients"
        )

    # ----------------------------------------------------------------------- lookups

    def route_for(self, model: str) -> ResolvedRoute | None:
        """Exact names first, then globs in the order written, then default_upstream."""
        return self._router.route_for(model)

    def exact_model_names(self) -> list[str]:
        """Model names a client can ask for verbatim (for GET /v1/models), in route order."""
        return list(self._router.exact)

    def models_for_upstream(self, name: str) -> list[str]:
        """The patterns (exact names and globs) routed to upstream `name`, in route order."""
        return [p for r in self.routes if r.upstream == name for p in r.models]

    def timeouts_for(self, upstream: str) -> Timeouts:
        """The upstream's override merged over the global timeouts."""
        return self._timeouts[upstream]

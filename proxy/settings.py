"""The configuration: one YAML file in, one frozen, validated `Settings` out.

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

import difflib
import fnmatch
import ipaddress
import os
import re
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from proxy.errors import ConfigError
from proxy.globs import check_glob
from proxy.keys import VirtualKeys
from proxy.pricing import usd_per_million
from proxy.spend.budgets import BudgetRules, LedgerSettings, WebhookSettings

__all__ = [
    "AdminSettings",
    "LoggingSettings",
    "MetricsSettings",
    "OVERRIDABLE",
    "Override",
    "ModelPrice",
    "Pricing",
    "ResolvedRoute",
    "Route",
    "ServerSettings",
    "Settings",
    "TimeoutOverrides",
    "Timeouts",
    "Upstream",
    "collect_overrides",
    "config_json_schema",
    "is_glob",
    "is_loopback",
    "load_settings",
    "parse_settings",
]

# Prometheus `model` label for requests that reached an upstream only through default_upstream.
OTHER_LABEL = "other"

_GLOB_CHARS = frozenset("*?[")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# RFC 9110 token: what a header field name may contain.
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the proxy itself owns on the upstream request; configuring them would corrupt it.
_MANAGED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", "*"})


def is_glob(pattern: str) -> bool:
    """True when `pattern` uses fnmatch syntax; anything else is an exact model name."""
    return not _GLOB_CHARS.isdisjoint(pattern)


# --------------------------------------------------------------------------- value checks
# Validators raise ValueError with a message that already shows the bad value, so the
# translation only has to put the key path in front of it.


def _check_port(value: int) -> int:
    # 0 is allowed on purpose: it binds any free port, which is what tests and
    # side-by-side instances want.
    if not 0 <= value <= 65535:
        raise ValueError(f"{value!r} must be between 1 and 65535 (or 0 for any free port)")
    return value


def _check_non_empty(value: str) -> str:
    if not value.strip():
        raise ValueError(f"{value!r} must not be empty")
    return value.strip()


def _check_header_name(value: str) -> str:
    if not _HEADER_TOKEN.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


def _check_upstream_name(value: str) -> str:
    if not _UPSTREAM_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid upstream name (use letters, digits, _ . -)")
    return value


def _check_http_url(value: str) -> str:
    try:
        parts = urlsplit(value)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        raise ValueError(f"{value!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http(s) URL")
    if not port_ok:
        raise ValueError(f"{value!r} has an invalid port")
    if parts.query or parts.fragment:
        raise ValueError(f"{value!r} must not have a query or fragment")
    return value.rstrip("/")


def _empty_secret_is_none(value: Any) -> Any:
    # `api_key: ${OPENAI_API_KEY:-}` must mean "no key" when the variable is unset.
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _strict_bool(value: Any) -> Any:
    # A switch that opens the proxy to anyone must mean exactly what it says: YAML's true or
    # false, or the same words from `${VAR}` (interpolation yields strings); never 1, "yes"
    # or "on", which pydantic would otherwise read as true.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{value!r} must be true or false")


def is_loopback(host: str) -> bool:
    """True when only this machine can reach `host`: localhost or a loopback address."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public interface


# The range is checked by _check_port (its message names the value); the schema states it too.
Port = Annotated[int, AfterValidator(_check_port), Field(json_schema_extra={"minimum": 0, "maximum": 65535})]
StrictBool = Annotated[bool, BeforeValidator(_strict_bool)]
Host = Annotated[str, AfterValidator(_check_non_empty)]
Seconds = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(gt=0)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
UpstreamName = Annotated[str, AfterValidator(_check_upstream_name)]
Pattern = Annotated[str, AfterValidator(_check_non_empty), AfterValidator(check_glob)]
# json_schema_input_type: what the YAML may hold, for `tollgate schema` (see config_json_schema).
Price = Annotated[Decimal, PlainValidator(usd_per_million, json_schema_input_type=Annotated[float, Field(ge=0)] | str)]
Secret = Annotated[SecretStr | None, BeforeValidator(_empty_secret_is_none)]


# --------------------------------------------------------------------------- models


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # A section whose every line is commented out parses as null (`pricing:` with nothing
        # under it); that should mean "defaults", not "pricing must be a mapping". Keys whose
        # default is itself None keep an explicit null; unknown keys stay, so they are reported.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields

        def keep(key: Any, value: Any) -> bool:
            if value is not None or key not in fields:
                return True
            f = fields[key]
            return not f.is_required() and f.default is None

        return {k: v for k, v in data.items() if keep(k, v)}


class ServerSettings(_Section):
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


class Timeouts(_Section):
    """Seconds. first_byte: request sent -> response headers; idle: between two body chunks."""

    connect: Seconds = 10.0
    first_byte: Seconds = 120.0
    idle: Seconds = 120.0


class TimeoutOverrides(_Section):
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


class Upstream(_Section):
    kind: Literal["openai", "llamacpp", "azure"] = "openai"
    # openai: the API base as the OpenAI SDK takes it (.../v1). llamacpp: the server root;
    # a trailing /v1 is removed here so `api_base` and `root_url` are always right.
    # azure: the resource endpoint as AzureOpenAI takes it (https://NAME.openai.azure.com);
    # a trailing /openai is removed. Its API lives under /openai: deployments
    # (/openai/deployments/{deployment}/...) and the v1 API (/openai/v1/...); the key goes
    # up as `api-key`.
    base_url: str
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
    def _base_url(cls, value: str, info: ValidationInfo) -> str:
        url = _check_http_url(value)
        if info.data.get("kind") == "llamacpp" and url.endswith("/v1"):
            url = url[: -len("/v1")]
        if info.data.get("kind") == "azure" and url.endswith("/openai"):
            url = url[: -len("/openai")]
        return url

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in _MANAGED_HEADERS:
                raise ValueError(f"{name!r} is set by the proxy itself and cannot be configured")
        return value

    @property
    def api_base(self) -> str:
        """Where /v1/* requests go, without a trailing slash (for azure, the /openai root:
        /v1/... lands on Azure's v1 API, /deployments/... on a deployment)."""
        if self.kind == "llamacpp":
            return self.base_url + "/v1"
        if self.kind == "azure":
            return self.base_url + "/openai"
        return self.base_url

    @property
    def root_url(self) -> str:
        """The server root: llama-server's /props, /health and /metrics live here."""
        if self.kind in ("llamacpp", "azure"):
            return self.base_url
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def effective_timeouts(self, defaults: Timeouts) -> Timeouts:
        return self.timeouts.over(defaults)


def _one_pattern_is_a_list(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


class Route(_Section):
    models: Annotated[
        tuple[Pattern, ...], BeforeValidator(_one_pattern_is_a_list, json_schema_input_type=str | list[str])
    ]
    upstream: str
    model: Annotated[str, AfterValidator(_check_non_empty)] | None = None
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


class ModelPrice(_Section):
    """USD per 1M tokens. None for cached_input / cache_write: the pricing code decides."""

    input: Price
    output: Price
    cached_input: Price | None = None
    cache_write: Price | None = None


class Pricing(_Section):
    # Insertion order is kept: globs are tried in the order written.
    models: dict[
        Pattern,
        Annotated[ModelPrice, BeforeValidator(_price_shorthand, json_schema_input_type=ModelPrice | Price)],
    ] = Field(
        default_factory=dict
    )
    unpriced: Literal["allow", "refuse"] = "allow"


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"{value!r} must start with '/'")
    return value


class MetricsSettings(_Section):
    enabled: bool = True
    host: Host = "127.0.0.1"
    port: Port = 9464
    path: Annotated[str, AfterValidator(_check_path)] = "/metrics"


def _payloads_off(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as False.
    return "off" if value is False else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class LoggingSettings(_Section):
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    access_log: bool = True
    payloads: Annotated[Literal["off", "truncated"], BeforeValidator(_payloads_off)] = "off"
    payload_max_chars: Count = 1000


class PassthroughSettings(_Section):
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


class AdminSettings(_Section):
    api_key: Secret = None
    # Who may read /v1/tollgate/summary once virtual keys exist: any valid key or the admin
    # key ("keys"), or the admin key alone ("admin"). Without keys it is open, like the API.
    summary_access: Literal["keys", "admin"] = "keys"


@dataclass(frozen=True, slots=True)
class ResolvedRoute:
    """Where one model name goes."""

    upstream: str
    upstream_model: str  # the id sent upstream: the alias target, or the model as asked
    route_label: str  # bounded Prometheus `model` label: exact name, glob pattern, or "other"
    default_max_tokens: int | None
    matched_default: bool  # True when only default_upstream took it


@dataclass(frozen=True, slots=True)
class _GlobRoute:
    match: Callable[[str], re.Match[str] | None]
    pattern: str
    upstream: str
    alias: str | None
    default_max_tokens: int | None


class _Router:
    """The route table compiled for lookup: a dict for exact names, regexes for globs."""

    __slots__ = ("default", "default_cap", "exact", "globs")

    def __init__(
        self, routes: tuple[Route, ...], upstreams: Mapping[str, Upstream], default: str | None
    ) -> None:
        self.exact: dict[str, ResolvedRoute] = {}
        globs: list[_GlobRoute] = []
        for route in routes:
            upstream = upstreams[route.upstream]
            cap = (
                route.default_max_tokens
                if route.default_max_tokens is not None
                else upstream.default_max_tokens
            )
            for pattern in route.models:
                if is_glob(pattern):
                    # fnmatch.translate gives a full-match regex; compiling without IGNORECASE
                    # keeps it case-sensitive (fnmatchcase semantics) on every platform.
                    regex = re.compile(fnmatch.translate(pattern))
                    globs.append(_GlobRoute(regex.match, pattern, route.upstream, route.model, cap))
                else:
                    self.exact[pattern] = ResolvedRoute(
                        upstream=route.upstream,
                        upstream_model=route.model or pattern,
                        route_label=pattern,
                        default_max_tokens=cap,
                        matched_default=False,
                    )
        self.globs = tuple(globs)
        self.default: str | None = default
        self.default_cap: int | None = (
            None if default is None else upstreams[default].default_max_tokens
        )

    def route_for(self, model: str) -> ResolvedRoute | None:
        hit = self.exact.get(model)
        if hit is not None:
            return hit
        for glob in self.globs:
            if glob.match(model):
                return ResolvedRoute(
                    upstream=glob.upstream,
                    upstream_model=glob.alias or model,
                    route_label=glob.pattern,
                    default_max_tokens=glob.default_max_tokens,
                    matched_default=False,
                )
        if self.default is None:
            return None
        return ResolvedRoute(self.default, model, OTHER_LABEL, self.default_cap, True)


class Settings(_Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    upstreams: dict[UpstreamName, Upstream]
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
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    # Output cap assumed for a budget reservation when neither the request nor its route or
    # upstream sets one; also written into such requests while a blocking budget applies,
    # so the worst case reserved is the worst case that can happen.
    default_max_tokens: Annotated[int, Field(ge=1)] = 4096

    @field_validator("upstreams")
    @classmethod
    def _at_least_one(cls, value: dict[str, Upstream]) -> dict[str, Upstream]:
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
    def _router(self) -> _Router:
        return _Router(self.routes, self.upstreams, self.default_upstream)

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
        for i, rule in enumerate(self.budgets):
            key = rule.scope.key
            if key is not None and key != "*" and key not in key_names:
                known = ", ".join(sorted(key_names)) or "none configured"
                problems.append(f"budgets[{i}].scope.key: {key!r} is not a configured key (have: {known})")
        teams = {k.metadata["team"] for k in self.keys if "team" in k.metadata}
        for i, rule in enumerate(self.budgets):
            team = rule.scope.team
            if team is not None and team != "*" and team not in teams:
                # It would never apply: a request's team is its key's metadata.team.
                known = ", ".join(sorted(teams)) or "no key has metadata.team"
                problems.append(f"budgets[{i}].scope.team: {team!r} is not the metadata.team of any configured key (have: {known})")

        exposure = self._anonymous_exposure()
        if exposure is not None:
            problems.append(exposure)

        m, s = self.metrics, self.server
        same_host = m.host == s.host or m.host in _WILDCARD_HOSTS or s.host in _WILDCARD_HOSTS
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
        keyed = [name for name, u in self.upstreams.items() if u.api_key is not None]
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


# --------------------------------------------------------------------------- paths


def _format_path(loc: tuple[Any, ...]) -> str:
    """('routes', 2, 'upstream') -> 'routes[2].upstream'; odd keys are quoted."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself was invalid"
            continue
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


# --------------------------------------------------------------------------- interpolation

_REFERENCE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<body>[^}]*)\}|(?P<open>\{))")
_REFERENCE_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.S)


def _interpolate(
    node: Any, loc: tuple[Any, ...], env: Mapping[str, str], problems: list[str]
) -> Any:
    if isinstance(node, str):
        return _interpolate_string(node, loc, env, problems)
    if isinstance(node, dict):
        return {k: _interpolate(v, (*loc, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    return node


def _interpolate_string(
    text: str, loc: tuple[Any, ...], env: Mapping[str, str], problems: list[str]
) -> str:
    if "$" not in text:
        return text
    path = _format_path(loc)

    def replace(m: re.Match[str]) -> str:
        if m.group("dollar"):
            return "$"
        if m.group("open"):
            problems.append(f"{path}: {text!r} has an unterminated '${{'")
            return ""
        ref = _REFERENCE_BODY.fullmatch(m.group("body"))
        if ref is None:
            problems.append(
                f"{path}: {m.group(0)!r} is not a valid reference"
                " (use ${NAME} or ${NAME:-default})"
            )
            return ""
        name, default = ref.group("name"), ref.group("default")
        if default is not None and "${" in default:
            problems.append(f"{path}: {m.group(0)!r}: nested references are not supported")
            return ""
        value = env.get(name)
        if default is not None and not value:  # `:-` also covers set-but-empty, as in the shell
            return default
        if value is None:
            problems.append(
                f"{path}: environment variable {name} is not set"
                f" (write ${{{name}:-default}} to make it optional)"
            )
            return ""
        return value

    return _REFERENCE.sub(replace, text)


# --------------------------------------------------------------------------- YAML


# libyaml's parser when PyYAML has it: the same nodes, marks and errors, ~7x quicker to read
# the config and price table on the way to readiness.
if TYPE_CHECKING:
    _SafeLoader = yaml.SafeLoader
else:
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges may legitimately be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:
                continue  # unhashable key: the base class reports it
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {seen + 1})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> tuple[Any, list[str]]:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), []  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        return None, [f"YAML error at {where}: {what}"]
    except yaml.YAMLError as exc:
        return None, [f"YAML error: {exc}"]


# --------------------------------------------------------------------------- translation


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that holds the key at `loc` (for "unknown key" hints)."""
    tp: Any = Settings
    for part in loc[:-1]:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            tp = field.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _show(value: Any, loc: tuple[Any, ...]) -> str:
    if "api_key" in loc or isinstance(value, SecretStr):
        return "'***'"  # a wrongly typed secret is still a secret
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(error: Mapping[str, Any]) -> str:
    loc: tuple[Any, ...] = tuple(error["loc"])
    kind: str = error["type"]
    msg: str = error["msg"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        known = _known_keys(loc)
        if not known:
            return "unknown key"
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        return f"unknown key{hint} (known: {', '.join(known)})"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    shown = _show(error.get("input"), loc)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{shown} must be a mapping"
    if kind in ("list_type", "tuple_type"):
        return f"{shown} must be a list"
    if msg.startswith("Input should"):
        return shown + " must" + msg.removeprefix("Input should")
    return f"{shown}: {msg}"


def _problems_from_validation_error(exc: ValidationError) -> list[str]:
    """The one place pydantic's error list becomes `key.path: value what-is-wrong` lines."""
    return [f"{_format_path(tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()]


# --------------------------------------------------------------------------- overrides

# What a container sets without forking the YAML: (key path, command-line flag, variable).
# A flag wins over its variable, and both over the file; an empty variable counts as unset.
OVERRIDABLE: tuple[tuple[str, str, str], ...] = (
    ("server.host", "--host", "TOLLGATE_HOST"),
    ("server.port", "--port", "TOLLGATE_PORT"),
    ("metrics.host", "--metrics-host", "TOLLGATE_METRICS_HOST"),
    ("metrics.port", "--metrics-port", "TOLLGATE_METRICS_PORT"),
    ("logging.level", "--log-level", "TOLLGATE_LOG_LEVEL"),
    ("ledger.backend", "--ledger-backend", "TOLLGATE_LEDGER_BACKEND"),
    ("ledger.path", "--ledger-path", "TOLLGATE_LEDGER_PATH"),
)


@dataclass(frozen=True, slots=True)
class Override:
    """One key set from outside the file, and where it came from (for error messages)."""

    path: str
    value: Any
    origin: str


def collect_overrides(flags: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Override, ...]:
    """The overrides in effect: `flags` maps a flag (`--port`) to its value, None when not given."""
    found: list[Override] = []
    for path, flag, variable in OVERRIDABLE:
        if flags.get(flag) is not None:
            found.append(Override(path, flags[flag], flag))
        elif env.get(variable, "").strip():
            found.append(Override(path, env[variable].strip(), variable))
    return tuple(found)


def _apply_overrides(data: dict[str, Any], overrides: tuple[Override, ...]) -> dict[str, Any]:
    for o in overrides:
        section, key = o.path.split(".")
        current = data.get(section)
        data = {**data, section: {**(current if isinstance(current, dict) else {}), key: o.value}}
    return data


def _blame(problems: list[str], overrides: tuple[Override, ...]) -> list[str]:
    """Say which flag or variable set a key a problem is about: it is not in the file."""
    out = []
    for problem in problems:
        for o in overrides:
            if problem.startswith(f"{o.path}:"):
                problem += f" (set by {o.origin})"
        out.append(problem)
    return out


# --------------------------------------------------------------------------- JSON schema

SCHEMA_ID = "https://github.com/tollgate/tollgate/config/tollgate.schema.json"
# What `${VAR}` interpolation lets stand where YAML would otherwise need a number or a bool.
_INTERPOLATED = {"type": "string", "pattern": r"\$\{"}


def _sections(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Every model reachable from `model`'s fields, by the title its schema $def carries."""
    if model.__name__ in seen:
        return seen
    seen[model.__name__] = model
    for field in model.model_fields.values():
        todo = [field.annotation]
        while todo:
            tp = todo.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _sections(tp, seen)
            todo.extend(get_args(tp))
    return seen


_ANNOTATIONS = ("title", "description", "default")


def _or(node: dict[str, Any], alternative: dict[str, Any]) -> dict[str, Any]:
    """`node` or `alternative`, with node's title, description and default kept outermost,
    where editors look for them."""
    inner = {k: v for k, v in node.items() if k not in _ANNOTATIONS}
    return {**{k: node[k] for k in _ANNOTATIONS if k in node}, "anyOf": [inner, alternative]}


def _widen(node: Any) -> Any:
    """Add to a generated schema what the loader accepts beyond the models' types: a
    `${VAR}` string in place of a number or bool (interpolated before validation)."""
    if isinstance(node, list):
        return [_widen(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _widen(v) for k, v in node.items()}
    if out.get("type") in ("integer", "number", "boolean"):
        return _or(out, _INTERPOLATED)
    return out


def config_json_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of the YAML config, generated from the models above,
    so it cannot drift from what the loader accepts. The loader is the authority: the schema
    is what editors check as you type (unknown keys, types, enums, ranges), while
    cross-references (a route naming a missing upstream), glob syntax, URLs and header names
    are checked by `tollgate check-config` alone."""
    schema = Settings.model_json_schema(mode="validation")
    nullable = {name for name, m in _sections(Settings, {}).items() if issubclass(m, _Section)}
    for name, definition in [("Settings", schema), *schema.get("$defs", {}).items()]:
        if name not in nullable:
            continue
        # `_Section._null_means_default`: a key left empty takes its default.
        required = set(definition.get("required", ()))
        for key, prop in definition.get("properties", {}).items():
            if key not in required:
                definition["properties"][key] = _or(prop, {"type": "null"})
    schema = _widen(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Tollgate configuration",
        "description": "config/tollgate.yaml documents every key; `tollgate check-config` is the authority.",
        **{k: v for k, v in schema.items() if k != "title"},
    }


# --------------------------------------------------------------------------- entry points


def parse_settings(
    text: str, env: Mapping[str, str], source: str = "<string>", overrides: tuple[Override, ...] = ()
) -> Settings:
    """Parse, interpolate and validate one YAML document.

    Raises ConfigError listing every problem found at the first stage that had any.
    """
    data, problems = _load_yaml(text)
    if problems:
        raise ConfigError(problems, source)
    if data is None:
        raise ConfigError(
            ["(top level): the document is empty (expected a mapping with at least `upstreams`)"],
            source,
        )
    if not isinstance(data, dict):
        shown, kind = _show(data, ()), type(data).__name__
        raise ConfigError(
            [f"(top level): {shown} is a {kind}, expected a mapping of sections"], source
        )
    data = _interpolate(data, (), env, problems)
    if problems:
        raise ConfigError(problems, source)
    data = _apply_overrides(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_blame(_problems_from_validation_error(exc), overrides), source) from None
    except ConfigError as exc:  # cross-reference problems, raised without a source
        raise ConfigError(_blame(exc.problems, overrides), source) from None


def load_settings(
    path: str | Path, env: Mapping[str, str] | None = None, overrides: tuple[Override, ...] = ()
) -> Settings:
    """Read `path` and parse it with `overrides` on top; `env` defaults to the process environment."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {source}"], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read {source}: {exc}"], source) from None
    return parse_settings(text, os.environ if env is None else env, source, overrides)

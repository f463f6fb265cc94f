"""What every configuration section shares: the strict base model and the value checks that
name the bad value. Pure."""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    model_validator,
)

from proxy.globs import check_glob
from proxy.pricing import usd_per_million

# Prometheus `model` label for requests that reached an upstream only through default_upstream.
OTHER_LABEL = "other"

_GLOB_CHARS = frozenset("*?[")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# RFC 9110 token: what a header field name may contain.
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# Headers the proxy itself owns on the upstream request; configuring them would corrupt it.
MANAGED_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"}
)
WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]", "*"})


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


def check_non_empty(value: str) -> str:
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


def check_http_url(value: str) -> str:
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
Host = Annotated[str, AfterValidator(check_non_empty)]
Seconds = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(gt=0)]
HeaderName = Annotated[str, AfterValidator(_check_header_name)]
UpstreamName = Annotated[str, AfterValidator(_check_upstream_name)]
Pattern = Annotated[str, AfterValidator(check_non_empty), AfterValidator(check_glob)]
# json_schema_input_type: what the YAML may hold, for `tollgate schema` (see config_json_schema).
UsdPerMillion = Annotated[Decimal, PlainValidator(usd_per_million, json_schema_input_type=Annotated[float, Field(ge=0)] | str)]
Secret = Annotated[SecretStr | None, BeforeValidator(_empty_secret_is_none)]


class Section(BaseModel):
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

"""Rate and concurrency limits as configured (`limits:` in YAML), and the checks one
request resolves them into. Pure.

A rule names a scope (as a budget's: key, user, team, model glob; `"*"` is one counter
per key, user or team seen) and any of `requests_per_minute`, `tokens_per_minute` and
`max_in_flight`. For one request, each rule that applies gives one check per limit it
sets, each on its own counter (rule, limit, resolved scope).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from proxy.spend.buckets import scope_match
from proxy.spend.rules import BudgetScope, unique_names

# Which limit: requests per minute, tokens per minute, requests in flight.
LimitKind = Literal["requests", "tokens", "in_flight"]
KINDS: tuple[LimitKind, ...] = ("requests", "tokens", "in_flight")
# Config field of each kind (and the word a refusal's code is made of).
FIELD: dict[LimitKind, str] = {
    "requests": "requests_per_minute",
    "tokens": "tokens_per_minute",
    "in_flight": "max_in_flight",
}

# Names become metric labels and parts of counter ids.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
# Per-minute limits stay below 10^9 so that the GCRA debt (limit x 60000) is exact in the
# Redis script's doubles (proxy.ratelimit.gcra).
PerMinute = Annotated[int, Field(ge=1, le=1_000_000_000)]


class LimitRule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    scope: BudgetScope = BudgetScope()
    requests_per_minute: PerMinute | None = None
    tokens_per_minute: PerMinute | None = None
    max_in_flight: Annotated[int, Field(ge=1, le=1_000_000)] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(f"{value!r}: limit names are 1-64 characters of letters, digits, '_', '.', ':' or '-'")
        return value

    @model_validator(mode="after")
    def _has_a_limit(self) -> LimitRule:
        if self.requests_per_minute is None and self.tokens_per_minute is None and self.max_in_flight is None:
            raise ValueError("a limit needs at least one of requests_per_minute, tokens_per_minute, max_in_flight")
        return self

    def limit_of(self, kind: LimitKind) -> int | None:
        if kind == "requests":
            return self.requests_per_minute
        if kind == "tokens":
            return self.tokens_per_minute
        return self.max_in_flight


# The type of the `limits:` section: a list of rules with unique names.
LimitRules = Annotated[tuple[LimitRule, ...], AfterValidator(unique_names("limit"))]


@dataclass(frozen=True, slots=True)
class Check:
    """One limit of one rule, resolved for a request: its counter and its limit."""

    id: str
    rule: LimitRule
    kind: LimitKind
    limit: int
    key: str | None = None
    user: str | None = None
    team: str | None = None

    @property
    def name(self) -> str:
        return self.rule.name

    def describe(self) -> str:
        """"'per-user' (user alice)": for messages."""
        scope = self.rule.scope
        parts = []
        if scope.key is not None:
            parts.append(f"key {self.key}")
        if scope.user is not None:
            parts.append(f"user {self.user}")
        if scope.team is not None:
            parts.append(f"team {self.team}")
        if scope.model is not None:
            parts.append(f"model {scope.model}")
        return f"'{self.name}'" + (f" ({', '.join(parts)})" if parts else "")


def _escape(value: str) -> str:
    # Keep ids unambiguous whatever a user string holds.
    return value.replace("%", "%25").replace("|", "%7C")


def checks_for(
    rules: Sequence[LimitRule], key_name: str | None, user: str | None, model: str | None, team: str | None
) -> list[Check]:
    """Every check that applies to a request, in config order, requests before tokens
    before in-flight within a rule."""
    out: list[Check] = []
    for rule in rules:
        matched = scope_match(rule.scope, key_name, user, model, team)
        if matched is None:
            continue
        key, usr, tm = matched
        scope = "".join(
            f"|{label}={_escape(value)}" for label, value in (("key", key), ("user", usr), ("team", tm)) if value is not None
        )
        for kind in KINDS:
            limit = rule.limit_of(kind)
            if limit is not None:
                out.append(Check(f"{rule.name}|{kind}{scope}", rule, kind, limit, key, usr, tm))
    return out

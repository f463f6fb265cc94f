"""Cost of a Usage under a price table. Pure; money is Decimal, never float.

Prices are USD per 1M tokens. A price table maps model names or fnmatch globs to prices;
shipped defaults live in proxy/data/pricing.yaml, and the user's entries win over them.

Pricing file format (a flat mapping, model or glob -> price):

    gpt-4o-mini:
      input: 0.15          # USD per 1M uncached input tokens
      cached_input: 0.075  # optional; defaults to input
      cache_write: 0.20    # optional; defaults to input
      output: 0.60         # reasoning tokens are output tokens
      per_1k_calls:        # optional: built-in tool calls billed per call, USD per 1000
        web_search: 25.00  #   calls (web_search, file_search), charged when the response
        file_search: 2.50  #   shows such calls
    "local/*": 0           # shorthand: one number prices input and output alike
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.resources
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from decimal import Decimal, InvalidOperation

import yaml

from proxy.errors import ConfigError
from proxy.usage import Usage

__all__ = ["CALL_KINDS", "Price", "PriceTable", "cost", "parse_price", "plain_usd", "worst_case_cost"]

_PER = Decimal(1_000_000)
_PER_CALLS = Decimal(1_000)
# Built-in tools OpenAI bills per call; Usage counts them as `<kind>_calls`.
CALL_KINDS = ("web_search", "file_search")


def plain_usd(amount: Decimal) -> str:
    """A Decimal as plain digits: 0.00000014, never str()'s 1.4E-7, which log readers,
    spreadsheets and JSON consumers would take for a float or a string."""
    return f"{amount:f}"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens. None for cached_input/cache_write means "same as input"."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    cache_write: Decimal | None = None
    # Tool kind (CALL_KINDS) -> USD per 1000 calls, as ((kind, price), ...).
    per_1k_calls: tuple[tuple[str, Decimal], ...] = ()

    def __post_init__(self) -> None:
        for name in ("input", "output", "cached_input", "cache_write"):
            value = getattr(self, name)
            if value is None and name in ("cached_input", "cache_write"):
                continue
            if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
                # A float here would already have lost the exact price.
                raise TypeError(f"Price.{name} must be a Decimal, got {type(value).__name__}")
            value = Decimal(value)
            if not value.is_finite() or value < 0:
                raise ValueError(f"Price.{name} must be a finite, non-negative number: {value}")
            object.__setattr__(self, name, value)
        for kind, fee in self.per_1k_calls:
            if kind not in CALL_KINDS:
                raise ValueError(f"Price.per_1k_calls: unknown tool {kind!r}; allowed: {', '.join(CALL_KINDS)}")
            if isinstance(fee, bool) or not isinstance(fee, (Decimal, int)) or not Decimal(fee).is_finite() or fee < 0:
                raise ValueError(f"Price.per_1k_calls.{kind} must be a finite, non-negative Decimal: {fee!r}")

    def call_fee(self, kind: str) -> Decimal:
        """USD per 1000 calls of the built-in tool `kind`; 0 if the price names none."""
        return next((Decimal(fee) for k, fee in self.per_1k_calls if k == kind), Decimal(0))


def cost(usage: Usage, price: Price) -> Decimal:
    """Exact USD cost of `usage`.

    Uncached input at `input`, cached input at `cached_input`, cache writes at
    `cache_write` (each defaulting to `input`), output (reasoning included) at `output`,
    plus each built-in tool call the response showed at its `per_1k_calls` fee.

    Odd counts are clamped so the result is never negative and no reported token goes
    unbilled: negative counts read as 0; parts are trusted as lower bounds of their totals,
    so if cached + cache-write exceed input_tokens, input is taken to be their sum, and if
    reasoning exceeds output_tokens, output is taken to be the reasoning count. Hence
    adding tokens of any kind never lowers the cost (monotone in every count); raising
    cached_input_tokens with input_tokens fixed re-prices existing tokens rather than
    adding any.
    """
    billed_input, billed_cached, billed_output = _billed(usage, price)
    return _total(usage, price, billed_input + billed_cached + billed_output)


def _total(usage: Usage, price: Price, billed: Decimal) -> Decimal:
    """USD of `billed` (USD x 1M) plus the built-in tool calls' fees."""
    total = billed / _PER
    if price.per_1k_calls and (usage.web_search_calls > 0 or usage.file_search_calls > 0):
        calls = (
            max(usage.web_search_calls, 0) * price.call_fee("web_search")
            + max(usage.file_search_calls, 0) * price.call_fee("file_search")
        )
        total += calls / _PER_CALLS
    return total


def _billed(usage: Usage, price: Price) -> tuple[Decimal, Decimal, Decimal]:
    """USD x 1M for (uncached input and cache writes, cached input, output), the counts
    clamped as `cost` describes: the one place the token arithmetic is written."""
    cached = max(usage.cached_input_tokens, 0)
    cache_write = max(usage.cache_write_tokens, 0)
    input_tokens = max(usage.input_tokens, cached + cache_write, 0)
    uncached = input_tokens - cached - cache_write
    output_tokens = max(usage.output_tokens, usage.reasoning_tokens, 0)
    cached_rate = price.input if price.cached_input is None else price.cached_input
    write_rate = price.input if price.cache_write is None else price.cache_write
    return uncached * price.input + cache_write * write_rate, cached * cached_rate, output_tokens * price.output


@dataclass(frozen=True, slots=True)
class CostParts:
    """What a request cost, and the parts the client sees (the x-tollgate-cost-* headers,
    `usage.cost`). `input` is uncached input plus cache writes (both billed as input
    tokens); built-in tool call fees are in `total` only, so the parts may sum to less."""

    total: Decimal
    input: Decimal
    cached_input: Decimal
    output: Decimal


def cost_parts(usage: Usage, price: Price) -> CostParts:
    """`cost` with its parts, the same clamping rules; `total` equals `cost(usage, price)`."""
    billed_input, billed_cached, billed_output = _billed(usage, price)
    return CostParts(
        total=_total(usage, price, billed_input + billed_cached + billed_output),
        input=billed_input / _PER,
        cached_input=billed_cached / _PER,
        output=billed_output / _PER,
    )


def worst_case_cost(input_tokens: int, output_cap: int, price: Price) -> Decimal:
    """The most a request can cost: all input uncached, the whole output cap used."""
    return cost(Usage(input_tokens=input_tokens, output_tokens=output_cap), price)


# ----------------------------------------------------------------------------------------
# Parsing

_FIELDS = ("input", "output", "cached_input", "cache_write", "per_1k_calls")


def usd_per_million(value: object) -> Decimal:
    """A price in USD per 1M tokens as YAML gives it; ValueError says what is wrong with it.

    str() first: YAML gives 0.075 as a float, and Decimal(str(0.075)) is exactly 0.075.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError(f"{value!r} is not a price (a number of USD per 1M tokens)")
    try:
        result = value if isinstance(value, Decimal) else Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a price (a number of USD per 1M tokens)") from None
    if not result.is_finite():
        raise ValueError(f"{value!r} is not a finite price")
    if result < 0:
        raise ValueError(f"{value!r} must be >= 0")
    return result


def _decimal(value: object, where: str) -> Decimal:
    try:
        return usd_per_million(value)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def parse_price(raw: Mapping[str, object] | Decimal | int | float | str, where: str) -> Price:
    """One price entry: a mapping {input, output, cached_input?, cache_write?}, or a single
    number that prices input and output alike (`local/*: 0`).

    Raises ValueError naming `where` (the key path) and the bad value.
    """
    if not isinstance(raw, Mapping):
        flat = _decimal(raw, where)
        return Price(input=flat, output=flat)
    unknown = sorted(str(k) for k in raw if k not in _FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(_FIELDS)}")
    missing = [k for k in ("input", "output") if raw.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing {' and '.join(missing)}")
    optional = {
        k: (None if raw.get(k) is None else _decimal(raw[k], f"{where}.{k}"))
        for k in ("cached_input", "cache_write")
    }
    calls = raw.get("per_1k_calls")
    fees: list[tuple[str, Decimal]] = []
    if calls is not None:
        if not isinstance(calls, Mapping):
            raise ValueError(
                f"{where}.per_1k_calls: {calls!r} must be a mapping of tool -> USD per 1000 calls "
                f"({', '.join(CALL_KINDS)})"
            )
        for kind, fee in calls.items():
            if kind not in CALL_KINDS:
                raise ValueError(f"{where}.per_1k_calls: unknown tool {kind!r}; allowed: {', '.join(CALL_KINDS)}")
            fees.append((str(kind), _decimal(fee, f"{where}.per_1k_calls.{kind}")))
    return Price(
        input=_decimal(raw["input"], f"{where}.input"),
        output=_decimal(raw["output"], f"{where}.output"),
        cached_input=optional["cached_input"],
        cache_write=optional["cache_write"],
        per_1k_calls=tuple(fees),
    )


# ----------------------------------------------------------------------------------------
# Lookup

_GLOB_CHARS = re.compile(r"[*?\[]")
# Snapshot suffixes: "-2024-07-18" (current) and "-0613" (gpt-4 / gpt-3.5 era).
_SNAPSHOT_SUFFIX = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True, slots=True)
class _Layer:
    exact: Mapping[str, Price]
    # Most specific first: longer patterns, then fewer wildcards, then by name for stability.
    globs: tuple[tuple[str, Price], ...]

    @classmethod
    def of(cls, entries: Mapping[str, Price]) -> _Layer:
        exact = {k: v for k, v in entries.items() if not _GLOB_CHARS.search(k)}
        globs = sorted(
            ((k, v) for k, v in entries.items() if _GLOB_CHARS.search(k)),
            key=lambda kv: (-len(kv[0]), len(_GLOB_CHARS.findall(kv[0])), kv[0]),
        )
        return cls(exact=exact, globs=tuple(globs))

    def lookup(self, names: tuple[str, ...]) -> Price | None:
        for name in names:
            if name in self.exact:
                return self.exact[name]
        for name in names:
            for pattern, price in self.globs:
                if fnmatch.fnmatchcase(name, pattern):
                    return price
        return None


_MEMO_MAX = 4096


class PriceTable:
    """Model -> Price. Entries are exact names or fnmatch globs (`local/*`, `gpt-4.1*`)."""

    __slots__ = ("_layers", "_memo")

    def __init__(self, entries: Mapping[str, Price]) -> None:
        self._layers: tuple[_Layer, ...] = (_Layer.of(dict(entries)),)
        self._memo: dict[str, Price | None] = {}

    @classmethod
    def _of_layers(cls, layers: tuple[_Layer, ...]) -> PriceTable:
        table = cls.__new__(cls)
        table._layers = layers
        table._memo = {}
        return table

    @classmethod
    def from_yaml_text(cls, text: str, source: str = "pricing") -> PriceTable:
        """Parse a pricing file; every bad entry is reported at once as a ConfigError."""
        try:
            data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from None
        if data is None:
            return cls({})
        if not isinstance(data, Mapping):
            raise ConfigError([f"expected a mapping of model -> price, got {type(data).__name__}"], source)
        entries: dict[str, Price] = {}
        problems: list[str] = []
        for key, raw in data.items():
            if not isinstance(key, str) or not key:
                problems.append(f"{key!r}: a model name or glob must be a non-empty string")
                continue
            try:
                entries[key] = parse_price(raw, key)
            except (ValueError, TypeError) as exc:
                problems.append(str(exc))
        if problems:
            raise ConfigError(problems, source)
        return cls(entries)

    @classmethod
    def shipped(cls) -> PriceTable:
        """The defaults shipped in proxy/data/pricing.yaml."""
        return _shipped()

    def merged(self, overrides: Mapping[str, Price]) -> PriceTable:
        """A table in which `overrides` (the user's YAML) are consulted before these entries."""
        return PriceTable._of_layers((_Layer.of(dict(overrides)), *self._layers))

    def lookup(self, model: str) -> Price | None:
        """The price for `model`, or None if nothing matches.

        Layer by layer, user overrides first: the exact name, then the name without a
        snapshot date ("gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"), then globs, most
        specific first. A user's glob therefore beats a shipped exact entry: whoever wrote
        `gpt-4o*` in their own file meant it for every gpt-4o model.
        """
        # A table never changes (a reload builds a new one), and a request looks its model
        # up several times (admission, the stream's usage.cost, settlement): remembered,
        # within a bound, since model names come from clients.
        try:
            return self._memo[model]
        except KeyError:
            pass
        price = self._lookup(model)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        self._memo[model] = price
        return price

    def _lookup(self, model: str) -> Price | None:
        names: tuple[str, ...] = (model,)
        undated = _SNAPSHOT_SUFFIX.sub("", model)
        if undated != model:
            names = (model, undated)
        for layer in self._layers:
            price = layer.lookup(names)
            if price is not None:
                return price
        return None


# The shipped table's date: a comment line, so the file stays a plain model -> price mapping.
_AS_OF = re.compile(r"^# prices-as-of: (\d{4}-\d{2}-\d{2})[ \t]*$", re.M)
# Prices change; past this age `tollgate check-config` says the shipped ones may be stale.
STALE_AFTER_DAYS = 90


def shipped_text() -> str:
    return importlib.resources.files("proxy").joinpath("data").joinpath("pricing.yaml").read_text("utf-8")


def shipped_prices_date() -> date:
    """The date the shipped prices were read (`# prices-as-of:` in proxy/data/pricing.yaml)."""
    found = _AS_OF.search(shipped_text())
    if found is None:
        raise ValueError("proxy/data/pricing.yaml has no '# prices-as-of: YYYY-MM-DD' line")
    return date.fromisoformat(found.group(1))


def stale_prices_warning(as_of: date, today: date) -> str | None:
    """What check-config prints when the shipped prices are over STALE_AFTER_DAYS old, else None."""
    age = (today - as_of).days
    if age <= STALE_AFTER_DAYS:
        return None
    return (
        f"warning: the shipped prices date from {as_of.isoformat()}, {age} days ago (over "
        f"{STALE_AFTER_DAYS}); OpenAI's prices may have changed since. Check them, and put the "
        "current ones under pricing.models (they win over the shipped table), or upgrade Tollgate."
    )


@functools.cache
def _shipped() -> PriceTable:
    return PriceTable.from_yaml_text(shipped_text(), source="proxy/data/pricing.yaml")


def price_of_exchange(prices: PriceTable, upstream_model: str | None, requested_model: str | None) -> Price | None:
    """The price of what the upstream runs; an alias's own entry if the real id has none."""
    model = upstream_model or requested_model or ""
    price = prices.lookup(model)
    if price is None and requested_model and requested_model != model:
        price = prices.lookup(requested_model)
    return price


def price_of_answer(
    prices: PriceTable,
    upstream_model: str | None,
    requested_model: str | None,
    response_model: str | None,
    azure_deployment: bool,
) -> Price | None:
    """The price a finished request is charged at: `price_of_exchange`, and for a request
    in Azure's deployment layout the model its response names. An Azure deployment is named
    by its owner ("prod-chat"); the response names the model behind it
    ("gpt-4o-2024-08-06"), which the price table knows. Only there: elsewhere the requested
    model is what the operator prices (or leaves unpriced)."""
    price = price_of_exchange(prices, upstream_model, requested_model)
    if price is None and response_model and azure_deployment:
        price = prices.lookup(response_model)
    return price

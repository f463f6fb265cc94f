"""proxy.pricing: exact Decimal costs, clamping, the price table and its lookup order."""

from __future__ import annotations

import os
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ConfigError
from proxy.pricing import Price, PriceTable, cost, cost_parts, parse_price, worst_case_cost
from proxy.usage import Usage

REPO = Path(__file__).resolve().parents[2]
D = Decimal

MINI = Price(input=D("0.15"), output=D("0.60"), cached_input=D("0.075"))


# --------------------------------------------------------------------------------------
# cost


def test_hand_computed_cost_splits_cached_input_and_keeps_reasoning_in_output() -> None:
    usage = Usage(input_tokens=1000, cached_input_tokens=400, output_tokens=200, reasoning_tokens=50)
    # 600 uncached x 0.15 + 400 cached x 0.075 + 200 output (50 of them reasoning) x 0.60
    # = 90 + 30 + 120 = 240 per 1M tokens.
    assert cost(usage, MINI) == D("0.00024")
    assert isinstance(cost(usage, MINI), Decimal)


def test_gpt5_nano_capture_costs() -> None:
    # The chat-basic capture: 8 prompt tokens, 377 completion tokens (320 of them reasoning).
    nano = Price(input=D("0.05"), output=D("0.40"), cached_input=D("0.005"))
    usage = Usage(input_tokens=8, output_tokens=377, reasoning_tokens=320)
    assert cost(usage, nano) == D("0.0001512")  # (8 x 0.05 + 377 x 0.40) / 1e6


def test_cached_and_cache_write_default_to_the_input_price() -> None:
    flat = Price(input=D("2"), output=D("8"))
    usage = Usage(input_tokens=100, cached_input_tokens=30, cache_write_tokens=20, output_tokens=10)
    assert cost(usage, flat) == D("0.00028")  # (100 x 2 + 10 x 8) / 1e6


def test_cache_write_has_its_own_price() -> None:
    price = Price(input=D("3"), output=D("15"), cached_input=D("0.30"), cache_write=D("3.75"))
    usage = Usage(input_tokens=1000, cached_input_tokens=500, cache_write_tokens=300, output_tokens=100)
    # 200 x 3 + 500 x 0.30 + 300 x 3.75 + 100 x 15 = 600 + 150 + 1125 + 1500 = 3375
    assert cost(usage, price) == D("0.003375")


def test_exactness_over_many_small_requests() -> None:
    one = cost(Usage(input_tokens=7, output_tokens=3), MINI)
    assert one == D("0.00000285")
    assert sum([one] * 1_000_000, D(0)) == D("2.85")


def test_zero_and_free() -> None:
    assert cost(Usage(), MINI) == 0
    assert cost(Usage(input_tokens=10**9, output_tokens=10**9), Price(input=D(0), output=D(0))) == 0


def test_odd_counts_are_clamped_never_negative_never_dropped() -> None:
    # cached > input: the parts are trusted, input is taken as their sum.
    assert cost(Usage(input_tokens=5, cached_input_tokens=10), MINI) == D("0.00000075")
    # reasoning > output: billed as 9 output tokens.
    assert cost(Usage(output_tokens=5, reasoning_tokens=9), MINI) == D("0.0000054")
    # negative counts read as zero.
    assert cost(Usage(input_tokens=-100, output_tokens=-5, cached_input_tokens=-3), MINI) == 0
    assert cost(Usage(input_tokens=10, cached_input_tokens=-3), MINI) == D("0.0000015")


def test_worst_case_cost_is_all_input_uncached_plus_full_output_cap() -> None:
    assert worst_case_cost(1000, 500, MINI) == D("0.00045")  # (1000 x 0.15 + 500 x 0.60) / 1e6
    assert worst_case_cost(1000, 500, MINI) >= cost(
        Usage(input_tokens=1000, cached_input_tokens=900, output_tokens=500), MINI
    )
    assert worst_case_cost(-1, -1, MINI) == 0


# --------------------------------------------------------------------------------------
# Price and parse_price


def test_price_refuses_floats_negatives_and_non_finite() -> None:
    with pytest.raises(TypeError):
        Price(input=0.15, output=D("1"))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Price(input=D("-1"), output=D("1"))
    with pytest.raises(ValueError):
        Price(input=D("1"), output=D("NaN"))
    with pytest.raises(ValueError):
        Price(input=D("1"), output=D("1"), cached_input=D("Infinity"))
    assert Price(input=2, output=8).input == D(2)  # type: ignore[arg-type]


def test_parse_price_mapping_is_exact() -> None:
    price = parse_price({"input": 0.15, "cached_input": 0.075, "output": "0.60"}, "prices.gpt-4o-mini")
    assert price == Price(input=D("0.15"), output=D("0.60"), cached_input=D("0.075"))
    assert str(price.cached_input) == "0.075"


def test_parse_price_scalar_shorthand() -> None:
    assert parse_price(0, "prices.local/*") == Price(input=D(0), output=D(0))  # type: ignore[arg-type]
    assert parse_price("1.5", "p") == Price(input=D("1.5"), output=D("1.5"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"input": -1, "output": 1}, r"prices\.m\.input.*-1"),
        ({"input": 1, "output": "lots"}, r"prices\.m\.output.*'lots'"),
        ({"input": 1, "output": True}, r"prices\.m\.output.*True"),
        ({"input": 1, "output": [1]}, r"prices\.m\.output.*\[1\]"),
        ({"input": 1, "output": "nan"}, r"prices\.m\.output.*'nan'"),
        ({"input": 1, "output": 2, "cached_input": -0.5}, r"prices\.m\.cached_input.*-0\.5"),
        ({"input": 1}, r"prices\.m: missing output"),
        ({"input": 1, "output": 2, "cache_input": 1}, r"prices\.m: unknown field.*cache_input"),
        (-3, r"prices\.m.*-3"),
        ("free", r"prices\.m.*'free'"),
        (None, r"prices\.m.*None"),
    ],
)
def test_parse_price_errors_name_where_and_the_value(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_price(raw, "prices.m")  # type: ignore[arg-type]


def test_from_yaml_text_reports_every_problem() -> None:
    text = """
good: {input: 1, output: 2}
bad-one: {input: -1, output: 2}
bad-two: {input: 1}
"local/*": 0
"""
    with pytest.raises(ConfigError) as info:
        PriceTable.from_yaml_text(text, source="my-prices.yaml")
    assert info.value.source == "my-prices.yaml"
    assert len(info.value.problems) == 2
    assert "bad-one.input" in info.value.problems[0]
    assert "bad-two: missing output" in info.value.problems[1]


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string", "a: [unclosed"])
def test_from_yaml_text_rejects_non_mappings(text: str) -> None:
    with pytest.raises(ConfigError):
        PriceTable.from_yaml_text(text)


def test_from_yaml_text_empty_is_an_empty_table() -> None:
    assert PriceTable.from_yaml_text("").lookup("gpt-4o") is None
    assert PriceTable.from_yaml_text("# only comments\n").lookup("gpt-4o") is None


# --------------------------------------------------------------------------------------
# Lookup


def p(value: str) -> Price:
    return Price(input=D(value), output=D(value))


def test_lookup_exact_dated_and_glob() -> None:
    table = PriceTable({
        "gpt-4o-mini": p("1"),
        "gpt-4o-2024-05-13": p("2"),
        "gpt-4o": p("3"),
        "gpt-4*": p("4"),
        "gpt-4.1*": p("5"),
        "local/*": p("0"),
        "gpt-4": p("6"),
    })
    assert table.lookup("gpt-4o-mini") == p("1")
    assert table.lookup("gpt-4o-mini-2024-07-18") == p("1")   # snapshot date stripped
    assert table.lookup("gpt-4o-2024-05-13") == p("2")        # an exact snapshot beats stripping
    assert table.lookup("gpt-4o-2024-08-06") == p("3")
    assert table.lookup("gpt-4-0613") == p("6")               # gpt-4 era -MMDD snapshots
    assert table.lookup("gpt-4.1-nano") == p("5")             # longest glob first
    assert table.lookup("gpt-4-turbo") == p("4")
    assert table.lookup("local/llama-3.1-8b") == p("0")
    assert table.lookup("claude-3") is None
    assert table.lookup("") is None


def test_glob_order_is_independent_of_insertion_order() -> None:
    a = PriceTable({"gpt-*": p("1"), "gpt-4*": p("2"), "gpt-4.1-m*": p("3")})
    b = PriceTable({"gpt-4.1-m*": p("3"), "gpt-4*": p("2"), "gpt-*": p("1")})
    for model in ("gpt-4.1-mini", "gpt-4o", "gpt-5"):
        assert a.lookup(model) == b.lookup(model)
    assert a.lookup("gpt-4.1-mini") == p("3")
    assert a.lookup("gpt-5") == p("1")


def test_user_overrides_win() -> None:
    shipped = PriceTable({"gpt-4o-mini": p("1"), "gpt-4o": p("2"), "o3": p("3")})
    table = shipped.merged({"gpt-4o-mini": p("10"), "o*": p("30"), "local/*": p("0")})
    assert table.lookup("gpt-4o-mini") == p("10")             # same key: user wins
    assert table.lookup("gpt-4o-mini-2024-07-18") == p("10")
    assert table.lookup("o3") == p("30")                      # user's glob beats a shipped exact name
    assert table.lookup("gpt-4o") == p("2")                   # untouched entries remain
    assert table.lookup("local/qwen") == p("0")
    assert shipped.lookup("o3") == p("3")                     # merged() does not mutate
    again = table.merged({"o3": p("300")})
    assert again.lookup("o3") == p("300") and again.lookup("o1") == p("30")


def test_shipped_table_prices_the_current_models() -> None:
    table = PriceTable.shipped()
    for model in ("gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano",
                  "gpt-4o", "gpt-4o-mini", "o1", "o3", "o3-mini", "o4-mini", "text-embedding-3-small",
                  "text-embedding-3-large", "text-embedding-ada-002", "gpt-3.5-turbo-instruct", "babbage-002"):
        price = table.lookup(model)
        assert price is not None, model
        assert price.input > 0
    assert table.lookup("gpt-5-nano-2025-08-07") == Price(input=D("0.05"), output=D("0.40"), cached_input=D("0.005"))
    assert table.lookup("text-embedding-3-small") == Price(input=D("0.02"), output=D(0))
    assert table.lookup("local/anything") is None  # the local/* entry is only an example


def test_config_pricing_yaml_is_the_shipped_file() -> None:
    link = REPO / "config" / "pricing.yaml"
    assert link.is_symlink()
    assert os.readlink(link) == "../proxy/data/pricing.yaml"
    assert link.resolve() == (REPO / "proxy" / "data" / "pricing.yaml").resolve()
    table = PriceTable.from_yaml_text(link.read_text())
    assert table.lookup("gpt-4o") == PriceTable.shipped().lookup("gpt-4o")


# --------------------------------------------------------------------------------------
# Properties

counts = st.integers(min_value=-(10**6), max_value=10**9)
amounts = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
prices = st.builds(Price, input=amounts, output=amounts, cached_input=st.none() | amounts,
                   cache_write=st.none() | amounts)
usages = st.builds(Usage, input_tokens=counts, output_tokens=counts, cached_input_tokens=counts,
                   reasoning_tokens=counts, cache_write_tokens=counts)


@settings(max_examples=300, deadline=None)
@given(usage=usages, price=prices)
def test_cost_is_never_negative(usage: Usage, price: Price) -> None:
    assert cost(usage, price) >= 0


@settings(max_examples=300, deadline=None)
@given(usage=usages, price=prices, more=st.integers(min_value=0, max_value=10**6),
       field=st.sampled_from(["input_tokens", "output_tokens", "reasoning_tokens"]))
def test_cost_is_monotone_in_each_total(usage: Usage, price: Price, more: int, field: str) -> None:
    bigger = replace(usage, **{field: getattr(usage, field) + more})
    assert cost(bigger, price) >= cost(usage, price)


@settings(max_examples=300, deadline=None)
@given(usage=usages, price=prices, more=st.integers(min_value=0, max_value=10**6),
       kind=st.sampled_from(["uncached", "cached", "cache_write", "output", "reasoning"]))
def test_adding_tokens_of_any_kind_never_lowers_cost(usage: Usage, price: Price, more: int, kind: str) -> None:
    u = usage
    bigger = {
        "uncached": replace(u, input_tokens=u.input_tokens + more),
        "cached": replace(u, input_tokens=u.input_tokens + more, cached_input_tokens=u.cached_input_tokens + more),
        "cache_write": replace(u, input_tokens=u.input_tokens + more, cache_write_tokens=u.cache_write_tokens + more),
        "output": replace(u, output_tokens=u.output_tokens + more),
        "reasoning": replace(u, output_tokens=u.output_tokens + more, reasoning_tokens=u.reasoning_tokens + more),
    }[kind]
    assert cost(bigger, price) >= cost(u, price)


@settings(max_examples=200, deadline=None)
@given(input_tokens=counts, output_cap=counts, cached=counts, price=prices)
def test_worst_case_bounds_any_actual_use_within_it(input_tokens: int, output_cap: int, cached: int, price: Price) -> None:
    # Actual use within the reservation: same input (any part cached, if caching is not
    # dearer than fresh input), no more output than the cap.
    if price.cached_input is not None and price.cached_input > price.input:
        price = Price(input=price.input, output=price.output)
    n_in, n_out = max(input_tokens, 0), max(output_cap, 0)
    actual = Usage(input_tokens=n_in, cached_input_tokens=min(max(cached, 0), n_in), output_tokens=n_out // 2)
    assert worst_case_cost(input_tokens, output_cap, price) >= cost(actual, price)


@given(usage=usages, price=prices)
def test_cost_parts_add_up_to_the_cost_without_call_fees(usage: Usage, price: Price) -> None:
    """The parts the client sees (headers, usage.cost) come from the same arithmetic as the
    total: with no per-call fee they sum to it exactly, and none is negative."""
    parts = cost_parts(usage, price)
    assert parts.total == cost(usage, price)
    assert parts.input + parts.cached_input + parts.output == parts.total
    assert min(parts.input, parts.cached_input, parts.output) >= 0


def test_the_shipped_table_carries_its_date() -> None:
    from datetime import date

    from proxy.pricing import shipped_prices_date

    as_of = shipped_prices_date()
    assert isinstance(as_of, date) and as_of.year >= 2025  # parsed; never compared with the clock here


def test_stale_prices_warn_after_90_days_counted_from_today() -> None:
    # Dates built from the real today, so this holds on any date the suite runs.
    from datetime import UTC, datetime, timedelta

    from proxy.pricing import STALE_AFTER_DAYS, stale_prices_warning

    today = datetime.now(UTC).date()
    assert STALE_AFTER_DAYS == 90
    assert stale_prices_warning(today, today) is None
    assert stale_prices_warning(today - timedelta(days=90), today) is None
    old = today - timedelta(days=91)
    warning = stale_prices_warning(old, today)
    assert warning is not None and old.isoformat() in warning and "91 days ago" in warning
    assert "pricing.models" in warning


def test_check_config_warns_on_stale_shipped_prices_by_the_real_clock(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime, timedelta

    import proxy.pricing
    from proxy.__main__ import main

    today = datetime.now(UTC).date()
    config = str(REPO / "config" / "tollgate.yaml")
    monkeypatch.setattr(proxy.pricing, "shipped_prices_date", lambda: today - timedelta(days=200))
    assert main(["check-config", config]) == 0
    out, err = capsys.readouterr()
    assert ": ok (" in out and "200 days ago" in err
    monkeypatch.setattr(proxy.pricing, "shipped_prices_date", lambda: today - timedelta(days=3))
    assert main(["check-config", config]) == 0
    out, err = capsys.readouterr()
    assert ": ok (" in out and err == ""

"""The pure parts of rate limits: GCRA arithmetic (property-tested), the headers, the
`limits:` config and the checks a request resolves it into."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config_file import parse_settings
from proxy.errors import ConfigError
from proxy.ratelimit import gcra
from proxy.ratelimit.rules import LimitRule, checks_for
from proxy.spend.rules import BudgetScope
from proxy.throttle import ratelimit_headers

limits_st = st.integers(min_value=1, max_value=1_000_000_000)


@given(limit=limits_st, debt_units=st.integers(0, 2_000_000_000), cost=st.integers(0, 1_000_000_000))
def test_wait_is_the_exact_moment_the_cost_fits(limit: int, debt_units: int, cost: int) -> None:
    debt = min(debt_units * gcra.SCALE, (limit + cost) * gcra.SCALE)
    wait = gcra.wait_ms(debt, cost, limit)
    if cost > limit:
        assert wait is None
        assert not gcra.fits(0, cost, limit)  # not even an empty bucket holds it
        return
    assert wait is not None
    assert gcra.fits(gcra.drained(debt, 0, wait, limit), cost, limit)
    if wait > 0:
        assert not gcra.fits(gcra.drained(debt, 0, wait - 1, limit), cost, limit)
        # Retry-After: whole seconds, never before it fits.
        assert gcra.retry_after_s(wait) * 1000 >= wait


@settings(max_examples=200)
@given(
    limit=st.integers(1, 600),
    arrivals=st.lists(st.tuples(st.integers(0, 30_000), st.integers(0, 50)), min_size=1, max_size=60),
)
def test_no_interval_admits_more_than_the_burst_plus_its_refill(limit: int, arrivals: list[tuple[int, int]]) -> None:
    """Simulate a counter over a sequence of requests (gap ms, cost): within any stretch of
    admissions, the units admitted never exceed limit + elapsed x limit / 1 minute."""
    debt, at, t = 0, 0, 0
    admitted: list[tuple[int, int]] = []
    for gap, cost in arrivals:
        t += gap
        now_debt = gcra.drained(debt, at, t, limit)
        if gcra.fits(now_debt, cost, limit):
            debt, at = now_debt + cost * gcra.SCALE, t
            admitted.append((t, cost))
    for i in range(len(admitted)):
        total = 0
        for j in range(i, len(admitted)):
            total += admitted[j][1]
            elapsed = admitted[j][0] - admitted[i][0]
            assert total * gcra.SCALE <= limit * gcra.SCALE + elapsed * limit


@given(limit=limits_st, debt=st.integers(0, 10**14), delta=st.integers(-(10**9), 10**9))
def test_correction_never_goes_below_empty_and_remaining_is_bounded(limit: int, debt: int, delta: int) -> None:
    fixed = gcra.corrected(debt, delta)
    assert fixed >= 0 and (fixed == 0 or fixed == debt + delta * gcra.SCALE)
    assert 0 <= gcra.remaining(debt, limit) <= limit
    assert gcra.drained(debt, 0, gcra.reset_ms(debt, limit), limit) == 0


def test_a_clock_that_steps_back_drains_nothing() -> None:
    assert gcra.drained(5 * gcra.SCALE, 1000, 900, 60) == 5 * gcra.SCALE


@pytest.mark.parametrize(
    ("ms", "text"),
    [(0, "0s"), (-5, "0s"), (250, "250ms"), (1000, "1s"), (1500, "1.5s"), (20_000, "20s"),
     (60_000, "1m0s"), (360_000, "6m0s"), (90_250, "1m30.25s"), (3_723_000, "1h2m3s")],
)
def test_durations_read_like_openais(ms: int, text: str) -> None:
    assert gcra.duration_text(ms) == text


def test_headers_report_the_tightest_counter_of_each_kind() -> None:
    rules = (
        LimitRule(name="wide", requests_per_minute=100, tokens_per_minute=1000),
        LimitRule(name="narrow", scope=BudgetScope(user="*"), requests_per_minute=10),
    )
    checks = checks_for(rules, None, "alice", "gpt-4o", None)
    assert [c.id for c in checks] == ["wide|requests", "wide|tokens", "narrow|requests|user=alice"]
    headers = ratelimit_headers(checks, [1 * gcra.SCALE, 300 * gcra.SCALE, 9 * gcra.SCALE])
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "54s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "18s",
    }


def test_scopes_match_as_budgets_do() -> None:
    rules = (
        LimitRule(name="k", scope=BudgetScope(key="alpha"), max_in_flight=2),
        LimitRule(name="t", scope=BudgetScope(team="*", model="gpt-4o*"), requests_per_minute=5),
    )
    assert checks_for(rules, "beta", None, "gpt-4o", None) == []
    assert [c.id for c in checks_for(rules, "alpha", None, "gpt-4o-mini", "red|x")] == [
        "k|in_flight|key=alpha", "t|requests|team=red%7Cx",
    ]
    assert checks_for(rules, "alpha", None, "o3", "red")[0].describe() == "'k' (key alpha)"


def _config(limits: str, keys: str = "") -> str:
    return f"""
upstreams:
  openai: {{base_url: "http://127.0.0.1:9/v1"}}
default_upstream: openai
{keys}
limits:
{limits}
"""


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ("  - {name: a}", "limits[0]: "),
        ("  - {name: a, requests_per_minute: 0}", "limits[0].requests_per_minute: 0"),
        ("  - {name: a, tokens_per_minute: 2000000000}", "limits[0].tokens_per_minute: 2000000000"),
        ("  - {name: a, max_in_flight: -1}", "limits[0].max_in_flight: -1"),
        ("  - {name: 'a b', max_in_flight: 1}", "limits[0].name: 'a b'"),
        ("  - {name: a, max_in_flight: 1, burst: 3}", "limits[0].burst"),
        ("  - {name: a, max_in_flight: 1}\n  - {name: a, max_in_flight: 2}", "used twice"),
        ("  - {name: a, max_in_flight: 1, scope: {key: ghost}}", "limits[0].scope.key: 'ghost'"),
        ("  - {name: a, max_in_flight: 1, scope: {team: red}}", "limits[0].scope.team: 'red'"),
    ],
)
def test_bad_limits_name_the_key_and_value(limits: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings(_config(limits), env={})
    assert problem in str(err.value)


def test_a_valid_limits_section() -> None:
    keys = "keys:\n  - {name: alpha, key_sha256: " + "a" * 64 + ", metadata: {team: red}}"
    parsed = parse_settings(
        _config("  - {name: a, scope: {key: alpha, team: red}, requests_per_minute: 60, max_in_flight: 4}", keys),
        env={},
    )
    rule: Any = parsed.limits[0]
    assert (rule.requests_per_minute, rule.tokens_per_minute, rule.max_in_flight) == (60, None, 4)

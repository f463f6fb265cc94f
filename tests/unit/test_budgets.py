from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from proxy.spend.budgets import (
    EPOCH,
    HEADER_CLAMPED,
    HEADER_NAME,
    HEADER_REMAINING,
    HEADER_RESET,
    IN_FLIGHT_RETRY_AFTER_S,
    BucketState,
    BudgetRule,
    BudgetRules,
    ClampInput,
    LedgerSettings,
    WebhookSettings,
    admit,
    bucket_for,
    buckets_for,
    budget_headers,
    clamp_header,
    format_usd,
    from_nanos,
    quantize_up,
    refusal_message,
    spend_nanos,
    threshold_crossed,
    to_nanos,
    webhook_payload,
    window,
)

UTC = UTC
D = Decimal


def at(*args: int, tz: Any = UTC) -> datetime:
    return datetime(*args, tzinfo=tz)


def rule(**kw: Any) -> BudgetRule:
    base: dict[str, Any] = {"name": "r", "period": "daily", "limit_usd": "1"}
    base.update(kw)
    return BudgetRule.model_validate(base)


# --- windows -----------------------------------------------------------------------------


def test_hourly_window_utc() -> None:
    assert window("hourly", at(2026, 11, 23, 15, 42, 7)) == (at(2026, 11, 23, 15), at(2026, 11, 23, 16))
    assert window("hourly", at(2026, 12, 31, 23, 59, 59)) == (at(2026, 12, 31, 23), at(2027, 1, 1))


def test_daily_window_and_the_exact_boundary() -> None:
    assert window("daily", at(2026, 11, 23, 0, 0, 0)) == (at(2026, 11, 23), at(2026, 11, 24))
    assert window("daily", at(2026, 11, 23, 23, 59, 59, 999999)) == (at(2026, 11, 23), at(2026, 11, 24))


def test_weekly_window_starts_monday() -> None:
    monday, next_monday = at(2026, 11, 23), at(2026, 11, 30)
    assert monday.weekday() == 0
    assert window("weekly", monday) == (monday, next_monday)
    assert window("weekly", at(2026, 11, 29, 23, 59)) == (monday, next_monday)  # Sunday night
    assert window("weekly", next_monday) == (next_monday, at(2026, 12, 7))
    # A week across the year end.
    assert window("weekly", at(2027, 1, 1, 12)) == (at(2026, 12, 28), at(2027, 1, 4))


def test_monthly_window_month_and_year_ends() -> None:
    assert window("monthly", at(2026, 11, 30, 23, 59)) == (at(2026, 11, 1), at(2026, 12, 1))
    assert window("monthly", at(2026, 12, 31, 23, 59)) == (at(2026, 12, 1), at(2027, 1, 1))
    assert window("monthly", at(2028, 2, 29, 12)) == (at(2028, 2, 1), at(2028, 3, 1))


def test_total_window_has_no_end() -> None:
    assert window("total", at(2026, 11, 23, 5)) == (EPOCH, None)


def test_non_utc_daily_window_follows_local_midnight_across_dst() -> None:
    # Europe/Berlin springs forward on 2026-03-29: that day is 23 hours long.
    start, end = window("daily", at(2026, 3, 29, 12), "Europe/Berlin")
    assert start == at(2026, 3, 28, 23) and end == at(2026, 3, 29, 22)
    assert end - start == timedelta(hours=23)
    # 23:30 UTC on the 28th is already the 29th in Berlin.
    assert window("daily", at(2026, 3, 28, 23, 30), "Europe/Berlin")[0] == start


def test_non_utc_monthly_and_weekly_windows() -> None:
    ny = "America/New_York"
    start, end = window("monthly", at(2026, 12, 1, 3), ny)  # still Nov 30 in New York
    assert (start, end) == (at(2026, 11, 1, 4), at(2026, 12, 1, 5))  # EDT then EST
    wstart, wend = window("weekly", at(2026, 11, 23, 3), ny)  # Sunday evening locally
    assert (wstart, wend) == (at(2026, 11, 16, 5), at(2026, 11, 23, 5))


def test_hourly_window_in_a_half_hour_zone() -> None:
    assert window("hourly", at(2026, 11, 23, 10, 15), "Asia/Kolkata") == (
        at(2026, 11, 23, 9, 30), at(2026, 11, 23, 10, 30)
    )


def test_window_needs_an_aware_clock() -> None:
    with pytest.raises(ValueError):
        window("daily", datetime(2026, 11, 23))


def test_window_result_is_in_utc_whatever_the_input_zone() -> None:
    start, _ = window("daily", at(2026, 11, 23, 12).astimezone(timezone(timedelta(hours=9))))
    assert start.utcoffset() == timedelta(0) and start == at(2026, 11, 23)


# --- buckets -----------------------------------------------------------------------------

NOW = at(2026, 11, 23, 15, 30)


def test_global_rule_applies_to_everyone() -> None:
    (b,) = buckets_for([rule(name="global")], None, None, None, NOW)
    assert b.id == "global|2026-11-23T00:00:00+00:00"
    assert (b.start, b.end, b.key, b.user) == (at(2026, 11, 23), at(2026, 11, 24), None, None)


def test_per_user_template_makes_one_bucket_per_user() -> None:
    r = rule(name="daily-per-user", scope={"user": "*"}, limit_usd="5")
    (alice,) = buckets_for([r], None, "alice", "gpt-4o", NOW)
    (bob,) = buckets_for([r], None, "bob", "gpt-4o", NOW)
    assert alice.id == "daily-per-user|user=alice|2026-11-23T00:00:00+00:00"
    assert bob.id != alice.id and bob.user == "bob"
    assert buckets_for([r], None, None, "gpt-4o", NOW) == []  # no user, no template bucket


def test_fixed_scopes_and_combinations() -> None:
    rules = [
        rule(name="team-a", scope={"key": "team-a"}),
        rule(name="each-key", scope={"key": "*"}),
        rule(name="carol", scope={"user": "carol"}),
        rule(name="gpt4", scope={"model": "gpt-4o*"}),
        rule(name="team-a-users-gpt4", scope={"key": "team-a", "user": "*", "model": "gpt-4o*"}),
    ]

    def names(key: str | None, user: str | None, model: str | None) -> list[str]:
        return [b.name for b in buckets_for(rules, key, user, model, NOW)]

    assert names("team-a", "carol", "gpt-4o-mini") == [r.name for r in rules]
    assert names("team-b", "carol", "gpt-4o") == ["each-key", "carol", "gpt4"]
    assert names("team-a", "dave", "o3") == ["team-a", "each-key"]
    assert names(None, None, None) == []
    (combo,) = [b for b in buckets_for(rules, "team-a", "dave", "gpt-4o", NOW) if b.name == "team-a-users-gpt4"]
    assert combo.id == "team-a-users-gpt4|key=team-a|user=dave|2026-11-23T00:00:00+00:00"
    assert combo.describe() == "'team-a-users-gpt4' (key team-a, user dave, model gpt-4o*)"


def test_bucket_ids_cannot_be_forged_by_user_strings() -> None:
    r = rule(name="u", scope={"user": "*"})
    forged = bucket_for(r, None, "a|2026-11-23T00:00:00+00:00", None, NOW)
    plain = bucket_for(r, None, "a", None, NOW)
    assert forged is not None and plain is not None
    assert forged.id == "u|user=a%7C2026-11-23T00:00:00+00:00|2026-11-23T00:00:00+00:00"
    assert forged.id != plain.id


def test_buckets_roll_over_with_the_clock() -> None:
    r = rule(name="h", period="hourly")
    a = bucket_for(r, None, None, None, at(2026, 11, 23, 15, 59, 59))
    b = bucket_for(r, None, None, None, at(2026, 11, 23, 16, 0, 0))
    assert a is not None and b is not None and a.id != b.id and a.end == b.start


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "loc", "text"),
    [
        ({"period": "fortnightly"}, ("period",), "hourly"),
        ({"limit_usd": "-1"}, ("limit_usd",), "greater than or equal"),
        ({"scope": {"group": "x"}}, ("scope", "group"), "Extra inputs"),
        ({"scope": {"team": ""}}, ("scope", "team"), "must not be empty"),
        ({"timezone": "Mars/Olympus"}, ("timezone",), "unknown IANA"),
        ({"thresholds": [0.5, 1.5]}, ("thresholds", 1), "less than or equal"),
        ({"thresholds": [0]}, ("thresholds", 0), "greater than"),
        ({"name": "has space"}, ("name",), "budget names"),
        ({"limit_usd": "0.0000000001"}, ("limit_usd",), "9 decimal places"),
        ({"limit_usd": None}, (), "at least one of"),
        ({"action": "warn", "on_exceed": "clamp"}, (), "clamp only"),
        ({"scope": {"user": ""}}, ("scope", "user"), "must not be empty"),
    ],
)
def test_rule_validation_names_the_path(data: dict[str, Any], loc: tuple[Any, ...], text: str) -> None:
    with pytest.raises(ValidationError) as err:
        rule(**data)
    first = err.value.errors()[0]
    assert tuple(first["loc"]) == loc
    assert text in first["msg"]


def test_rule_defaults_and_coercions() -> None:
    r = rule(limit_usd=5.1, thresholds=[1.0, 0.5, 0.5])
    assert r.limit_usd == D("5.1") and r.action == "block" and r.on_exceed == "refuse"
    assert r.thresholds == (0.5, 1.0) and r.min_output_tokens == 16 and r.timezone == "UTC"
    assert rule(limit_usd=None, limit_tokens=1000).limit_usd is None


def test_rule_names_are_unique() -> None:
    adapter = TypeAdapter(BudgetRules)
    assert len(adapter.validate_python([{"name": "a", "period": "daily", "limit_usd": 1}])) == 1
    with pytest.raises(ValidationError, match="used twice"):
        adapter.validate_python([{"name": "a", "period": "daily", "limit_usd": 1}] * 2)


def test_ledger_and_webhook_settings() -> None:
    s = LedgerSettings()
    assert (s.backend, s.path, s.lease_seconds, s.key_prefix) == ("sqlite", "./data/tollgate.db", 900.0, "tollgate")
    with pytest.raises(ValidationError, match="redis_url is required"):
        LedgerSettings(backend="redis")
    assert LedgerSettings(backend="redis", redis_url="redis://127.0.0.1:6379/0").redis_url
    with pytest.raises(ValidationError):
        LedgerSettings.model_validate({"backend": "postgres"})
    with pytest.raises(ValidationError):
        LedgerSettings.model_validate({"lease_seconds": 0})
    assert WebhookSettings().url is None
    with pytest.raises(ValidationError):
        WebhookSettings(url="ftp://x")


# --- money ---------------------------------------------------------------------------------


def test_nano_usd_units() -> None:
    assert to_nanos(D("1")) == 10**9 and from_nanos(27_000_000) == D("0.027")
    assert to_nanos(D("0.0000000001")) == 1  # reservations round up
    assert spend_nanos(D("0.0000000005")) == 0 and spend_nanos(D("0.0000000015")) == 2  # half-even
    assert quantize_up(D("1") / 3) == D("0.333333334")
    assert from_nanos(to_nanos(D("123.456789012"))) == D("123.456789012")


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        ("0", "$0.00"), ("5", "$5.00"), ("4.98", "$4.98"), ("0.027", "$0.027"),
        ("0.00015", "$0.00015"), ("12.3456789", "$12.345679"),
    ],
)
def test_format_usd(amount: str, text: str) -> None:
    assert format_usd(D(amount)) == text


# --- admission -----------------------------------------------------------------------------


def _one(r: BudgetRule, user: str | None = None) -> Any:
    b = bucket_for(r, None, user, None, NOW)
    assert b is not None
    return b


def test_admit_allows_up_to_the_limit_exactly() -> None:
    b = _one(rule(limit_usd="1"))
    assert admit([b], {b.id: BucketState(spent=D("0.5"), reserved=D("0.25"))}, D("0.25")).admitted
    d = admit([b], {b.id: BucketState(spent=D("0.5"), reserved=D("0.25"))}, D("0.250000001"))
    assert not d.admitted and d.refused == b and d.reason == "usd"
    assert d.refused_state == BucketState(spent=D("0.5"), reserved=D("0.25"))


def test_admit_is_all_or_nothing_across_buckets() -> None:
    roomy, tight = _one(rule(name="roomy", limit_usd="10")), _one(rule(name="tight", limit_usd="1"))
    d = admit([roomy, tight], {tight.id: BucketState(spent=D("0.9"))}, D("0.2"))
    assert not d.admitted and d.refused == tight


def test_admit_missing_state_means_empty() -> None:
    b = _one(rule(limit_usd="1"))
    assert admit([b], {}, D("1")).admitted and not admit([b], {}, D("1.01")).admitted


def test_admit_token_and_request_limits() -> None:
    tok = _one(rule(name="tok", limit_usd=None, limit_tokens=1000))
    req = _one(rule(name="req", limit_usd=None, limit_requests=3))
    states = {
        tok.id: BucketState(tokens=600, reserved_tokens=300),
        req.id: BucketState(requests=2, reserved_requests=0),
    }
    assert admit([tok, req], states, D("0"), tokens=100).admitted
    d = admit([tok, req], states, D("0"), tokens=101)
    assert (d.admitted, d.refused, d.reason) == (False, tok, "tokens")
    states[req.id] = BucketState(requests=2, reserved_requests=1)
    d = admit([tok, req], states, D("0"), tokens=1)
    assert (d.admitted, d.refused, d.reason) == (False, req, "requests")


def test_warn_budgets_never_refuse_but_report_crossings() -> None:
    w = _one(rule(name="soft", action="warn", limit_usd="10", thresholds=[0.5, 0.8, 1.0]))
    d = admit([w], {w.id: BucketState(spent=D("4"), reserved=D("0.5"))}, D("4"))
    assert d.admitted and [c.threshold for c in d.crossings] == [0.5, 0.8]
    assert d.crossings[0].used == D("8.5") and d.soft_exceeded == ()
    d = admit([w], {w.id: BucketState(spent=D("9.9"))}, D("5"))
    assert d.admitted and [c.threshold for c in d.crossings] == [1.0] and d.soft_exceeded == (w,)


def _clamp_rule(**kw: Any) -> BudgetRule:
    return rule(**{"name": "clampy", "on_exceed": "clamp", "limit_usd": "1", **kw})


def test_clamp_lowers_the_output_cap_to_what_fits() -> None:
    b = _one(_clamp_rule())
    price = D("0.00001")  # $10 per 1M output tokens
    c = ClampInput(input_cost=D("0.05"), input_tokens=1000, output_cap=4096, output_price=price)
    worst = c.input_cost + c.output_cap * price  # 0.09096
    state = {b.id: BucketState(spent=D("0.9"))}
    d = admit([b], state, worst, tokens=1000 + 4096, clamp=c)
    # room 0.1 - input 0.05 = 0.05 -> 5000 tokens fit: no clamp needed at all.
    assert d.admitted and not d.clamped and d.output_cap == 4096
    state = {b.id: BucketState(spent=D("0.92"), reserved=D("0.01"))}
    d = admit([b], state, worst, tokens=1000 + 4096, clamp=c)
    # room 0.07 - 0.05 = 0.02 -> 2000 output tokens.
    assert d.admitted and d.clamped and d.clamped_by == b
    assert (d.output_cap, d.amount, d.tokens) == (2000, D("0.07"), 3000)
    assert clamp_header(d) == {HEADER_CLAMPED: "max_tokens=2000; budget=clampy"}


def test_clamp_divides_the_room_between_every_output() -> None:
    """With n = 4 choices, each token of the cap is paid four times, money and tokens."""
    b = _one(_clamp_rule())
    price = D("0.00001")
    c = ClampInput(input_cost=D("0.05"), input_tokens=1000, output_cap=4096, output_price=price, outputs=4)
    worst = c.input_cost + c.output_cap * 4 * price
    state = {b.id: BucketState(spent=D("0.92"), reserved=D("0.01"))}
    d = admit([b], state, worst, tokens=1000 + 4096 * 4, clamp=c)
    # room 0.07 - 0.05 = 0.02 -> 2000 output tokens in all, 500 per choice.
    assert d.admitted and d.clamped
    assert (d.output_cap, d.amount, d.tokens) == (500, D("0.07"), 3000)
    tokeny = _one(rule(name="tokeny", limit_usd=None, limit_tokens=3003, on_exceed="clamp"))
    d = admit([tokeny], {}, worst, tokens=1000 + 4096 * 4, clamp=c)
    assert d.admitted and (d.output_cap, d.tokens) == (500, 3000)  # 2003 // 4 per choice


def test_clamp_refuses_below_the_minimum_output() -> None:
    b = _one(_clamp_rule(min_output_tokens=100))
    c = ClampInput(input_cost=D("0.05"), input_tokens=10, output_cap=4096, output_price=D("0.00001"))
    # room for 99 output tokens exactly.
    d = admit([b], {b.id: BucketState(spent=D("0.94901"))}, D("0.09096"), clamp=c)
    assert not d.admitted and d.refused == b and clamp_header(d) == {}
    d = admit([b], {b.id: BucketState(spent=D("0.949"))}, D("0.09096"), clamp=c)
    assert d.admitted and d.output_cap == 100


def test_clamp_respects_every_block_bucket_and_token_limits() -> None:
    clampy = _one(_clamp_rule())
    tokeny = _one(rule(name="tokeny", limit_usd=None, limit_tokens=2500))
    c = ClampInput(input_cost=D("0.01"), input_tokens=1000, output_cap=4096, output_price=D("0.00001"))
    states = {clampy.id: BucketState(spent=D("0.95")), tokeny.id: BucketState(tokens=0)}
    # The USD bucket allows 4000 tokens, but the token bucket (refuse mode) refuses: no clamp.
    d = admit([clampy, tokeny], states, D("0.05096"), tokens=5096, clamp=c)
    assert not d.admitted
    both = _one(_clamp_rule(name="both", limit_usd="1", limit_tokens=2500))
    d = admit([both], {both.id: BucketState(spent=D("0.95"))}, D("0.05096"), tokens=5096, clamp=c)
    assert d.admitted and d.output_cap == 1500 and d.tokens == 2500


def test_clamp_never_applies_to_refuse_buckets_or_request_limits() -> None:
    b = _one(rule(name="plain", limit_usd="1"))
    c = ClampInput(input_cost=D("0"), input_tokens=0, output_cap=1000, output_price=D("0.001"))
    assert not admit([b], {b.id: BucketState(spent=D("0.5"))}, D("1"), clamp=c).admitted
    r = _one(_clamp_rule(limit_requests=1))
    d = admit([r], {r.id: BucketState(requests=1)}, D("0"), clamp=c)
    assert not d.admitted and d.reason == "requests"


def test_clamp_with_free_output_only_needs_the_input_to_fit() -> None:
    b = _one(_clamp_rule())
    free = ClampInput(input_cost=D("0.2"), input_tokens=10, output_cap=500, output_price=D("0"))
    assert admit([b], {b.id: BucketState(spent=D("0.9"))}, D("0.2"), clamp=free).refused == b
    d = admit([b], {b.id: BucketState(spent=D("0.7"))}, D("0.2"), clamp=free)
    assert d.admitted and d.output_cap == 500


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(min_value=0, max_value=10**6),
    amounts=st.lists(st.integers(min_value=0, max_value=10**5), min_size=1, max_size=60),
)
def test_admitting_in_sequence_never_overspends(limit: int, amounts: list[int]) -> None:
    # Amounts in micro-dollars. Whatever arrives, admitted reservations stay within the
    # limit, and a refusal happens only when the amount truly did not fit.
    b = _one(rule(limit_usd=from_nanos(limit * 1000)))
    reserved = D(0)
    for a in amounts:
        amount = from_nanos(a * 1000)
        d = admit([b], {b.id: BucketState(reserved=reserved)}, amount)
        if d.admitted:
            reserved += d.amount
        else:
            assert reserved + amount > b.limit_usd  # type: ignore[operator]
        assert reserved <= b.limit_usd  # type: ignore[operator]


def test_threshold_crossed() -> None:
    th = (0.5, 0.8, 1.0)
    assert threshold_crossed(D("0"), D("4.99"), D("10"), th) == []
    assert threshold_crossed(D("0"), D("5"), D("10"), th) == [0.5]
    assert threshold_crossed(D("5"), D("8"), D("10"), th) == [0.8]  # 0.5 already behind
    assert threshold_crossed(D("4"), D("12"), D("10"), th) == [0.5, 0.8, 1.0]
    assert threshold_crossed(D("0"), D("1"), None, th) == []
    assert threshold_crossed(D("0"), D("1"), D("0"), th) == []


# --- messages and headers ---------------------------------------------------------------------


def test_refusal_message_names_budget_spend_limit_and_reset() -> None:
    b = _one(rule(name="daily-per-user", scope={"user": "*"}, limit_usd="5"), user="alice")
    msg, retry = refusal_message(b, BucketState(spent=D("4.98"), reserved=D("0.03")), NOW)
    assert "'daily-per-user' (user alice)" in msg
    assert "$4.98 spent of the $5.00 limit" in msg and "$0.03 reserved" in msg
    assert "2026-11-24T00:00:00Z" in msg and "(in 8 hours 30 minutes)" in msg
    assert retry == 8 * 3600 + 30 * 60


def test_refusal_message_in_minutes_near_the_reset() -> None:
    b = _one(rule(name="h", period="hourly"))
    msg, retry = refusal_message(b, BucketState(spent=D("1")), at(2026, 11, 23, 15, 58, 30))
    assert "resets at 2026-11-23T16:00:00Z (in 2 minutes)" in msg and retry == 90
    assert "reserved" not in msg


def test_refusal_message_far_from_the_reset_in_days() -> None:
    b = _one(rule(name="m", period="monthly"))
    msg, retry = refusal_message(b, BucketState(spent=D("1")), at(2026, 11, 3, 20))
    assert "2026-12-01T00:00:00Z (in 27 days 4 hours)" in msg and retry == (27 * 24 + 4) * 3600


def test_refusal_message_for_a_total_budget_has_no_retry_after() -> None:
    b = _one(rule(name="lifetime", period="total", limit_usd="100"))
    msg, retry = refusal_message(b, BucketState(spent=D("100")), NOW)
    assert retry is None and "does not reset" in msg and "$100.00" in msg


def test_refusal_message_for_tokens_and_requests() -> None:
    b = _one(rule(name="t", limit_usd=None, limit_tokens=1000, limit_requests=10))
    msg, _ = refusal_message(b, BucketState(tokens=990, reserved_tokens=5), NOW, "tokens")
    assert "990 tokens used of the 1000-token limit" in msg and "plus 5 reserved" in msg
    msg, _ = refusal_message(b, BucketState(requests=10), NOW, "requests")
    assert "10 requests made of the 10-request limit" in msg


def test_budget_headers_show_the_tightest_budget() -> None:
    roomy = _one(rule(name="roomy", limit_usd="100"))
    tight = _one(rule(name="tight", period="monthly", limit_usd="10"))
    tokens_only = _one(rule(name="tok", limit_usd=None, limit_tokens=5))
    states = {roomy.id: BucketState(spent=D("50")), tight.id: BucketState(spent=D("7"), reserved=D("0.5"))}
    h = budget_headers([roomy, tight, tokens_only], states, NOW)
    assert h == {HEADER_NAME: "tight", HEADER_REMAINING: "2.500000", HEADER_RESET: "2026-12-01T00:00:00Z"}
    lifetime = _one(rule(name="life", period="total", limit_usd="1"))
    assert budget_headers([lifetime], {lifetime.id: BucketState(spent=D("2"))}, NOW) == {
        HEADER_NAME: "life", HEADER_REMAINING: "0.000000", HEADER_RESET: "never",
    }
    assert budget_headers([tokens_only], {}, NOW) == {}


def test_webhook_payload() -> None:
    w = _one(rule(name="soft", action="warn", limit_usd="10", scope={"user": "*"}), user="bob")
    (c,) = admit([w], {}, D("8")).crossings
    body = webhook_payload(c, NOW)
    assert body["budget"] == "soft" and body["user"] == "bob" and body["threshold"] == 0.8
    assert body["spent_usd"] == "8.000000000" and body["limit_usd"] == "10"
    assert body["window_end"] == "2026-11-24T00:00:00Z"


@settings(deadline=None, max_examples=300)
@given(
    period=st.sampled_from(["hourly", "daily", "weekly", "monthly", "total"]),
    tz=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]),
    offsets=st.lists(st.integers(-40 * 86400, 40 * 86400), min_size=1, max_size=8),
)
def test_bucket_windows_are_windows_of_now_whatever_came_before(period: str, tz: str, offsets: list[int]) -> None:
    # bucket_for keeps the last window per (period, timezone); each bucket must still be
    # the window of its own `now`, across DST changes and in any order of requests.
    r = rule(period=period, timezone=tz)
    base = at(2026, 3, 15)
    for off in offsets:
        now = base + timedelta(seconds=off, microseconds=off % 997)
        b = bucket_for(r, None, None, "m", now)
        assert b is not None
        start, end = window(period, now, tz)  # type: ignore[arg-type]
        assert (b.start, b.end) == (start, end)
        assert b.id == f"r|{start.isoformat()}"


def test_a_refusal_caused_only_by_requests_in_flight_says_retry_in_seconds() -> None:
    b = _one(rule(name="daily", limit_usd="1"))
    # $0.30 spent, $0.60 held by 3 requests in flight: a $0.20 request fits once they end.
    st = BucketState(spent=D("0.3"), reserved=D("0.6"), reserved_requests=3)
    msg, retry = refusal_message(b, st, NOW, "usd", amount=D("0.2"))
    assert retry == IN_FLIGHT_RETRY_AFTER_S and "requests in flight (3) finish" in msg
    # $0.80 does not fit even then: the reset is when it can.
    msg, retry = refusal_message(b, st, NOW, "usd", amount=D("0.8"))
    assert retry == 8 * 3600 + 30 * 60 and "resets at" in msg
    t = _one(rule(name="t", limit_usd=None, limit_tokens=1000))
    st = BucketState(tokens=500, reserved_tokens=450, reserved_requests=1)
    assert refusal_message(t, st, NOW, "tokens", amount=D(0), tokens=100)[1] == IN_FLIGHT_RETRY_AFTER_S
    assert refusal_message(t, st, NOW, "tokens", amount=D(0), tokens=600)[1] == 8 * 3600 + 30 * 60


def test_team_scope_is_shared_by_the_keys_of_a_team() -> None:
    """A request's team is its key's metadata.team: a fixed team matches that team's keys,
    whichever is used; `"*"` makes one bucket per team; no team, no team bucket."""
    rules = [
        rule(name="search", scope={"team": "search"}),
        rule(name="each-team", scope={"team": "*"}),
        rule(name="each-team-user", scope={"team": "*", "user": "*"}),
    ]
    (a, a_all, a_user) = buckets_for(rules, "search-prod", "ann", "gpt-4o", NOW, "search")
    (b, b_all, _) = buckets_for(rules, "search-batch", "bob", "gpt-4o", NOW, "search")
    assert a.id == b.id == "search|team=search|2026-11-23T00:00:00+00:00" and a.team == "search"
    assert a_all.id == b_all.id == "each-team|team=search|2026-11-23T00:00:00+00:00"
    assert a_user.id == "each-team-user|user=ann|team=search|2026-11-23T00:00:00+00:00"
    assert a_user.describe() == "'each-team-user' (user ann, team search)"
    (ads,) = [x for x in buckets_for(rules, "ads", None, "gpt-4o", NOW, "ads")]
    assert ads.id == "each-team|team=ads|2026-11-23T00:00:00+00:00"
    assert buckets_for(rules, "no-team-key", "ann", "gpt-4o", NOW) == []
    forged = bucket_for(rules[1], None, None, None, NOW, "x|2026")
    assert forged is not None and forged.id == "each-team|team=x%7C2026|2026-11-23T00:00:00+00:00"

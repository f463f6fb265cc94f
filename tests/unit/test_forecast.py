"""Budget forecasts: pace = spend in the window so far / time elapsed in it; every instant
is built from an injected `now`, never the real clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from proxy.spend.forecast import Forecast, crossed, forecast, forecast_fields

D = Decimal
START = datetime(2031, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def test_half_a_day_at_a_steady_pace_projects_double_and_hits_the_limit_on_time() -> None:
    now = START + timedelta(hours=12)
    f = forecast(D("3"), D("5"), START, START + DAY, now)
    assert f == Forecast("over", D("0.25"), D("6"), START + timedelta(hours=20))


def test_under_the_limit_no_limit_and_no_spend() -> None:
    now = START + timedelta(hours=12)
    assert forecast(D("2"), D("5"), START, START + DAY, now) == Forecast("under", D("0.166666667"), D("4"))
    assert forecast(D("2"), None, START, START + DAY, now) == Forecast("no-limit", D("0.166666667"), D("4"))
    assert forecast(D("0"), D("5"), START, START + DAY, now) == Forecast("under", D("0"), D("0"))


def test_exceeded_total_and_too_early() -> None:
    now = START + timedelta(hours=12)
    assert forecast(D("5"), D("5"), START, START + DAY, now).status == "exceeded"
    assert forecast(D("1"), D("5"), START, None, now) == Forecast("no-period")
    # 59 minutes into a day is under 1/24 of it: no projection from one early request.
    assert forecast(D("1"), D("5"), START, START + DAY, START + timedelta(minutes=59)).status == "too-early"
    assert forecast(D("1"), D("5"), START, START + DAY, START + timedelta(hours=1)).status == "over"


def test_crossed_only_from_within_to_over() -> None:
    under, over = Forecast("under"), Forecast("over")
    assert crossed(under, over) and crossed(Forecast("too-early"), Forecast("exceeded"))
    assert not crossed(over, over) and not crossed(under, under) and not crossed(Forecast("exceeded"), over)


def test_report_rows_gain_the_forecast_fields() -> None:
    row = {"name": "b", "spent": D("3"), "limit_usd": D("5"), "window_start": START, "window_end": START + DAY}
    out = forecast_fields(row, START + timedelta(hours=12))
    assert out["forecast"] == "over" and out["projected_usd"] == D("6") and out["limit_at"] == START + timedelta(hours=20)
    assert out["name"] == "b"


@given(
    spent=st.decimals(min_value=0, max_value=1000, places=9),
    limit=st.decimals(min_value=D("0.000000001"), max_value=1000, places=9),
    elapsed_s=st.integers(min_value=3600, max_value=86400),
)
def test_properties(spent: Decimal, limit: Decimal, elapsed_s: int) -> None:
    now = START + timedelta(seconds=elapsed_s)
    f = forecast(spent, limit, START, START + DAY, now)
    if spent >= limit:
        assert f.status == "exceeded"
        return
    assert f.projected_usd is not None and f.projected_usd >= spent - D("0.000000001")
    if f.status == "over":
        assert f.limit_at is not None and now - timedelta(seconds=1) <= f.limit_at <= START + DAY
    else:
        assert f.status == "under" and f.limit_at is None and f.projected_usd <= limit

"""Money units of the budget arithmetic: exact integer nano-USD in ledgers, Decimal USD
elsewhere. A reservation is rounded *up* so it never under-reserves."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NANOS_PER_USD = 10**9


# ---------------------------------------------------------------------------------------
# Money units


def to_nanos(amount: Decimal, rounding: str = ROUND_CEILING) -> int:
    """USD -> integer nano-USD. Ceiling by default: a reservation never under-reserves."""
    return int((amount * NANOS_PER_USD).to_integral_value(rounding=rounding))


def spend_nanos(amount: Decimal) -> int:
    """USD -> nano-USD for an actual cost: round half-even, no bias over many requests."""
    return to_nanos(amount, ROUND_HALF_EVEN)


def from_nanos(nanos: int) -> Decimal:
    """Integer nano-USD -> exact USD with nine decimal places."""
    return Decimal(nanos).scaleb(-9)


def quantize_up(amount: Decimal) -> Decimal:
    """The amount a ledger actually reserves for `amount`."""
    return from_nanos(to_nanos(amount))


def format_usd(amount: Decimal) -> str:
    """"$4.98", "$0.027", "$0.00015": two decimals at least, more only when they matter."""
    q = amount.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)
    text = f"{q:f}".rstrip("0")
    whole, _, frac = text.partition(".")
    frac = frac.ljust(2, "0")
    return f"${whole}.{frac}"


def iso_utc(moment: datetime) -> str:
    """ISO-8601 in UTC with a `Z`, to the second: what messages and headers show."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def report_value(value: object) -> object:
    """A budget or spend report's value as JSON shows it, in the API and the CLI alike:
    money as a plain decimal string (exact, never 1E-7), instants as `iso_utc`."""
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, datetime):
        return iso_utc(value)
    return value

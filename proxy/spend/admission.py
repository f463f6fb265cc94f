"""Admission: reserve a request's worst-case cost against every budget that applies, all or
nothing, before anything is sent upstream. A refusal is a 429 that names the budget, what
was spent, the limit, what this request would have reserved and when the budget resets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from proxy.encodings import encoding_ready
from proxy.errors import BudgetExceeded, LedgerUnavailable, ModelNotFound
from proxy.estimate import estimate_prompt_bound, estimate_prompt_tokens
from proxy.exchange import Exchange
from proxy.output_cap import OutputCap, output_cap_of
from proxy.policy import Policy
from proxy.pricing import Price, price_of_exchange, worst_case_cost
from proxy.spend.budgets import (
    Bucket,
    BucketState,
    ClampInput,
    buckets_for,
    budget_headers,
    clamp_header,
    how_to_fit,
    quantize_up,
    refusal_message,
)
from proxy.spend.hold import NOT_ADMITTED, Admission, Hold, ledger_down, new_ledger_id
from proxy.spend.ledger import IfInterrupted, SpendRow, admit_and_reserve
from proxy.spend.quota import leasable
from proxy.usage import Usage

if TYPE_CHECKING:
    from proxy.spend.lifecycle import Spend

log = logging.getLogger("tollgate.admit")

# The prompt estimate can run a few tokens under the real count (tool schemas, unknown
# framing); the reservation adds this much so the worst case stays a worst case.
INPUT_MARGIN = Decimal("1.10")
INPUT_MARGIN_TOKENS = 16


@dataclass(frozen=True, slots=True)
class OutputLimits:
    """What bounds a request's output, from its route and upstream."""

    default_cap: int | None  # the route's cap for a request that sets none
    context_size: int | None  # llama-server's context: where an uncapped request stops


def per_output_cap(policy: Policy, limits: OutputLimits, oc: OutputCap | None) -> tuple[int, bool]:
    """The most tokens one output may run to, and whether Tollgate must write that cap into
    the body for the upstream to hold to it (the request set none it could reserve for)."""
    if oc is None:
        return 0, False  # embeddings: no output tokens
    if oc.per_output is not None:
        return oc.per_output, False
    if oc.unlimited and limits.context_size is not None:
        # No cap: llama-server generates until its context is full, so that is the worst.
        return limits.context_size, False
    cap = limits.default_cap if limits.default_cap is not None else policy.settings.default_max_tokens
    return cap, True


def _input_tokens(prompt_tokens: int) -> int:
    return math.ceil(prompt_tokens * INPUT_MARGIN) + INPUT_MARGIN_TOKENS


def _past_a_threshold(buckets: list[Bucket], states: Mapping[str, BucketState]) -> bool:
    """Whether any warn budget's spent + reserved (this request included) is at or past
    its first warning threshold."""
    for b in buckets:
        if b.blocking or b.limit_usd is None or not b.rule.thresholds:
            continue
        st = states.get(b.id)
        if st is not None and st.used >= Decimal(str(b.rule.thresholds[0])) * b.limit_usd:
            return True
    return False


def _if_interrupted(ex: Exchange, model: str, prompt_tokens: int, price: Price, now: datetime) -> IfInterrupted:
    """Should this process die with the request in flight, the lease runs out and the
    prompt, which was surely sent, is charged: the estimate without the worst-case margin."""
    return IfInterrupted(
        SpendRow.from_usage(
            Usage(input_tokens=prompt_tokens, input_source="estimated", output_source="estimated"),
            quantize_up(worst_case_cost(prompt_tokens, 0, price)),
            time=now, request_id=ex.request_id, key=ex.key_name, user=ex.user, model=model,
            upstream=ex.upstream, endpoint=ex.endpoint, outcome="interrupted", status=None,
            team=ex.team, key_metadata=ex.key_metadata,
        ),
        prompt_tokens,
    )


async def admit(
    spend: Spend, ex: Exchange, policy: Policy, payload: dict[str, Any], limits: OutputLimits
) -> Admission:
    """Reserve the worst case against every applicable budget, or raise the refusal."""
    price = price_of_exchange(policy.prices, ex.upstream_model, ex.requested_model)
    if price is None and policy.settings.pricing.unpriced == "refuse":
        raise ModelNotFound(
            f"The model `{ex.requested_model}` has no price, and this proxy refuses unpriced models.",
            param="model",
            code="model_not_priced",
        )
    now = spend.clock()
    model = ex.upstream_model or ex.requested_model or ""
    buckets = buckets_for(policy.settings.budgets, ex.key_name, ex.user, model, now, ex.team)
    if not buckets:
        return NOT_ADMITTED
    oc = output_cap_of(ex.endpoint, ex.upstream_kind or "openai", payload)
    cap, write_cap = per_output_cap(policy, limits, oc)
    outputs = oc.outputs if oc is not None else 1
    if price is None:
        price = Price(input=Decimal(0), output=Decimal(0))
    ledger_id = new_ledger_id(ex.request_id)
    if spend.quota.enabled and leasable(buckets):
        # From a lease, the prompt is bounded by its bytes (no BPE token is shorter than a
        # byte): no tokenizer work, and no table in memory for a process that never needs
        # one. The exact estimate is left to a request that must reserve on its own.
        bound = _input_tokens(estimate_prompt_bound(ex.endpoint, payload, model))
        leased = await _from_leases(
            spend, ex, ledger_id, buckets, worst_case_cost(bound, cap * outputs, price), bound + cap * outputs, now
        )
        if leased is not None:
            return _admitted_from_lease(ex, leased, oc, cap, write_cap)
    # The model's own table, built off the event loop if this is the first estimate for it.
    await encoding_ready(model)
    prompt_tokens = estimate_prompt_tokens(ex.endpoint, payload, model)
    input_tokens = _input_tokens(prompt_tokens)
    amount = worst_case_cost(input_tokens, cap * outputs, price)
    clamp = None
    if oc is not None:
        input_cost = worst_case_cost(input_tokens, 0, price)
        clamp = ClampInput(input_cost, input_tokens, cap, price.output / Decimal(1_000_000), outputs)
    tokens = input_tokens + cap * outputs
    try:
        reserved = await admit_and_reserve(
            spend.ledger,
            ledger_id,
            buckets,
            amount,
            tokens=tokens,
            clamp=clamp,
            lease_seconds=spend.lease_seconds,
            now=now,
            if_interrupted=_if_interrupted(ex, model, prompt_tokens, price, now),
        )
    except Exception as exc:
        if not ledger_down(exc):
            raise
        return _unreserved(spend, ex, Hold(ledger_id, list(buckets), amount, False), oc, cap, write_cap, exc)
    decision = reserved.decision
    if not decision.admitted:
        assert decision.refused is not None and decision.refused_state is not None
        spend.metrics.rejected(decision.refused.name)
        message, retry_after = refusal_message(
            decision.refused, decision.refused_state, now, decision.reason or "usd",
            amount=decision.amount, tokens=decision.tokens,
        )
        refusal_headers = {"x-tollgate-budget-name": decision.refused.name}
        if decision.reason in (None, "usd"):
            sentence, fit_headers = how_to_fit(
                decision.refused, decision.refused_state, amount, clamp, oc.field if oc is not None else "max_tokens"
            )
            message += sentence
            refusal_headers.update(fit_headers)
        if retry_after is not None:
            refusal_headers["retry-after"] = str(retry_after)
        ex.budget_verdict = f"refused:{decision.refused.name}"
        raise BudgetExceeded(message, headers=refusal_headers)

    hold = Hold(ledger_id, list(buckets), decision.amount, reserved.reserved)
    if reserved.reserved:
        spend.holding(hold)
    headers: dict[str, str] = {}
    blocking = any(b.blocking for b in buckets)
    new_cap = decision.output_cap if decision.clamped else None
    if new_cap is None and blocking and write_cap:
        # The reservation assumed `cap` output tokens; make the upstream hold to it.
        new_cap = cap
    cap_override = None
    if new_cap is not None and oc is not None:
        # Into the field this upstream obeys (llama.cpp: n_predict over max_tokens).
        cap_override = (oc.field, new_cap)
        ex.output_cap = new_cap
    verdict = "ok"
    if decision.clamped:
        headers.update(clamp_header(decision))
        verdict = f"clamped:{decision.clamped_by.name if decision.clamped_by else ''}"
    # Not only the request that crosses a threshold: every request while a warn budget is
    # past its first threshold carries the headers, or a client arriving later never learns.
    if decision.crossings or decision.soft_exceeded or _past_a_threshold(buckets, reserved.states):
        headers.update(budget_headers(buckets, reserved.states, now))
        for crossing in decision.crossings:
            log.warning(
                "budget %s at %.0f%% of its limit (%s)",
                crossing.bucket.describe(),
                crossing.threshold * 100,
                ex.request_id,
            )
        if not decision.clamped:
            verdict = "warn"
    ex.budget_verdict = verdict
    return Admission(hold, cap_override, headers)


async def _from_leases(
    spend: Spend, ex: Exchange, ledger_id: str, buckets: list[Bucket], amount: Decimal, tokens: int, now: datetime
) -> Hold | None:
    """The worst case taken from this process's quota leases, or None: the request must
    reserve on its own (a budget is near its edge, or the ledger failed while sizing)."""
    amount_q = quantize_up(amount)
    try:
        draw = await spend.quota.draw(spend.ledger, buckets, amount_q, tokens, now)
    except Exception as exc:
        if not ledger_down(exc):
            raise
        return None  # the per-request reservation meets the outage and applies on_unavailable
    if draw is None:
        return None
    return Hold(ledger_id, list(buckets), amount_q, False, draw=draw)


def _admitted_from_lease(ex: Exchange, hold: Hold, oc: OutputCap | None, cap: int, write_cap: bool) -> Admission:
    # Leased buckets all block and none has a warn threshold to announce: the only
    # difference from a plain reservation is that the ledger was not called.
    cap_override = None
    if write_cap and oc is not None:
        cap_override = (oc.field, cap)
        ex.output_cap = cap
    ex.budget_verdict = "ok"
    return Admission(hold, cap_override, {})


def _unreserved(
    spend: Spend, ex: Exchange, hold: Hold, oc: OutputCap | None, cap: int, write_cap: bool, exc: BaseException
) -> Admission:
    """The ledger is down: refuse (fail_closed) or admit unchecked (fail_open)."""
    mode = spend.settings.on_unavailable
    spend.count_unavailable("reserve", mode)
    if mode == "fail_closed":
        log.error("ledger unavailable, refusing %s (fail_closed): %s", ex.request_id, exc)
        # The reserve may yet run (a hung Redis runs what it had queued once it wakes): a
        # refused request must never hold money, so the ledger chore abandons it.
        spend.abandoned.add(hold.ledger_id)
        ex.budget_verdict = "ledger_unavailable"
        raise LedgerUnavailable(
            "Budgets apply to this request but the spend ledger is unavailable, so it was not "
            "sent upstream. Retry shortly.",
            headers={"retry-after": "2"},
        )
    log.warning("ledger unavailable, admitting %s without a reservation (fail_open): %s", ex.request_id, exc)
    hold.charge_on_settle = True
    ex.budget_verdict = "unchecked"
    cap_override = None
    if any(b.blocking for b in hold.buckets) and write_cap and oc is not None:
        # As when admitted normally: the cost charged later stays within what was estimated.
        cap_override = (oc.field, cap)
        ex.output_cap = cap
    return Admission(hold, cap_override, {"x-tollgate-budget-unchecked": "ledger-unavailable"})

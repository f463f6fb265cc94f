"""admit: who is asking (virtual key, user), and may they spend this much (budgets).

Admission reserves the request's worst-case cost against every budget that applies, all or
nothing, before anything is sent upstream; settlement (finish.py) replaces the reservation
with the actual cost. A refusal is a 429 that names the budget, what was spent, the limit
and when it resets.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from proxy.budgets import (
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
from proxy.errors import (
    BudgetExceeded,
    InvalidApiKey,
    LedgerUnavailable,
    ModelNotFound,
    PermissionDenied,
)
from proxy.exchange import Exchange
from proxy.keys import parse_bearer, request_user
from proxy.ledger import DuplicateReservation, IfInterrupted, LedgerError, SpendRow, admit_and_reserve
from proxy.output_cap import OutputCap, output_cap_of
from proxy.pricing import Price, worst_case_cost
from proxy.state import Runtime
from proxy.estimate import estimate_prompt_tokens
from proxy.usage import Usage

log = logging.getLogger("tollgate.admit")

# The prompt estimate can run a few tokens under the real count (tool schemas, unknown
# framing); the reservation adds this much so the worst case stays a worst case.
INPUT_MARGIN = Decimal("1.10")
INPUT_MARGIN_TOKENS = 16



@dataclass(slots=True)
class Hold:
    """What admission reserved, so settlement can replace it exactly once."""

    ledger_id: str
    buckets: list[Bucket]
    amount: Decimal
    reserved: bool
    settled: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    # Admitted without a reservation because the ledger was down (fail_open): settlement
    # charges the actual cost to `buckets` all the same, when the ledger is back if need be.
    charge_on_settle: bool = False


# Ledger ids: the request id (a client's can repeat) plus this process's random tag and a
# counter, so unique per admission across requests, workers and restarts without a
# getrandom() call per request. A forked worker draws its own tag.
_ledger_tag = ""
_ledger_counter = itertools.count()


def _new_ledger_tag() -> None:
    global _ledger_tag, _ledger_counter
    _ledger_tag = os.urandom(6).hex()
    _ledger_counter = itertools.count()


_new_ledger_tag()
os.register_at_fork(after_in_child=_new_ledger_tag)


def new_ledger_id(request_id: str) -> str:
    return f"{request_id}:{_ledger_tag}{next(_ledger_counter):x}"


# Failures that mean the ledger's storage is unreachable or unwritable, not a bug.
LEDGER_DOWN: tuple[type[BaseException], ...] = (LedgerError, sqlite3.Error, OSError, TimeoutError)


def ledger_down(exc: BaseException) -> bool:
    return isinstance(exc, LEDGER_DOWN) and not isinstance(exc, DuplicateReservation)


def authenticate(request: web.Request, ex: Exchange, rt: Runtime) -> None:
    """With virtual keys on, every request must carry a known one (constant-time compare)."""
    if not rt.keyring.enabled:
        return
    # Azure OpenAI clients send their key as `api-key`, not as a bearer token.
    presented = parse_bearer(request.headers.get("Authorization")) or (request.headers.get("api-key") or "").strip() or None
    key = rt.keyring.authenticate(presented)
    if key is None:
        # Like OpenAI, never echo the key itself back.
        raise InvalidApiKey(
            "Incorrect API key provided. Use a Tollgate virtual key as the bearer token."
            if presented
            else "You didn't provide an API key. Send a Tollgate virtual key as 'Authorization: Bearer <key>'."
        )
    ex.key_name = key.name
    ex.extra["virtual_key"] = key


def identify_user(request: web.Request, ex: Exchange, rt: Runtime) -> None:
    header = rt.settings.user_header
    ex.user = request_user(ex.user, request.headers.get(header) if header else None)


def check_model_allowed(ex: Exchange, rt: Runtime) -> None:
    key = ex.extra.get("virtual_key")
    if key is None or ex.requested_model is None:
        return
    if not rt.keyring.allows(key, ex.requested_model):
        raise PermissionDenied(
            f"The key '{key.name}' may not use the model `{ex.requested_model}`.",
            param="model",
            code="model_not_allowed",
        )


def price_of(ex: Exchange, rt: Runtime) -> Price | None:
    """The price of what the upstream runs; an alias's own entry if the real id has none."""
    model = ex.upstream_model or ex.requested_model or ""
    price = rt.prices.lookup(model)
    if price is None and ex.requested_model and ex.requested_model != model:
        price = rt.prices.lookup(ex.requested_model)
    if price is None and ex.response_model and ex.extra.get("azure_deployment"):
        # An Azure deployment is named by its owner ("prod-chat"); the response names the
        # model behind it ("gpt-4o-2024-08-06"), which the price table knows. Only there:
        # elsewhere the requested model is what the operator prices (or leaves unpriced).
        price = rt.prices.lookup(ex.response_model)
    return price


def _default_cap(ex: Exchange, rt: Runtime) -> int:
    route_cap = ex.extra.get("default_output_cap")
    return int(route_cap) if route_cap is not None else rt.settings.default_max_tokens


def _per_output_cap(ex: Exchange, rt: Runtime, oc: OutputCap | None) -> tuple[int, bool]:
    """The most tokens one output may run to, and whether Tollgate must write that cap into
    the body for the upstream to hold to it (the request set none it could reserve for)."""
    if oc is None:
        return 0, False  # embeddings: no output tokens
    if oc.per_output is not None:
        return oc.per_output, False
    if oc.unlimited:
        upstream = rt.upstreams.get(ex.upstream or "")
        if upstream is not None and upstream.context_size is not None:
            # No cap: llama-server generates until its context is full, so that is the worst.
            return upstream.context_size, False
    return _default_cap(ex, rt), True


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


async def reserve(ex: Exchange, rt: Runtime, payload: dict[str, Any]) -> dict[str, str]:
    """Reserve the worst case against every applicable budget; returns response headers.

    Sets ex.extra["cap_override"] = (field, cap) when the body must carry a (lower) cap.
    """
    price = price_of(ex, rt)
    if price is None and rt.settings.pricing.unpriced == "refuse":
        raise ModelNotFound(
            f"The model `{ex.requested_model}` has no price, and this proxy refuses unpriced models.",
            param="model",
            code="model_not_priced",
        )
    now = rt.clock()
    model = ex.upstream_model or ex.requested_model or ""
    buckets = buckets_for(rt.settings.budgets, ex.key_name, ex.user, model, now)
    if not buckets:
        return {}
    assert ex.body is not None
    oc = output_cap_of(ex.endpoint, ex.upstream_kind or "openai", payload)
    cap, write_cap = _per_output_cap(ex, rt, oc)
    outputs = oc.outputs if oc is not None else 1
    prompt_tokens = estimate_prompt_tokens(ex.endpoint, ex.body, model)
    input_tokens = math.ceil(prompt_tokens * INPUT_MARGIN) + INPUT_MARGIN_TOKENS
    if price is None:
        price = Price(input=Decimal(0), output=Decimal(0))
    # Should this process die with the request in flight, the lease runs out and the prompt,
    # which was surely sent, is charged: the estimate without the worst-case margin.
    if_interrupted = IfInterrupted(
        SpendRow.from_usage(
            Usage(input_tokens=prompt_tokens, input_source="estimated", output_source="estimated"),
            quantize_up(worst_case_cost(prompt_tokens, 0, price)),
            time=now, request_id=ex.request_id, key=ex.key_name, user=ex.user, model=model,
            upstream=ex.upstream, endpoint=ex.endpoint, outcome="interrupted", status=None,
        ),
        prompt_tokens,
    )
    amount = worst_case_cost(input_tokens, cap * outputs, price)
    input_cost = worst_case_cost(input_tokens, 0, price)
    clamp = None
    if oc is not None:
        clamp = ClampInput(input_cost, input_tokens, cap, price.output / Decimal(1_000_000), outputs)
    ledger_id = new_ledger_id(ex.request_id)
    try:
        admission = await admit_and_reserve(
            rt.ledger,
            ledger_id,
            buckets,
            amount,
            tokens=input_tokens + cap * outputs,
            clamp=clamp,
            lease_seconds=rt.lease_seconds,
            now=now,
            if_interrupted=if_interrupted,
        )
    except Exception as exc:
        if not ledger_down(exc):
            raise
        return _unreserved(ex, rt, Hold(ledger_id, list(buckets), amount, False), oc, cap, write_cap, exc)
    decision = admission.decision
    if not decision.admitted:
        assert decision.refused is not None and decision.refused_state is not None
        rt.budget_metrics.rejected(decision.refused.name)
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
        ex.extra["budget_verdict"] = f"refused:{decision.refused.name}"
        raise BudgetExceeded(message, headers=refusal_headers)

    hold = Hold(ledger_id, list(buckets), decision.amount, admission.reserved)
    ex.extra["hold"] = hold
    if admission.reserved:
        rt.live_reservations.add(ledger_id)
    headers: dict[str, str] = {}
    blocking = any(b.blocking for b in buckets)
    new_cap = decision.output_cap if decision.clamped else None
    if new_cap is None and blocking and write_cap:
        # The reservation assumed `cap` output tokens; make the upstream hold to it.
        new_cap = cap
    if new_cap is not None and oc is not None:
        # Into the field this upstream obeys (llama.cpp: n_predict over max_tokens).
        ex.extra["cap_override"] = (oc.field, new_cap)
        ex.output_cap = new_cap
    if decision.clamped:
        headers.update(clamp_header(decision))
        ex.extra["budget_verdict"] = f"clamped:{decision.clamped_by.name if decision.clamped_by else ''}"
    # Not only the request that crosses a threshold: every request while a warn budget is
    # past its first threshold carries the headers, or a client arriving later never learns.
    soft = decision.crossings or decision.soft_exceeded or _past_a_threshold(buckets, admission.states)
    if soft:
        headers.update(budget_headers(buckets, admission.states, now))
        for crossing in decision.crossings:
            log.warning(
                "budget %s at %.0f%% of its limit (%s)",
                crossing.bucket.describe(),
                crossing.threshold * 100,
                ex.request_id,
            )
        ex.extra.setdefault("budget_verdict", "warn")
    ex.extra.setdefault("budget_verdict", "ok")
    hold.headers = headers
    return headers


def _unreserved(
    ex: Exchange, rt: Runtime, hold: Hold, oc: OutputCap | None, cap: int, write_cap: bool, exc: BaseException
) -> dict[str, str]:
    """The ledger is down: refuse (fail_closed) or admit unchecked (fail_open)."""
    mode = rt.settings.ledger.on_unavailable
    if rt.faults is not None:
        rt.faults.ledger_unavailable.labels("reserve", mode).inc()
    if mode == "fail_closed":
        log.error("ledger unavailable, refusing %s (fail_closed): %s", ex.request_id, exc)
        # The reserve may yet run (a hung Redis runs what it had queued once it wakes): a
        # refused request must never hold money, so the ledger chore abandons it.
        rt.abandoned.add(hold.ledger_id)
        ex.extra["budget_verdict"] = "ledger_unavailable"
        raise LedgerUnavailable(
            "Budgets apply to this request but the spend ledger is unavailable, so it was not "
            "sent upstream. Retry shortly.",
            headers={"retry-after": "2"},
        )
    log.warning("ledger unavailable, admitting %s without a reservation (fail_open): %s", ex.request_id, exc)
    hold.charge_on_settle = True
    ex.extra["hold"] = hold
    ex.extra["budget_verdict"] = "unchecked"
    if any(b.blocking for b in hold.buckets) and write_cap and oc is not None:
        # As when admitted normally: the cost charged later stays within what was estimated.
        ex.extra["cap_override"] = (oc.field, cap)
        ex.output_cap = cap
    hold.headers = {"x-tollgate-budget-unchecked": "ledger-unavailable"}
    return dict(hold.headers)

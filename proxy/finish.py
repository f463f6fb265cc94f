"""finish: the one place an Exchange ends. Usage, cost, then the observers; exactly once."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from decimal import Decimal

from proxy.accept import MODEL_ENDPOINTS
from proxy.admit import Hold
from proxy.budgets import Crossing, charges, threshold_crossed, webhook_payload
from proxy.exchange import Exchange
from proxy.ledger import SpendRow
from proxy.pricing import cost
from proxy.state import Runtime
from proxy.tokens import estimate_output_tokens, estimate_prompt_tokens, usage_from_llamacpp_timings
from proxy.usage import Usage

log = logging.getLogger("tollgate.finish")


def started(ex: Exchange, rt: Runtime) -> None:
    """The exchange is routed and about to go upstream: observers may start timing it."""
    if not ex.extra.get("started"):
        ex.extra["started"] = True
        rt.observers.on_start(ex)


def finish(ex: Exchange, rt: Runtime) -> None:
    if ex.finished:
        return
    ex.finished = True
    if ex.t_end_ns is None:
        ex.t_end_ns = time.perf_counter_ns()
    try:
        account(ex, rt)
    except Exception:  # noqa: BLE001 - a bug in accounting must not lose the record
        rt.measure_failures += 1
        ex.extra["account_failed"] = True
        log.exception("accounting for %s failed", ex.request_id)
    started(ex, rt)
    rt.observers.on_finish(ex)
    if ex.extra.get("hold") is not None or ex.t_upstream_sent_ns is not None:
        # Settled on a task of its own: it must complete even when the client is gone and
        # the handler was cancelled, and shutdown waits for it.
        ex.extra["settling"] = rt.spawn(settle(ex, rt), f"settling {ex.request_id}")


async def complete(ex: Exchange, rt: Runtime) -> None:
    """The response is whole but for its last bytes: account, observe and settle now, so a
    response the client sees complete is never missing from the ledger (even on kill -9)."""
    ex.t_end_ns = time.perf_counter_ns()
    finish(ex, rt)
    settling = ex.extra.get("settling")
    if settling is not None:
        await asyncio.shield(settling)


def account(ex: Exchange, rt: Runtime) -> None:
    """Tokens (upstream's, else llama.cpp timings, else estimated) and their cost."""
    forwarded = ex.t_upstream_sent_ns is not None
    if ex.usage is None and ex.llamacpp_timings is not None:
        ex.usage = usage_from_llamacpp_timings(ex.llamacpp_timings)
    model = ex.upstream_model or ex.requested_model
    succeeded_upstream = ex.status is None or ex.status < 400 or ex.outcome == "client_gone"
    if (
        ex.usage is None
        and forwarded
        and succeeded_upstream
        and ex.body is not None
        and model is not None
        and ex.endpoint in MODEL_ENDPOINTS
    ):
        # Nothing from upstream (no usage, or the client left first): bill what was consumed,
        # the prompt and the output actually relayed.
        text = "".join(ex.output_text_parts)
        ex.usage = Usage(
            input_tokens=estimate_prompt_tokens(ex.endpoint, ex.body, model),
            output_tokens=estimate_output_tokens(text, model) if text else 0,
        )
    if ex.usage is None or model is None:
        return
    price = rt.prices.lookup(model)
    if price is None and ex.requested_model and ex.requested_model != model:
        price = rt.prices.lookup(ex.requested_model)
    if price is None:
        ex.priced = False
        ex.cost = Decimal(0)
        if model not in rt.unpriced_warned and len(rt.unpriced_warned) < 1000:
            rt.unpriced_warned.add(model)
            log.warning("no price for model %r: its cost is counted as 0 (add it under pricing.models)", model)
        return
    ex.cost = cost(ex.usage, price)


async def settle(ex: Exchange, rt: Runtime) -> None:
    """Replace the reservation with what was actually spent, and log the spend; once."""
    hold: Hold | None = ex.extra.get("hold")
    if hold is not None:
        if hold.settled:
            return
        hold.settled = True
    now = rt.clock()
    spent = ex.cost if ex.cost is not None else Decimal(0)
    tokens = ex.usage.total_tokens if ex.usage is not None else 0
    row = SpendRow.from_usage(
        ex.usage,
        ex.cost,
        time=now,
        request_id=ex.request_id,
        key=ex.key_name,
        user=ex.user,
        model=ex.upstream_model or ex.requested_model,
        upstream=ex.upstream,
        endpoint=ex.endpoint,
        outcome=ex.outcome,
        status=ex.status,
    )
    if hold is not None and hold.reserved:
        ledger_id, actual = hold.ledger_id, charges(hold.buckets, spent, tokens)
    else:
        ledger_id, actual = f"{ex.request_id}:{os.urandom(4).hex()}", []
    try:
        results = await rt.ledger.settle(ledger_id, actual, row, now)
    except Exception:  # noqa: BLE001 - the lease frees the reservation; say so loudly
        log.exception("settling %s failed; its reservation will expire with its lease", ex.request_id)
        return
    if hold is None:
        return
    by_id = {b.id: b for b in hold.buckets}
    for result in results:
        bucket = by_id.get(result.bucket_id)
        if bucket is None or bucket.limit_usd is None:
            continue
        for threshold in threshold_crossed(
            result.spent_before, result.spent_after, bucket.limit_usd, bucket.rule.thresholds
        ):
            rt.budget_metrics.crossed(bucket.name, threshold)
            log.warning("budget %s crossed %.0f%% of its limit", bucket.describe(), threshold * 100)
            if rt.webhook.enabled:
                crossing = Crossing(bucket, threshold, result.spent_after, bucket.limit_usd)
                rt.spawn(rt.webhook.send(webhook_payload(crossing, now)), "budget webhook")

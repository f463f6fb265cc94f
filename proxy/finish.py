"""finish: the one place an Exchange ends. Usage, cost, then the observers; exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from proxy.accept import MODEL_ENDPOINTS
from proxy.admit import Hold, ledger_down, new_ledger_id, price_of
from proxy.budgets import Charge, Crossing, charges, threshold_crossed, webhook_payload
from proxy.exchange import Exchange
from proxy.ledger import Settled, SpendRow
from proxy.pricing import cost, plain_usd
from proxy.state import Runtime
from proxy.estimate import estimate_output_tokens, estimate_prompt, is_reasoning_model
from proxy.usage import Usage, usage_from_llamacpp_timings

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
    if ex.outcome == "client_gone" and rt.drain_deadline is not None and time.monotonic() >= rt.drain_deadline:
        # Cancelled by the server at the end of the shutdown grace, not by the client.
        ex.outcome = "proxy_error"
        ex.error_type = "shutdown"
        ex.error_message = "The proxy shut down before the response was complete."
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
        prompt = estimate_prompt(ex.endpoint, ex.body, model)
        ex.usage = Usage(
            input_tokens=prompt.tokens,
            output_tokens=ex.output_text.estimate_tokens(lambda text: estimate_output_tokens(text, model)),
            input_source="estimated_upper_bound" if prompt.image_size_assumed else "estimated",
            # The relayed text of a reasoning model leaves out its hidden reasoning: the
            # count (and the cost priced from it) is labelled a lower bound, never exact.
            output_source="estimated_lower_bound" if is_reasoning_model(model) else "estimated",
        )
        if is_reasoning_model(model):
            log.info("%s: no usage from upstream; output of reasoning model %r estimated as a lower bound",
                     ex.request_id, model)
    if ex.usage is None or model is None:
        return
    price = price_of(ex, rt)
    if price is None:
        ex.priced = False
        ex.cost = Decimal(0)
        if model not in rt.unpriced_warned and len(rt.unpriced_warned) < 1000:
            rt.unpriced_warned.add(model)
            log.warning("no price for model %r: its cost is counted as 0 (add it under pricing.models)", model)
        return
    ex.cost = cost(ex.usage, price)


# Settlements kept in memory while the ledger is down; past this, the oldest are dropped
# (and logged), so an outage cannot grow the process without bound.
MAX_UNSETTLED = 100_000


@dataclass(slots=True)
class Unsettled:
    """A settlement the ledger could not take: retried until it can."""

    ledger_id: str
    actual: list[Charge]
    row: SpendRow
    hold: Hold | None


async def settle(ex: Exchange, rt: Runtime) -> None:
    """Replace the reservation with what was actually spent, and log the spend; once."""
    hold: Hold | None = ex.extra.get("hold")
    if hold is not None:
        if hold.settled:
            return
        hold.settled = True
        rt.live_reservations.discard(hold.ledger_id)
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
    if hold is not None and (hold.reserved or hold.charge_on_settle):
        ledger_id, actual = hold.ledger_id, charges(hold.buckets, spent, tokens)
    else:
        ledger_id, actual = new_ledger_id(ex.request_id), []
    await _settle_once(rt, Unsettled(ledger_id, actual, row, hold), now)


async def _settle_once(rt: Runtime, job: Unsettled, now: datetime) -> bool:
    try:
        results = await rt.ledger.settle(job.ledger_id, job.actual, job.row, now)
    except Exception as exc:  # noqa: BLE001 - a request that was served must be charged
        if not ledger_down(exc):
            log.exception("settling %s failed; its reservation will expire with its lease", job.row.request_id)
            return True
        if len(rt.unsettled) >= MAX_UNSETTLED:
            lost: Unsettled = rt.unsettled.popleft()
            log.error("too many settlements waiting for the ledger: %s ($%s) is lost", lost.row.request_id, plain_usd(lost.row.cost))
        rt.unsettled.append(job)
        if rt.faults is not None:
            rt.faults.ledger_unavailable.labels("settle", "deferred").inc()
            rt.faults.unsettled.set(len(rt.unsettled))
        log.warning("ledger unavailable; settlement of %s ($%s) kept for retry: %s", job.row.request_id, plain_usd(job.row.cost), exc)
        return False
    _after_settle(rt, job.hold, results, now)
    return True


async def retry_unsettled(rt: Runtime) -> int:
    """Charge settlements kept while the ledger was down, oldest first; stops at the first
    failure (the ledger is still down). Settle is idempotent per ledger id, so a retry of
    one that did land (the reply was lost) charges nothing twice."""
    done = 0
    while rt.unsettled:
        job = rt.unsettled.popleft()
        try:
            results = await rt.ledger.settle(job.ledger_id, job.actual, job.row, rt.clock())
        except Exception as exc:  # noqa: BLE001 - still down: keep it, try again later
            if ledger_down(exc):
                rt.unsettled.appendleft(job)
                break
            log.exception("late settlement of %s failed for good", job.row.request_id)
            continue
        done += 1
        _after_settle(rt, job.hold, results, rt.clock())
    if rt.faults is not None:
        rt.faults.unsettled.set(len(rt.unsettled))
        if done:
            rt.faults.reconciled.inc(done)
    if done:
        log.warning("ledger back: %d late settlements charged, %d still waiting", done, len(rt.unsettled))
    return done


def _after_settle(rt: Runtime, hold: Hold | None, results: list[Settled], now: datetime) -> None:
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

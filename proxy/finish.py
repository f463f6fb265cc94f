"""finish: the one place an Exchange ends. Usage, cost, then the observers; exactly once."""

from __future__ import annotations

import logging
import time
from decimal import Decimal

from proxy.accept import MODEL_ENDPOINTS
from proxy.exchange import Exchange
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

"""finish: the one place an Exchange ends. Usage, cost, the observers, then the hold's end
(settled or released); exactly once, on every path."""

from __future__ import annotations

import asyncio
import logging
import time
from decimal import Decimal
from typing import Any

from proxy.accept import MODEL_ENDPOINTS
from proxy.encodings import encoding_loaded, encoding_ready
from proxy.estimate import estimate_output_tokens, estimate_prompt, is_reasoning_model
from proxy.exchange import Exchange
from proxy.policy import Policy
from proxy.pricing import cost_parts, price_of_answer
from proxy.spend.hold import Admission
from proxy.spend.ledger import SpendRow
from proxy.state import Runtime
from proxy.usage import Usage, usage_from_llamacpp_timings

log = logging.getLogger("tollgate.finish")


def started(ex: Exchange, rt: Runtime) -> None:
    """The exchange is routed and about to go upstream: observers may start timing it."""
    if not ex.started:
        ex.started = True
        rt.observers.on_start(ex)


def finish(ex: Exchange, policy: Policy, admission: Admission, rt: Runtime) -> asyncio.Task[Any] | None:
    """End the exchange: account, observe, and end its hold. Returns the settlement's task
    (None when there is nothing to settle, or the exchange had already ended)."""
    if not _ended(ex, rt):
        return None
    return _close(ex, policy, admission, rt)


def finish_soon(ex: Exchange, policy: Policy, admission: Admission, rt: Runtime) -> None:
    """`finish`, from a path that cannot wait for it (the handler's last word after the client
    left or the upstream failed mid-response). An exchange whose usage must be estimated with
    a tokenizer table not built yet (a leased admission builds none) is accounted on a task
    of its own once the table is ready, built off the event loop: building it here would
    hold every other request for ~0.1-0.5 s."""
    if not _ended(ex, rt):
        return
    model = estimate_model(ex)
    if model is None or encoding_loaded(model):
        _close(ex, policy, admission, rt)
        return

    async def when_ready() -> None:
        await encoding_ready(model)
        settling = _close(ex, policy, admission, rt)
        if settling is not None:
            await settling  # shutdown waits for this task: so for the settlement too

    rt.spend.spawn(when_ready(), f"finishing {ex.request_id}")


def _ended(ex: Exchange, rt: Runtime) -> bool:
    """Mark the exchange ended, now; False if it had been already."""
    if ex.finished:
        return False
    ex.finished = True
    if ex.t_end_ns is None:
        ex.t_end_ns = time.perf_counter_ns()
    if ex.outcome == "client_gone" and rt.drain_deadline is not None and time.monotonic() >= rt.drain_deadline:
        # Cancelled by the server at the end of the shutdown grace, not by the client.
        ex.outcome = "proxy_error"
        ex.error_type = "shutdown"
        ex.error_message = "The proxy shut down before the response was complete."
    return True


def _close(ex: Exchange, policy: Policy, admission: Admission, rt: Runtime) -> asyncio.Task[Any] | None:
    try:
        account(ex, policy, rt)
    except Exception:  # noqa: BLE001 - a bug in accounting must not lose the record
        rt.measure_failures += 1
        ex.account_failed = True
        log.exception("accounting for %s failed", ex.request_id)
    started(ex, rt)
    rt.observers.on_finish(ex)
    if admission.grant is not None:
        # Nothing sent upstream: no token was used. No usage at all: the charge stands.
        used = 0 if ex.t_upstream_sent_ns is None else ex.usage.total_tokens if ex.usage is not None else None
        rt.limiter.end(admission.grant, used)
    hold = admission.hold
    if ex.t_upstream_sent_ns is None and ex.cache != "hit":
        # Nothing left Tollgate, so nothing was spent: what was reserved goes back. (A
        # cache hit reserved nothing and spent nothing, but is logged with what it saved.)
        return rt.spend.release(hold) if hold is not None else None
    return rt.spend.settle(hold, spend_row(ex, rt), ex.cost or Decimal(0), ex.usage.total_tokens if ex.usage else 0)


async def complete(ex: Exchange, policy: Policy, admission: Admission, rt: Runtime) -> None:
    """The response is whole but for its last bytes: account, observe and settle now, so a
    response the client sees complete is never missing from the ledger (even on kill -9)."""
    ex.t_end_ns = time.perf_counter_ns()
    settling = finish(ex, policy, admission, rt)
    if settling is not None:
        await asyncio.shield(settling)
    if admission.grant is not None and admission.grant.ending is not None:
        # Its slots free before the client sees the end, so its next request finds them.
        await asyncio.shield(admission.grant.ending)


def spend_row(ex: Exchange, rt: Runtime) -> SpendRow:
    return SpendRow.from_usage(
        ex.usage,
        ex.cost,
        time=rt.clock(),
        request_id=ex.request_id,
        key=ex.key_name,
        user=ex.user,
        model=ex.upstream_model or ex.requested_model,
        upstream=ex.upstream,
        endpoint=ex.endpoint,
        outcome=ex.outcome,
        status=ex.status,
        team=ex.team,
        key_metadata=ex.key_metadata,
        body_sha256=ex.body_sha256,
        finish_reason=ex.finish_reasons[0] if ex.finish_reasons else None,
        saved=ex.saved or Decimal(0),
        cache=ex.cache,
    )


def estimate_model(ex: Exchange) -> str | None:
    """The model `account` will estimate this exchange's usage for, or None when it will not
    (the upstream reported usage, or there is nothing to estimate)."""
    if ex.usage is not None or ex.llamacpp_timings is not None or ex.t_upstream_sent_ns is None:
        return None
    model = ex.upstream_model or ex.requested_model
    succeeded_upstream = ex.status is None or ex.status < 400 or ex.outcome == "client_gone"
    if succeeded_upstream and ex.body is not None and model is not None and ex.endpoint in MODEL_ENDPOINTS:
        return model
    return None


def account(ex: Exchange, policy: Policy, rt: Runtime) -> None:
    """Tokens (upstream's, else llama.cpp timings, else estimated) and their cost, at the
    prices the request was admitted under."""
    if ex.usage is None and ex.llamacpp_timings is not None:
        ex.usage = usage_from_llamacpp_timings(ex.llamacpp_timings)
    model = ex.upstream_model or ex.requested_model
    if ex.usage is None and estimate_model(ex) is not None:
        assert model is not None and ex.body is not None
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
    price = price_of_answer(policy.prices, ex.upstream_model, ex.requested_model, ex.response_model, ex.azure_deployment)
    if price is None:
        ex.priced = False
        ex.cost = Decimal(0)
        if model not in rt.unpriced_warned and len(rt.unpriced_warned) < 1000:
            rt.unpriced_warned.add(model)
            log.warning("no price for model %r: its cost is counted as 0 (add it under pricing.models)", model)
        return
    ex.cost_parts = cost_parts(ex.usage, price)
    ex.cost = ex.cost_parts.total

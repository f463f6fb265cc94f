"""throttle: the rate and concurrency limits, after admission and before anything is sent
upstream. Every limit that applies (proxy.ratelimit.rules) is charged at once, all or
nothing, on the ledger's storage (proxy.ratelimit.store); one that does not fit refuses
the request with a 429 naming the limit, with `Retry-After`.

Tokens per minute are charged at the request's worst case, the same estimate budgets
reserve (prompt estimate with its margin, plus the output cap times the outputs asked
for), and corrected to the actual usage when the request finishes. A request that sets no
output cap gets the one the estimate assumed written into its body, so the worst case
charged is the worst case that can happen.

A request that passes carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
for each per-minute kind that a Tollgate limit applies to, in OpenAI's format: the
tightest counter of that kind (least remaining). They replace the upstream's headers of
the same names; kinds no Tollgate limit covers keep the upstream's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

from proxy.encodings import encoding_ready
from proxy.errors import LedgerUnavailable, RateLimited
from proxy.estimate import estimate_prompt_tokens
from proxy.exchange import Exchange
from proxy.output_cap import output_cap_of
from proxy.policy import Policy
from proxy.ratelimit import gcra
from proxy.ratelimit.limiter import Grant, Limiter
from proxy.ratelimit.rules import FIELD, Check, LimitKind, checks_for
from proxy.ratelimit.store import Acquired, Want
from proxy.spend.admission import INPUT_MARGIN, INPUT_MARGIN_TOKENS, OutputLimits, per_output_cap
from proxy.spend.hold import Admission, ledger_down, new_ledger_id

log = logging.getLogger("tollgate.limits")

HEADER_NAME = "x-tollgate-ratelimit-name"
# Nothing says when a request in flight ends: a client is told to try again in a second.
IN_FLIGHT_RETRY_S = 1


async def throttle(
    limiter: Limiter, ex: Exchange, policy: Policy, payload: dict[str, Any], limits: OutputLimits, admission: Admission
) -> Admission:
    """`admission` with the request's `Grant` and headers, or raise the refusal."""
    rules = policy.settings.limits
    if not rules:
        return admission
    model = ex.upstream_model or ex.requested_model or ""
    checks = checks_for(rules, ex.key_name, ex.user, model, ex.team)
    if not checks:
        return admission
    tokens, cap_override = 0, admission.cap_override
    if any(c.kind == "tokens" for c in checks):
        tokens, cap_override = await _worst_case_tokens(ex, policy, payload, limits, admission, model)
    wants = [Want(c.id, c.kind, c.limit, tokens if c.kind == "tokens" else 1) for c in checks]
    grant_id = new_ledger_id(ex.request_id)
    try:
        got = await limiter.acquire(grant_id, wants)
    except Exception as exc:
        if not ledger_down(exc):
            raise
        mode = policy.settings.ledger.on_unavailable
        limiter.count_unavailable(mode)
        if mode == "fail_closed":
            log.error("ledger unavailable, refusing %s (rate limits, fail_closed): %s", ex.request_id, exc)
            raise LedgerUnavailable(
                "Rate limits apply to this request but the ledger that keeps them is unavailable, so it "
                "was not sent upstream. Retry shortly.",
                headers={"retry-after": "2"},
            ) from exc
        log.warning("ledger unavailable, admitting %s without rate limits (fail_open): %s", ex.request_id, exc)
        return dataclasses.replace(admission, cap_override=cap_override)
    headers = ratelimit_headers(checks, got.levels)
    if not got.ok:
        assert got.refused is not None
        check = checks[got.refused]
        limiter.metrics.refused.labels(check.name, check.kind).inc()
        raise _refusal(check, got, tokens, headers)
    grant = Grant(
        grant_id,
        slots=tuple(c.id for c in checks if c.kind == "in_flight"),
        tokens=tuple((c.id, c.limit, tokens) for c in checks if c.kind == "tokens"),
    )
    limiter.holding(grant)
    return dataclasses.replace(
        admission, grant=grant, cap_override=cap_override, headers={**admission.headers, **headers}
    )


async def _worst_case_tokens(
    ex: Exchange, policy: Policy, payload: dict[str, Any], limits: OutputLimits, admission: Admission, model: str
) -> tuple[int, tuple[str, int] | None]:
    """The most tokens the request can use (as budgets reserve), and the cap to write."""
    oc = output_cap_of(ex.endpoint, ex.upstream_kind or "openai", payload)
    cap, write_cap = per_output_cap(policy, limits, oc)
    cap_override = admission.cap_override
    if cap_override is not None:
        cap, write_cap = cap_override[1], False  # admission already holds the request to it
    await encoding_ready(model)
    prompt = estimate_prompt_tokens(ex.endpoint, payload, model)
    tokens = math.ceil(prompt * INPUT_MARGIN) + INPUT_MARGIN_TOKENS
    if oc is not None:
        tokens += cap * oc.outputs
        if write_cap:
            cap_override = (oc.field, cap)
            ex.output_cap = cap
    return tokens, cap_override


def ratelimit_headers(checks: Sequence[Check], levels: Sequence[int]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for each per-minute kind: its tightest counter."""
    out: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        tightest: tuple[int, int, int] | None = None  # remaining, limit, debt
        for c, level in zip(checks, levels, strict=True):
            if c.kind != kind:
                continue
            left = gcra.remaining(level, c.limit)
            if tightest is None or (left, c.limit) < tightest[:2]:
                tightest = (left, c.limit, level)
        if tightest is not None:
            left, limit, debt = tightest
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(left)
            out[f"x-ratelimit-reset-{kind}"] = gcra.duration_text(gcra.reset_ms(debt, limit))
    return out


_UNIT: dict[LimitKind, str] = {"requests": "requests per minute", "tokens": "tokens per minute", "in_flight": "requests in flight"}


def _refusal(check: Check, got: Acquired, tokens: int, headers: dict[str, str]) -> RateLimited:
    assert got.refused is not None
    level = got.levels[got.refused]
    what = f"Rate limit {check.describe()} reached: it allows {check.limit} {_UNIT[check.kind]}"
    headers = {**headers, HEADER_NAME: check.name}
    retry: int | None = IN_FLIGHT_RETRY_S
    if check.kind == "in_flight":
        message = f"{what}, and {level} are running. Retry when one of them has finished."
    else:
        cost = tokens if check.kind == "tokens" else 1
        wait = gcra.wait_ms(level, cost, check.limit)
        if wait is None:
            retry = None
            message = (
                f"{what}, and this request may use up to {cost} tokens (the prompt's estimate plus its "
                "output cap), more than the limit itself: it can never be admitted. Lower max_tokens "
                "or shorten the prompt."
            )
        else:
            retry = gcra.retry_after_s(wait)
            needs = f" and this request may use up to {cost}" if check.kind == "tokens" else ""
            message = (
                f"{what}; {gcra.remaining(level, check.limit)} are left now{needs}. "
                f"Retry in {gcra.duration_text(wait)}."
            )
    if retry is not None:
        headers["retry-after"] = str(retry)
    return RateLimited(message, code=f"{FIELD[check.kind]}_exceeded", headers=headers)

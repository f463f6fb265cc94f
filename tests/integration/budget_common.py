"""One priced chat request and the `tollgate serve` config around it, shared by the tests
that run budgets through real server processes (test_budget_durability.py,
test_budget_race.py).

Every request is capped at CAP output tokens of `gpt-test` ($1000 per 1M output tokens,
input free), and the upstream always bills the full cap: each request costs exactly
COST, which is also its worst case, so what a budget admits is exact.
"""

from __future__ import annotations

from decimal import Decimal

from tests.support.fake_upstream import Reply

CAP = 25
COST = Decimal("0.025")  # 25 output tokens at $0.001
BODY = {"model": "gpt-test", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": CAP}


def capped_reply(reply_id: str, delay: float = 0.0) -> Reply:
    """A chat completion that used all CAP output tokens; its headers wait `delay` s."""
    r = Reply.json(
        {
            "id": reply_id,
            "object": "chat.completion",
            "created": 1750000000,
            "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": CAP, "total_tokens": 9 + CAP},
        }
    )
    r.headers_delay = delay
    return r


def serve_config(upstream: str, sections: str, wait_s: int = 60) -> str:
    """A `tollgate serve` config for the races: `gpt-*` to `upstream`, no metrics port, no
    access log, upstream waits of `wait_s` (the upstream holds every admitted request open),
    then `sections` (the YAML of the rules under test, and the `ledger:` entry)."""
    return f"""
server: {{host: 127.0.0.1, port: 0}}
timeouts: {{connect: 2, first_byte: {wait_s}, idle: {wait_s}}}
upstreams:
  openai: {{kind: openai, base_url: "{upstream}", api_key: sk-upstream}}
routes:
  - {{models: ["gpt-*"], upstream: openai}}
metrics: {{enabled: false}}
logging: {{access_log: false}}
{sections}
"""


def budget_config(upstream: str, budget: str, limit_usd: int, ledger: str) -> str:
    """A config with one `period: total` budget; `ledger` is the whole `ledger:` entry."""
    return serve_config(upstream, f"""pricing:
  models:
    gpt-test: {{input: 0, output: 1000}}
budgets:
  - name: {budget}
    period: total
    limit_usd: {limit_usd}
{ledger}""")

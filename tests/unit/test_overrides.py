"""TOLLGATE_* variables and flags set the keys a container needs without forking the YAML:
a flag wins over its variable, both over the file, and errors say which one set the value."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config_file import OVERRIDABLE, Override, collect_overrides, load_settings
from proxy.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "config" / "tollgate.yaml"


def test_variables_override_the_file() -> None:
    env = {
        "TOLLGATE_METRICS_HOST": "0.0.0.0",
        "TOLLGATE_METRICS_PORT": "9999",
        "TOLLGATE_LOG_LEVEL": "DEBUG",
        "TOLLGATE_LEDGER_PATH": "/var/lib/tollgate/ledger.db",
        "TOLLGATE_LEDGER_BACKEND": "sqlite",
        "TOLLGATE_PORT": "8181",
    }
    s = load_settings(DEFAULT_CONFIG, env={}, overrides=collect_overrides({}, env))
    assert (s.metrics.host, s.metrics.port, s.logging.level) == ("0.0.0.0", 9999, "debug")
    assert str(s.ledger.path) == "/var/lib/tollgate/ledger.db" and s.ledger.backend == "sqlite"
    assert s.server.port == 8181


def test_a_flag_wins_over_its_variable_and_empty_variables_are_unset() -> None:
    env = {"TOLLGATE_METRICS_PORT": "9999", "TOLLGATE_LOG_LEVEL": "  "}
    found = collect_overrides({"--metrics-port": 7777, "--host": None}, env)
    assert found == (Override("metrics.port", 7777, "--metrics-port"),)
    s = load_settings(DEFAULT_CONFIG, env={}, overrides=found)
    assert s.metrics.port == 7777 and s.logging.level == "info"


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("TOLLGATE_METRICS_PORT", "70000", "metrics.port: 70000 must be between 1 and 65535"),
        ("TOLLGATE_LOG_LEVEL", "loud", "logging.level: 'loud' must be"),
        ("TOLLGATE_LEDGER_BACKEND", "postgres", "ledger.backend: 'postgres' must be"),
    ],
)
def test_a_bad_value_names_the_key_the_value_and_the_variable(variable: str, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(DEFAULT_CONFIG, env={}, overrides=collect_overrides({}, {variable: value}))
    (line,) = info.value.problems
    assert line.startswith(problem) and line.endswith(f"(set by {variable})"), line


def test_every_override_is_a_serve_flag_and_in_the_readme() -> None:
    from proxy.__main__ import build_parser

    help_text = build_parser("serve").parse_args(["serve"]).__dict__
    readme = (REPO / "README.md").read_text()
    for path, flag, variable in OVERRIDABLE:
        assert flag[2:].replace("-", "_") in help_text, flag
        assert f"`{variable}`" in readme and f"`{flag}" in readme, (path, variable)


def test_check_config_checks_with_the_variables(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOLLGATE_")}
    ok = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(DEFAULT_CONFIG)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(DEFAULT_CONFIG)],
        env={**env, "TOLLGATE_METRICS_PORT": "nope"}, capture_output=True, text=True, timeout=60, check=False,
    )
    assert bad.returncode == 2
    assert "metrics.port: 'nope'" in bad.stderr and "(set by TOLLGATE_METRICS_PORT)" in bad.stderr

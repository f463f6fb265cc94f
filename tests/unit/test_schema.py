"""`tollgate schema`: the config's JSON schema, generated from the models in proxy/settings.py.

It must not drift from the loader: every key a model accepts is a property of the schema,
unknown keys are refused by it as by the loader, the shipped configs validate against it,
each points at it with a `# yaml-language-server:` line, and the copy shipped in the repo
is exactly what the command prints.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.config_file import parse_settings
from proxy.config_schema import _sections, config_json_schema
from proxy.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SHIPPED = [
    REPO / "config" / "tollgate.yaml",
    *sorted((REPO / "config" / "examples").glob("*.yaml")),
    *sorted((REPO / "deploy").glob("*.yaml")),
]
SCHEMA_FILE = REPO / "config" / "tollgate.schema.json"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    s = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(s)
    return s


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema)


def test_every_key_of_every_section_is_in_the_schema(schema: dict[str, Any]) -> None:
    models = _sections(Settings, {})
    assert {"Settings", "ServerSettings", "VirtualKey", "BudgetRule", "BudgetScope", "LedgerSettings"} <= set(models)
    for name, model in models.items():
        definition = schema if name == "Settings" else schema["$defs"][name]
        assert set(definition["properties"]) == set(model.model_fields), name
        assert set(definition.get("required", ())) == {
            k for k, f in model.model_fields.items() if f.is_required()
        }, name
        # Unknown keys are errors in the loader (extra="forbid"): in the schema too.
        assert model.model_config.get("extra") == "forbid", name
        assert definition["additionalProperties"] is False, name


def test_the_shipped_configs_validate_and_point_at_the_schema(schema: dict[str, Any]) -> None:
    assert len(SHIPPED) >= 4
    for path in SHIPPED:
        text = path.read_text()
        first = text.splitlines()[0]
        m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert m, f"{path}: first line {first!r}"
        assert (path.parent / m.group(1)).resolve() == SCHEMA_FILE, path
        errors = [e.message for e in _validator(schema).iter_errors(yaml.safe_load(text))]
        assert not errors, f"{path}: {errors}"


def test_the_shipped_schema_file_is_what_the_command_prints() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "schema"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == config_json_schema()
    assert json.loads(SCHEMA_FILE.read_text()) == json.loads(out), (
        "config/tollgate.schema.json is stale: .venv/bin/tollgate schema > config/tollgate.schema.json"
    )


GOOD = """
server: {port: 8081, allow_anonymous: false}
upstreams:
  openai: {base_url: "https://api.openai.com/v1", api_key: "${OPENAI_API_KEY:-}"}
  local: {kind: llamacpp, base_url: "http://127.0.0.1:8081", max_connections: "${MAXC:-8}"}
routes:
  - {models: "gpt-*", upstream: openai}
  - {models: ["local"], upstream: local, model: gemma}
pricing:
  models:
    "local/*": 0
    "gpt-x": {input: "1.25", output: 10}
metrics:
logging: {level: debug, payloads: truncated}
keys:
  - {name: a, key_sha256: "%s", metadata: {team: search}}
budgets:
  - {name: b, scope: {key: a}, period: daily, limit_usd: "5.00", thresholds: [0.5]}
ledger: {backend: sqlite, path: x.db}
""" % ("0" * 64)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"server": {"colour": "red"}}, "colour"),
        ({"server": {"port": 70000}}, "70000"),
        ({"logging": {"level": "loud"}}, "loud"),
        ({"budgets": [{"name": "b", "period": "fortnightly", "limit_usd": 1}]}, "fortnightly"),
        ({"keys": [{"name": "a", "key_sha256": "nothex"}]}, "nothex"),
        ({"pricing": {"models": {"m": {"input": 1}}}}, "output"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(schema: dict[str, Any], change: dict[str, Any], where: str) -> None:
    env = {"OPENAI_API_KEY": "", "MAXC": "8"}
    data = yaml.safe_load(GOOD)
    parse_settings(GOOD, env)  # the base document is one the loader takes
    assert not list(_validator(schema).iter_errors(data))
    bad = {**data, **change}
    errors = list(_validator(schema).iter_errors(bad))
    assert errors, change
    with pytest.raises(Exception, match=re.escape(where)):
        parse_settings(yaml.safe_dump(bad), env)


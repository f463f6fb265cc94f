"""proxy.settings: YAML -> frozen Settings, interpolation, error messages, route lookup."""

from __future__ import annotations

import fnmatch
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.config_base import is_glob
from proxy.config_file import load_settings, parse_settings
from proxy.errors import ConfigError
from proxy.settings import ResolvedRoute, Settings

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "config" / "tollgate.yaml"
EXAMPLES = sorted((REPO / "config" / "examples").glob("*.yaml"))

MINIMAL = """
upstreams:
  openai:
    base_url: https://api.openai.com/v1
  llamacpp:
    kind: llamacpp
    base_url: http://127.0.0.1:8081
routes:
  - models: ["gpt-*"]
    upstream: openai
default_upstream: llamacpp
"""


def parse(text: str, env: dict[str, str] | None = None) -> Settings:
    return parse_settings(textwrap.dedent(text), env or {})


def problems_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, env)
    assert info.value.problems, "a ConfigError must list at least one problem"
    return info.value.problems


def only_problem(text: str, env: dict[str, str] | None = None) -> str:
    problems = problems_of(text, env)
    assert len(problems) == 1, problems
    return problems[0]


def with_route(extra: str) -> str:
    """MINIMAL plus `extra` (a YAML list item) at the end of its routes."""
    return MINIMAL.replace("default_upstream:", extra + "default_upstream:")


def with_upstream(extra: str) -> str:
    """MINIMAL's llamacpp upstream plus `extra` lines under it (indented 4)."""
    return MINIMAL.replace(
        "    base_url: http://127.0.0.1:8081\n",
        "    base_url: http://127.0.0.1:8081\n" + textwrap.indent(textwrap.dedent(extra), "    "),
    )


# --------------------------------------------------------------------------- shipped files


def test_default_config_loads_unedited_with_empty_env() -> None:
    s = load_settings(DEFAULT_CONFIG, env={})
    assert set(s.upstreams) == {"openai", "llamacpp"}
    openai, llama = s.upstreams["openai"], s.upstreams["llamacpp"]
    assert openai.kind == "openai" and openai.api_base == "https://api.openai.com/v1"
    assert openai.api_key is None  # the client's Authorization passes through
    assert llama.kind == "llamacpp"
    assert llama.api_base == "http://127.0.0.1:8081/v1"
    assert llama.root_url == "http://127.0.0.1:8081"
    assert s.default_upstream == "llamacpp"
    assert s.server.host == "127.0.0.1" and s.server.port == 8080
    assert s.metrics.port == 9464 and s.metrics.path == "/metrics"
    assert s.admin.api_key is None


@pytest.mark.parametrize(
    "model",
    [
        "gpt-5-nano",
        "gpt-5-nano-2025-08-07",
        "gpt-4o-mini",
        "o1",
        "o3-mini",
        "o4-mini",
        "chatgpt-4o-latest",
        "text-embedding-3-small",
        "omni-moderation-latest",
        "babbage-002",
        "ft:gpt-4o-mini:org::abc",
    ],
)
def test_default_config_routes_openai_models_to_openai(model: str) -> None:
    route = load_settings(DEFAULT_CONFIG, env={}).route_for(model)
    assert route is not None
    assert route.upstream == "openai" and route.upstream_model == model
    assert not route.matched_default


@pytest.mark.parametrize("model", ["models/gemma-3-270m-q4_k_m.gguf", "openchat-3.5", "qwen2.5"])
def test_default_config_sends_everything_else_to_llamacpp(model: str) -> None:
    route = load_settings(DEFAULT_CONFIG, env={}).route_for(model)
    assert route == ResolvedRoute("llamacpp", model, "other", None, True)


def test_default_config_takes_keys_and_urls_from_env() -> None:
    env = {"OPENAI_API_KEY": "sk-test-123", "LLAMACPP_BASE_URL": "http://gpu:9000/v1"}
    s = load_settings(DEFAULT_CONFIG, env=env)
    key = s.upstreams["openai"].api_key
    assert key is not None and key.get_secret_value() == "sk-test-123"
    assert s.upstreams["llamacpp"].root_url == "http://gpu:9000"
    # Listening everywhere is fine while no key of Tollgate's own goes upstream
    # (tests/unit/test_exposure.py has the case where it does).
    assert load_settings(DEFAULT_CONFIG, env={"TOLLGATE_HOST": "0.0.0.0"}).server.host == "0.0.0.0"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    s = load_settings(path, env={})
    assert s.upstreams


def test_there_are_two_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"llamacpp-only.yaml", "aliases.yaml"}


def test_alias_example_rewrites_and_has_no_default() -> None:
    s = load_settings(REPO / "config" / "examples" / "aliases.yaml", env={})
    fast = s.route_for("fast")
    assert fast is not None and fast.upstream_model == "gpt-5-nano" and fast.route_label == "fast"
    assert s.route_for("no-such-model") is None


def test_load_settings_reads_process_env_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-process")
    key = load_settings(DEFAULT_CONFIG).upstreams["openai"].api_key
    assert key is not None and key.get_secret_value() == "sk-from-process"


# --------------------------------------------------------------------------- interpolation

INTERP = """
upstreams:
  u:
    base_url: {url}
    headers:
      X-Test: "{header}"
default_upstream: u
"""


def header_after(template: str, env: dict[str, str]) -> str:
    s = parse(INTERP.format(url="http://h", header=template), env)
    return s.upstreams["u"].headers["X-Test"]


@pytest.mark.parametrize(
    ("template", "env", "expected"),
    [
        ("${V}", {"V": "set"}, "set"),
        ("a-${V}-b", {"V": "x"}, "a-x-b"),
        ("${V}", {"V": ""}, ""),  # set but empty, no default: empty
        ("${V:-dflt}", {}, "dflt"),  # unset -> default
        ("${V:-dflt}", {"V": ""}, "dflt"),  # empty -> default, as in the shell
        ("${V:-dflt}", {"V": "real"}, "real"),
        ("${V:-}", {}, ""),
        ("${V:-http://h:1/x}", {}, "http://h:1/x"),  # ':' inside a default
        ("$$", {}, "$"),
        ("$${V}", {"V": "no"}, "${V}"),  # escaped: not a reference
        ("cost $5", {}, "cost $5"),  # a lone $ is literal
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
    ],
)
def test_interpolation(template: str, env: dict[str, str], expected: str) -> None:
    assert header_after(template, env) == expected


def test_unset_variable_without_default_names_variable_and_key_path() -> None:
    problem = only_problem(INTERP.format(url="${UPSTREAM_URL}", header="x"))
    assert problem.startswith("upstreams.u.base_url: ")
    assert "UPSTREAM_URL" in problem and "not set" in problem


def test_unset_variables_are_all_reported_with_list_indexes() -> None:
    problems = problems_of(
        """
        upstreams:
          u: {base_url: "${A}"}
        routes:
          - models: ["x", "${B}"]
            upstream: u
        """
    )
    assert any(p.startswith("upstreams.u.base_url:") and " A " in p for p in problems)
    assert any(p.startswith("routes[0].models[1]:") and " B " in p for p in problems)


@pytest.mark.parametrize("template", ["${1X}", "${V-dflt}", "${}", "${V:-${W}}", "${V"])
def test_malformed_references_are_problems(template: str) -> None:
    problem = only_problem(INTERP.format(url="http://h", header=template))
    assert problem.startswith("upstreams.u.headers.X-Test: ")


def test_keys_are_never_interpolated() -> None:
    text = INTERP.format(url="http://h", header="x") + "pricing:\n  models:\n    m-${V}: 0\n"
    s = parse(text, {"V": "no"})
    assert list(s.pricing.models) == ["m-${V}"]


def test_interpolated_numbers_and_booleans_are_coerced() -> None:
    s = parse(
        """
        server:
          port: ${PORT:-9000}
        upstreams:
          u:
            base_url: http://h
            inject_stream_usage: ${INJECT:-false}
        default_upstream: u
        """,
        {"PORT": ""},
    )
    assert s.server.port == 9000
    assert s.upstreams["u"].inject_stream_usage is False


# --------------------------------------------------------------------------- bad configs

BAD_CASES = [
    pytest.param(
        MINIMAL + "colour: red\n",
        ["colour: unknown key"],
        id="unknown-top-level-key",
    ),
    pytest.param(
        MINIMAL + "server:\n  colour: red\n",
        ["server.colour: unknown key", "known: host, port"],
        id="unknown-nested-key",
    ),
    pytest.param(
        MINIMAL + "server:\n  port: 70000\n",
        ["server.port: 70000 must be between 1 and 65535"],
        id="bad-port",
    ),
    pytest.param(
        MINIMAL + "metrics:\n  port: -1\n",
        ["metrics.port: -1 must be between 1 and 65535"],
        id="negative-metrics-port",
    ),
    pytest.param(
        MINIMAL.replace("https://api.openai.com/v1", "ftp://x"),
        ["upstreams.openai.base_url: 'ftp://x' is not an http(s) URL"],
        id="bad-url-scheme",
    ),
    pytest.param(
        MINIMAL.replace("https://api.openai.com/v1", "http://h/v1?x=1"),
        ["upstreams.openai.base_url: 'http://h/v1?x=1' must not have a query"],
        id="url-with-query",
    ),
    pytest.param(
        MINIMAL + "timeouts:\n  connect: -5\n",
        ["timeouts.connect: -5 must be greater than 0"],
        id="negative-timeout",
    ),
    pytest.param(
        with_upstream("timeouts:\n  idle: 0\n"),
        ["upstreams.llamacpp.timeouts.idle: 0 must be greater than 0"],
        id="zero-upstream-timeout",
    ),
    pytest.param(
        MINIMAL.replace("upstream: openai", "upstream: nope"),
        ["routes[0].upstream: 'nope' is not a configured upstream (have: openai, llamacpp)"],
        id="route-to-unknown-upstream",
    ),
    pytest.param(
        MINIMAL.replace("default_upstream: llamacpp", "default_upstream: gone"),
        ["default_upstream: 'gone' is not a configured upstream (have: openai, llamacpp)"],
        id="unknown-default-upstream",
    ),
    pytest.param(
        MINIMAL.replace("kind: llamacpp", "kind: vllm"),
        ["upstreams.llamacpp.kind: 'vllm' must be 'openai', 'llamacpp' or 'azure'"],
        id="bad-kind",
    ),
    pytest.param(
        MINIMAL + "pricing:\n  unpriced: maybe\n",
        ["pricing.unpriced: 'maybe' must be 'allow' or 'refuse'"],
        id="bad-unpriced",
    ),
    pytest.param(
        MINIMAL + "pricing:\n  models:\n    gpt-x: {input: -1, output: 2}\n",
        ["pricing.models.gpt-x.input: -1 must be >= 0"],
        id="negative-price",
    ),
    pytest.param(
        MINIMAL + "pricing:\n  models:\n    'gpt-4.1': {input: cheap, output: 2}\n",
        ["pricing.models['gpt-4.1'].input: 'cheap' is not a price"],
        id="non-numeric-price",
    ),
    pytest.param(
        MINIMAL + "pricing:\n  models:\n    m: {input: 1}\n",
        ["pricing.models.m.output: required"],
        id="price-missing-output",
    ),
    pytest.param(
        MINIMAL + "pricing:\n  models:\n    m: {input: .nan, output: 1}\n",
        ["pricing.models.m.input: nan is not a finite price"],
        id="nan-price",
    ),
    pytest.param(
        with_upstream("max_connections: lots\n"),
        ["upstreams.llamacpp.max_connections: 'lots' must be a valid integer"],
        id="non-integer",
    ),
    pytest.param(
        MINIMAL + "routes_: []\n",
        ["routes_: unknown key, did you mean 'routes'?"],
        id="typo-suggestion",
    ),
    pytest.param(
        MINIMAL.replace("  - models: [\"gpt-*\"]\n", "  - models: []\n"),
        ["routes[0].models: [] must list at least one"],
        id="empty-route-models",
    ),
    pytest.param(
        MINIMAL.replace("upstreams:\n", "upstreams:\n  'bad name!':\n    base_url: http://x\n"),
        ["upstreams['bad name!']: 'bad name!' is not a valid upstream name"],
        id="bad-upstream-name",
    ),
    pytest.param(
        "upstreams: {}\ndefault_upstream: x\n",
        ["upstreams: {} must configure at least one upstream"],
        id="no-upstreams",
    ),
    pytest.param(
        "server: {port: 1}\n",
        ["upstreams: required"],
        id="missing-upstreams",
    ),
    pytest.param(
        MINIMAL + "metrics:\n  path: metrics\n",
        ["metrics.path: 'metrics' must start with '/'"],
        id="metrics-path",
    ),
    pytest.param(
        MINIMAL + "server:\n  host: '  '\n",
        ["server.host: '  ' must not be empty"],
        id="empty-host",
    ),
    pytest.param(
        MINIMAL + "logging:\n  level: loud\n",
        ["logging.level: 'loud' must be 'debug', 'info', 'warning' or 'error'"],
        id="bad-log-level",
    ),
    pytest.param(
        with_upstream("headers:\n  Content-Length: '5'\n"),
        ["upstreams.llamacpp.headers: 'Content-Length' is set by the proxy itself"],
        id="managed-header",
    ),
    pytest.param(
        MINIMAL + "server: [1, 2]\n",
        ["server: [1, 2] must be a mapping"],
        id="section-not-mapping",
    ),
    pytest.param(
        with_route("  - models: [\"gpt-*\"]\n    upstream: llamacpp\n"),
        ["routes[1].models[0]: 'gpt-*' is already routed by routes[0].models[0]"],
        id="duplicate-route-pattern",
    ),
    pytest.param(
        MINIMAL + "metrics:\n  port: 8080\n",
        ["metrics.port: 8080 is also server.port"],
        id="metrics-port-clash",
    ),
    pytest.param(
        MINIMAL.replace(
            "routes:\n  - models: [\"gpt-*\"]\n    upstream: openai\n", ""
        ).replace("default_upstream: llamacpp", "default_upstream: null"),
        ["routes: [] and no default_upstream"],
        id="nothing-routable",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_bad_config_names_key_path_and_value(text: str, expected: list[str]) -> None:
    problem = only_problem(text)
    for fragment in expected:
        assert fragment in problem


def test_every_problem_is_reported_at_once() -> None:
    problems = problems_of(
        MINIMAL
        + "server:\n  port: 0.5\n  colour: red\ntimeouts:\n  idle: -1\npricing:\n  unpriced: x\n"
    )
    paths = sorted(p.split(":")[0] for p in problems)
    assert paths == ["pricing.unpriced", "server.colour", "server.port", "timeouts.idle"]


def test_error_carries_source_and_formats_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "server:\n  port: 70000\n  colour: red\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.source == str(path)
    text = str(info.value)
    assert str(path) in text
    assert "\n  - server.port: 70000" in text and "\n  - server.colour: unknown key" in text


def test_yaml_syntax_error_reports_line() -> None:
    problem = only_problem("upstreams:\n  u:\n    base_url: [http://x\nrouting: 1\n")
    assert problem.startswith("YAML error at line 4, column 8: ")


def test_yaml_syntax_error_line_is_exact() -> None:
    problem = only_problem("server:\n  port: 1\n bad: indentation\n")
    assert problem.startswith("YAML error at line 3,")


def test_duplicate_key_is_an_error_naming_both_lines() -> None:
    text = "upstreams:\n  u: {base_url: http://a}\n  u: {base_url: http://b}\ndefault_upstream: u\n"
    problem = only_problem(text)
    assert "line 3" in problem and "duplicate key 'u'" in problem and "line 2" in problem


def test_yaml_merge_keys_still_work() -> None:
    s = parse(
        """
        upstreams:
          a: &base {kind: llamacpp, base_url: "http://a", max_connections: 4}
          b:
            <<: *base
            base_url: "http://b"
        default_upstream: a
        """
    )
    assert s.upstreams["b"].kind == "llamacpp" and s.upstreams["b"].max_connections == 4
    assert s.upstreams["b"].root_url == "http://b"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("- a\n- b\n", "(top level): ['a', 'b'] is a list, expected a mapping"),
        ("just a string\n", "(top level): 'just a string' is a str, expected a mapping"),
        ("", "(top level): the document is empty"),
        ("# only a comment\n", "(top level): the document is empty"),
    ],
)
def test_document_that_is_not_a_mapping(text: str, fragment: str) -> None:
    assert fragment in only_problem(text)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing, env={})
    assert info.value.problems == [f"file not found: {missing}"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path, env={})
    assert info.value.problems[0].startswith(f"cannot read {tmp_path}")


# --------------------------------------------------------------------------- values


def test_frozen_top_level_and_nested() -> None:
    s = parse(MINIMAL)
    with pytest.raises(ValidationError):
        s.default_upstream = "openai"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.server.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.upstreams["openai"].base_url = "http://evil"  # type: ignore[misc]
    assert isinstance(s.routes, tuple) and isinstance(s.routes[0].models, tuple)


def test_defaults() -> None:
    s = parse(MINIMAL)
    assert s.server.max_body_bytes == 20 * 1024 * 1024
    assert s.server.request_id_header == "x-request-id"
    assert (s.timeouts.connect, s.timeouts.first_byte, s.timeouts.idle) == (10, 120, 120)
    assert s.upstreams["openai"].max_connections == 100
    assert s.pricing.unpriced == "allow" and s.pricing.models == {}
    assert s.metrics.enabled is True
    assert s.logging.level == "info" and s.logging.payloads == "off"
    assert s.logging.access_log is True and s.logging.payload_max_chars == 1000


def test_null_sections_mean_defaults() -> None:
    s = parse(MINIMAL + "pricing:\nlogging:\nserver:\n  port:\n")
    assert s.pricing.unpriced == "allow" and s.logging.level == "info" and s.server.port == 8080


def test_request_id_header_is_lowercased() -> None:
    s = parse(MINIMAL + "server:\n  request_id_header: X-Request-ID\n")
    assert s.server.request_id_header == "x-request-id"


@pytest.mark.parametrize("value", ["off", "'off'", "false"])
def test_yaml_bare_off_means_payloads_off(value: str) -> None:
    assert parse(MINIMAL + f"logging:\n  payloads: {value}\n").logging.payloads == "off"


def test_log_level_is_case_insensitive() -> None:
    assert parse(MINIMAL + "logging:\n  level: DEBUG\n").logging.level == "debug"


@pytest.mark.parametrize(
    ("base_url", "api_base", "root_url"),
    [
        ("http://127.0.0.1:8081", "http://127.0.0.1:8081/v1", "http://127.0.0.1:8081"),
        ("http://127.0.0.1:8081/", "http://127.0.0.1:8081/v1", "http://127.0.0.1:8081"),
        ("http://127.0.0.1:8081/v1", "http://127.0.0.1:8081/v1", "http://127.0.0.1:8081"),
        ("http://127.0.0.1:8081/v1/", "http://127.0.0.1:8081/v1", "http://127.0.0.1:8081"),
        ("https://h/llama/v1", "https://h/llama/v1", "https://h/llama"),
    ],
)
def test_llamacpp_base_url_with_and_without_v1(base_url: str, api_base: str, root_url: str) -> None:
    up = parse(MINIMAL.replace("http://127.0.0.1:8081", base_url)).upstreams["llamacpp"]
    assert (up.api_base, up.root_url) == (api_base, root_url)


def test_openai_base_url_is_kept_as_given() -> None:
    text = MINIMAL.replace("https://api.openai.com/v1", "https://proxy.example/openai/v1/")
    up = parse(text).upstreams["openai"]
    assert up.api_base == "https://proxy.example/openai/v1"
    assert up.root_url == "https://proxy.example/openai"


def test_inject_stream_usage_defaults_per_kind_and_explicit_wins() -> None:
    s = parse(MINIMAL)
    assert s.upstreams["openai"].inject_stream_usage is True
    assert s.upstreams["llamacpp"].inject_stream_usage is False
    text = with_upstream("inject_stream_usage: true\n").replace(
        "api.openai.com/v1\n", "api.openai.com/v1\n    inject_stream_usage: false\n"
    )
    s = parse(text)
    assert s.upstreams["openai"].inject_stream_usage is False
    assert s.upstreams["llamacpp"].inject_stream_usage is True


def test_kind_defaults_to_openai() -> None:
    assert parse(MINIMAL).upstreams["openai"].kind == "openai"


def test_secrets_never_appear_in_repr_or_str() -> None:
    s = parse(
        with_upstream("api_key: sk-llama-SECRET\n") + "admin:\n  api_key: ${ADMIN}\n",
        {"ADMIN": "admin-SECRET"},
    )
    for text in (repr(s), str(s), repr(s.upstreams["llamacpp"]), repr(s.admin)):
        assert "SECRET" not in text
    key = s.upstreams["llamacpp"].api_key
    assert key is not None and key.get_secret_value() == "sk-llama-SECRET"
    admin = s.admin.api_key
    assert admin is not None and admin.get_secret_value() == "admin-SECRET"


def test_wrongly_typed_secret_is_not_echoed_in_error() -> None:
    problem = only_problem(with_upstream("api_key: [sk-SECRET]\n"))
    assert problem.startswith("upstreams.llamacpp.api_key: ") and "SECRET" not in problem


@pytest.mark.parametrize("value", ["''", "'   '", "${NOPE:-}"])
def test_empty_api_key_is_none(value: str) -> None:
    assert parse(with_upstream(f"api_key: {value}\n")).upstreams["llamacpp"].api_key is None


def test_effective_timeouts_merge_override_over_global() -> None:
    text = with_upstream("timeouts:\n  idle: 5\n") + "timeouts:\n  connect: 3\n  first_byte: 60\n"
    s = parse(text)
    t = s.timeouts_for("llamacpp")
    assert (t.connect, t.first_byte, t.idle) == (3, 60, 5)
    t = s.timeouts_for("openai")
    assert (t.connect, t.first_byte, t.idle) == (3, 60, 120)
    assert s.upstreams["llamacpp"].effective_timeouts(s.timeouts) == s.timeouts_for("llamacpp")


def test_headers_are_kept_with_their_case() -> None:
    s = parse(with_upstream("headers:\n  OpenAI-Organization: org-1\n"))
    assert s.upstreams["llamacpp"].headers == {"OpenAI-Organization": "org-1"}


def test_prices_are_exact_decimals() -> None:
    s = parse(
        MINIMAL
        + textwrap.dedent(
            """
            pricing:
              models:
                gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.6}
                "big": {input: 2, output: "10.5", cache_write: 3.75}
                "local*": 0
            """
        )
    )
    m = s.pricing.models
    assert m["gpt-4o-mini"].input == Decimal("0.15")
    assert m["gpt-4o-mini"].cached_input == Decimal("0.075")
    assert m["gpt-4o-mini"].output == Decimal("0.6")
    assert m["gpt-4o-mini"].cache_write is None
    assert m["big"].output == Decimal("10.5") and m["big"].cache_write == Decimal("3.75")
    assert m["local*"].input == Decimal(0) and m["local*"].output == Decimal(0)
    assert all(isinstance(v, Decimal) for v in (m["big"].input, m["local*"].output))
    assert list(m) == ["gpt-4o-mini", "big", "local*"]  # order kept for glob precedence


def test_boolean_is_not_a_price() -> None:
    problem = only_problem(MINIMAL + "pricing:\n  models:\n    m: {input: true, output: 1}\n")
    assert problem.startswith("pricing.models.m.input: True ")


# --------------------------------------------------------------------------- routing

ROUTING = """
upstreams:
  a: {base_url: "http://a", default_max_tokens: 100}
  b: {base_url: "http://b"}
  c: {kind: llamacpp, base_url: "http://c"}
routes:
  - models: ["gpt-*"]
    upstream: a
  - models: ["gpt-4o-special", "gpt-5*"]
    upstream: b
    default_max_tokens: 7
  - models: [local, "local-*"]
    upstream: c
    model: qwen2.5-7b
  - models: [plain]
    upstream: c
default_upstream: DEFAULT
"""


def routing(default: str = "c") -> Settings:
    return parse(ROUTING.replace("DEFAULT", default))


def test_exact_name_beats_an_earlier_glob() -> None:
    r = routing().route_for("gpt-4o-special")
    assert r == ResolvedRoute("b", "gpt-4o-special", "gpt-4o-special", 7, False)


def test_globs_in_written_order() -> None:
    # "gpt-5x" matches both "gpt-*" (route 0) and "gpt-5*" (route 1): the first wins.
    assert routing().route_for("gpt-5x") == ResolvedRoute("a", "gpt-5x", "gpt-*", 100, False)


def test_alias_rewrite_for_exact_and_glob() -> None:
    s = routing()
    assert s.route_for("local") == ResolvedRoute("c", "qwen2.5-7b", "local", None, False)
    assert s.route_for("local-big") == ResolvedRoute("c", "qwen2.5-7b", "local-*", None, False)


def test_exact_without_alias_keeps_the_name() -> None:
    assert routing().route_for("plain") == ResolvedRoute("c", "plain", "plain", None, False)


def test_default_upstream_takes_the_rest_with_label_other() -> None:
    assert routing("a").route_for("mystery") == ResolvedRoute("a", "mystery", "other", 100, True)


def test_no_default_upstream_means_none() -> None:
    s = routing("null")
    assert s.route_for("mystery") is None
    assert s.route_for("gpt-4o") is not None


def test_globs_are_case_sensitive() -> None:
    r = routing().route_for("GPT-4o")
    assert r is not None and r.matched_default


def test_route_default_max_tokens_overrides_upstream() -> None:
    s = routing()
    assert s.route_for("gpt-4o").default_max_tokens == 100  # type: ignore[union-attr]
    assert s.route_for("gpt-4o-special").default_max_tokens == 7  # type: ignore[union-attr]


def test_exact_model_names_and_models_for_upstream() -> None:
    s = routing()
    assert s.exact_model_names() == ["gpt-4o-special", "local", "plain"]
    assert s.models_for_upstream("c") == ["local", "local-*", "plain"]
    assert s.models_for_upstream("a") == ["gpt-*"]
    assert s.models_for_upstream("nobody") == []


def test_single_string_models_is_one_pattern() -> None:
    s = parse(MINIMAL.replace('models: ["gpt-*"]', "models: gpt-4o"))
    assert s.routes[0].models == ("gpt-4o",)


def test_route_needs_models_and_upstream() -> None:
    problems = problems_of(with_route("  - model: x\n"))
    assert sorted(problems) == ["routes[1].models: required", "routes[1].upstream: required"]


def test_is_glob() -> None:
    assert is_glob("gpt-*") and is_glob("o[0-9]*") and is_glob("m?")
    assert not is_glob("gpt-4o") and not is_glob("models/gemma.gguf")


_NAMES = st.text(alphabet="ab-*?", min_size=1, max_size=4)


@hyp_settings(max_examples=150, deadline=None)
@given(
    patterns=st.lists(_NAMES, min_size=1, max_size=5, unique=True),
    model=st.text(alphabet="ab-", min_size=0, max_size=5),
)
def test_route_for_agrees_with_a_plain_reference(patterns: list[str], model: str) -> None:
    # One route per pattern, upstream u0..un; the reference is the documented rule, spelled out.
    lines = ["upstreams:", "  fallback: {base_url: 'http://f'}"]
    lines += [f"  u{i}: {{base_url: 'http://u{i}'}}" for i in range(len(patterns))]
    lines.append("routes:")
    lines += [f"  - {{models: ['{p}'], upstream: u{i}}}" for i, p in enumerate(patterns)]
    lines.append("default_upstream: fallback")
    s = parse_settings("\n".join(lines), {})

    exact = [i for i, p in enumerate(patterns) if not is_glob(p) and p == model]
    globs = [i for i, p in enumerate(patterns) if is_glob(p) and fnmatch.fnmatchcase(model, p)]
    want = (exact or globs or [None])[0]
    got = s.route_for(model)
    assert got is not None
    if want is None:
        assert (got.upstream, got.route_label, got.matched_default) == ("fallback", "other", True)
    else:
        assert (got.upstream, got.route_label) == (f"u{want}", patterns[want])


def test_a_team_budget_must_name_a_team_some_key_has() -> None:
    """A request's team is its key's metadata.team: a team budget naming a team no key is
    in would never apply, so it is an error naming the key path, the value and the teams."""
    keys = f"""
keys:
  - name: search-prod
    key_sha256: {"a" * 64}
    metadata: {{team: search}}
  - name: ads
    key_sha256: {"b" * 64}
    metadata: {{team: ads, cost_center: "7"}}
"""
    ok = parse(MINIMAL + keys + "budgets:\n  - {name: s, scope: {team: search}, period: daily, limit_usd: 5}\n"
               "  - {name: t, scope: {team: '*'}, period: daily, limit_usd: 5}\n")
    assert [b.scope.team for b in ok.budgets] == ["search", "*"]
    assert only_problem(MINIMAL + keys + "budgets:\n  - {name: s, scope: {team: serch}, period: daily, limit_usd: 5}\n") == (
        "budgets[0].scope.team: 'serch' is not the metadata.team of any configured key (have: ads, search)"
    )

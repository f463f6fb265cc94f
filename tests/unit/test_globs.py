"""Malformed globs in routes, prices, budget scopes, key models and passthrough paths are
config errors naming the key path and the pattern; fnmatch itself would take them as literals."""

from __future__ import annotations

import fnmatch

import pytest

from proxy.config_file import parse_settings
from proxy.errors import ConfigError
from proxy.globs import check_glob

BASE = """
upstreams:
  openai:
    base_url: https://api.openai.com/v1
routes:
  - models: ["gpt-*", "{route}"]
    upstream: openai
pricing:
  models:
    "{price}": 1
keys:
  - name: team
    key_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    models: ["{key}"]
budgets:
  - name: b
    scope: {{model: "{budget}"}}
    period: daily
    limit_usd: 1
passthrough:
  allow_unmetered: ["{path}"]
"""
GOOD = {"route": "o[0-9]*", "price": "gpt-4o*", "key": "gpt-[!3]*", "budget": "o[1-4]*", "path": "/v1/files*"}


def config(**bad: str) -> str:
    return BASE.format(**{**GOOD, **bad})


def test_well_formed_globs_load() -> None:
    assert parse_settings(config(), {}).routes[0].models == ("gpt-*", "o[0-9]*")


@pytest.mark.parametrize(
    ("field", "value", "where"),
    [
        ("route", "gpt-[4", "routes[0].models[1]"),
        ("price", "gpt-[4", "pricing.models"),
        ("key", "gpt-[4o", "keys[0].models[0]"),
        ("budget", "o[1-4", "budgets[0].scope.model"),
        ("path", "/v1/files[", "passthrough.allow_unmetered"),
    ],
)
def test_a_malformed_glob_names_the_key_and_the_value(field: str, value: str, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(config(**{field: value}), {})
    (problem,) = info.value.problems
    assert problem.startswith(where), problem
    assert f"{value!r} is not a valid glob" in problem and "never closed" in problem


@pytest.mark.parametrize("pattern", ["gpt-*", "o[0-9]*", "[]]x", "[!]]x", "a[!b]c", "[[]literal", "plain", "x]y"])
def test_fnmatch_classes_that_close_are_accepted(pattern: str) -> None:
    assert check_glob(pattern) == pattern


@pytest.mark.parametrize("pattern", ["gpt-[4", "[", "[!", "[]", "[!]", "ok[1]-[2"])
def test_unclosed_classes_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="never closed"):
        check_glob(pattern)


def test_why_fnmatch_alone_is_not_enough() -> None:
    # It takes the unclosed class as literal text: gpt-[4 would never match gpt-4.
    assert not fnmatch.fnmatchcase("gpt-4", "gpt-[4") and fnmatch.fnmatchcase("gpt-[4", "gpt-[4")

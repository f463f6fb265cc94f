"""Reading the configuration: YAML in, one frozen, validated `Settings` out (see
proxy/settings.py for the steps and the error form)."""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    SecretStr,
    ValidationError,
)

from proxy.errors import ConfigError
from proxy.settings import Settings

# --------------------------------------------------------------------------- paths


def _format_path(loc: tuple[Any, ...]) -> str:
    """('routes', 2, 'upstream') -> 'routes[2].upstream'; odd keys are quoted."""
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's marker for "the key itself was invalid"
            continue
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "(top level)"


# --------------------------------------------------------------------------- interpolation

_REFERENCE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<body>[^}]*)\}|(?P<open>\{))")
_REFERENCE_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.S)


def _interpolate(
    node: Any, loc: tuple[Any, ...], env: Mapping[str, str], problems: list[str]
) -> Any:
    if isinstance(node, str):
        return _interpolate_string(node, loc, env, problems)
    if isinstance(node, dict):
        return {k: _interpolate(v, (*loc, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, (*loc, i), env, problems) for i, v in enumerate(node)]
    return node


def _interpolate_string(
    text: str, loc: tuple[Any, ...], env: Mapping[str, str], problems: list[str]
) -> str:
    if "$" not in text:
        return text
    path = _format_path(loc)

    def replace(m: re.Match[str]) -> str:
        if m.group("dollar"):
            return "$"
        if m.group("open"):
            problems.append(f"{path}: {text!r} has an unterminated '${{'")
            return ""
        ref = _REFERENCE_BODY.fullmatch(m.group("body"))
        if ref is None:
            problems.append(
                f"{path}: {m.group(0)!r} is not a valid reference"
                " (use ${NAME} or ${NAME:-default})"
            )
            return ""
        name, default = ref.group("name"), ref.group("default")
        if default is not None and "${" in default:
            problems.append(f"{path}: {m.group(0)!r}: nested references are not supported")
            return ""
        value = env.get(name)
        if default is not None and not value:  # `:-` also covers set-but-empty, as in the shell
            return default
        if value is None:
            problems.append(
                f"{path}: environment variable {name} is not set"
                f" (write ${{{name}:-default}} to make it optional)"
            )
            return ""
        return value

    return _REFERENCE.sub(replace, text)


# --------------------------------------------------------------------------- YAML


# libyaml's parser when PyYAML has it: the same nodes, marks and errors, ~7x quicker to read
# the config and price table on the way to readiness.
if TYPE_CHECKING:
    _SafeLoader = yaml.SafeLoader
else:
    _SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges may legitimately be overridden by explicit keys
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:
                continue  # unhashable key: the base class reports it
            if seen is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {seen + 1})",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> tuple[Any, list[str]]:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader), []  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        return None, [f"YAML error at {where}: {what}"]
    except yaml.YAMLError as exc:
        return None, [f"YAML error: {exc}"]


# --------------------------------------------------------------------------- translation


def _unwrap(tp: Any) -> Any:
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model that holds the key at `loc` (for "unknown key" hints)."""
    tp: Any = Settings
    for part in loc[:-1]:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return []
            tp = field.annotation
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def _show(value: Any, loc: tuple[Any, ...]) -> str:
    if "api_key" in loc or isinstance(value, SecretStr):
        return "'***'"  # a wrongly typed secret is still a secret
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(error: Mapping[str, Any]) -> str:
    loc: tuple[Any, ...] = tuple(error["loc"])
    kind: str = error["type"]
    msg: str = error["msg"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        known = _known_keys(loc)
        if not known:
            return "unknown key"
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f", did you mean {close[0]!r}?" if close else ""
        return f"unknown key{hint} (known: {', '.join(known)})"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    shown = _show(error.get("input"), loc)
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{shown} must be a mapping"
    if kind in ("list_type", "tuple_type"):
        return f"{shown} must be a list"
    if msg.startswith("Input should"):
        return shown + " must" + msg.removeprefix("Input should")
    return f"{shown}: {msg}"


def _problems_from_validation_error(exc: ValidationError) -> list[str]:
    """The one place pydantic's error list becomes `key.path: value what-is-wrong` lines."""
    return [f"{_format_path(tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()]


# --------------------------------------------------------------------------- overrides

# What a container sets without forking the YAML: (key path, command-line flag, variable).
# A flag wins over its variable, and both over the file; an empty variable counts as unset.
OVERRIDABLE: tuple[tuple[str, str, str], ...] = (
    ("server.host", "--host", "TOLLGATE_HOST"),
    ("server.port", "--port", "TOLLGATE_PORT"),
    ("metrics.host", "--metrics-host", "TOLLGATE_METRICS_HOST"),
    ("metrics.port", "--metrics-port", "TOLLGATE_METRICS_PORT"),
    ("logging.level", "--log-level", "TOLLGATE_LOG_LEVEL"),
    ("ledger.backend", "--ledger-backend", "TOLLGATE_LEDGER_BACKEND"),
    ("ledger.path", "--ledger-path", "TOLLGATE_LEDGER_PATH"),
)


@dataclass(frozen=True, slots=True)
class Override:
    """One key set from outside the file, and where it came from (for error messages)."""

    path: str
    value: Any
    origin: str


def collect_overrides(flags: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Override, ...]:
    """The overrides in effect: `flags` maps a flag (`--port`) to its value, None when not given."""
    found: list[Override] = []
    for path, flag, variable in OVERRIDABLE:
        if flags.get(flag) is not None:
            found.append(Override(path, flags[flag], flag))
        elif env.get(variable, "").strip():
            found.append(Override(path, env[variable].strip(), variable))
    return tuple(found)


def _apply_overrides(data: dict[str, Any], overrides: tuple[Override, ...]) -> dict[str, Any]:
    for o in overrides:
        section, key = o.path.split(".")
        current = data.get(section)
        data = {**data, section: {**(current if isinstance(current, dict) else {}), key: o.value}}
    return data


def _blame(problems: list[str], overrides: tuple[Override, ...]) -> list[str]:
    """Say which flag or variable set a key a problem is about: it is not in the file."""
    out = []
    for problem in problems:
        for o in overrides:
            if problem.startswith(f"{o.path}:"):
                problem += f" (set by {o.origin})"
        out.append(problem)
    return out


# --------------------------------------------------------------------------- entry points


def parse_settings(
    text: str, env: Mapping[str, str], source: str = "<string>", overrides: tuple[Override, ...] = ()
) -> Settings:
    """Parse, interpolate and validate one YAML document.

    Raises ConfigError listing every problem found at the first stage that had any.
    """
    data, problems = _load_yaml(text)
    if problems:
        raise ConfigError(problems, source)
    if data is None:
        raise ConfigError(
            ["(top level): the document is empty (expected a mapping with at least `upstreams`)"],
            source,
        )
    if not isinstance(data, dict):
        shown, kind = _show(data, ()), type(data).__name__
        raise ConfigError(
            [f"(top level): {shown} is a {kind}, expected a mapping of sections"], source
        )
    data = _interpolate(data, (), env, problems)
    if problems:
        raise ConfigError(problems, source)
    data = _apply_overrides(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_blame(_problems_from_validation_error(exc), overrides), source) from None
    except ConfigError as exc:  # cross-reference problems, raised without a source
        raise ConfigError(_blame(exc.problems, overrides), source) from None


def load_settings(
    path: str | Path, env: Mapping[str, str] | None = None, overrides: tuple[Override, ...] = ()
) -> Settings:
    """Read `path` and parse it with `overrides` on top; `env` defaults to the process environment."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"file not found: {source}"], source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read {source}: {exc}"], source) from None
    return parse_settings(text, os.environ if env is None else env, source, overrides)

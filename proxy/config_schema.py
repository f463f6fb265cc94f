"""`tollgate schema`: the configuration's JSON schema, generated from the settings models so
it cannot drift from what the loader accepts."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import (
    BaseModel,
)

from proxy.config_base import Section
from proxy.settings import Settings

# --------------------------------------------------------------------------- JSON schema

SCHEMA_ID = "https://github.com/tollgate/tollgate/config/tollgate.schema.json"
# What `${VAR}` interpolation lets stand where YAML would otherwise need a number or a bool.
_INTERPOLATED = {"type": "string", "pattern": r"\$\{"}


def _sections(model: type[BaseModel], seen: dict[str, type[BaseModel]]) -> dict[str, type[BaseModel]]:
    """Every model reachable from `model`'s fields, by the title its schema $def carries."""
    if model.__name__ in seen:
        return seen
    seen[model.__name__] = model
    for field in model.model_fields.values():
        todo = [field.annotation]
        while todo:
            tp = todo.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _sections(tp, seen)
            todo.extend(get_args(tp))
    return seen


_ANNOTATIONS = ("title", "description", "default")


def _or(node: dict[str, Any], alternative: dict[str, Any]) -> dict[str, Any]:
    """`node` or `alternative`, with node's title, description and default kept outermost,
    where editors look for them."""
    inner = {k: v for k, v in node.items() if k not in _ANNOTATIONS}
    return {**{k: node[k] for k in _ANNOTATIONS if k in node}, "anyOf": [inner, alternative]}


def _widen(node: Any) -> Any:
    """Add to a generated schema what the loader accepts beyond the models' types: a
    `${VAR}` string in place of a number or bool (interpolated before validation)."""
    if isinstance(node, list):
        return [_widen(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _widen(v) for k, v in node.items()}
    if out.get("type") in ("integer", "number", "boolean"):
        return _or(out, _INTERPOLATED)
    return out


def config_json_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of the YAML config, generated from the models above,
    so it cannot drift from what the loader accepts. The loader is the authority: the schema
    is what editors check as you type (unknown keys, types, enums, ranges), while
    cross-references (a route naming a missing upstream), glob syntax, URLs and header names
    are checked by `tollgate check-config` alone."""
    schema = Settings.model_json_schema(mode="validation")
    nullable = {name for name, m in _sections(Settings, {}).items() if issubclass(m, Section)}
    for name, definition in [("Settings", schema), *schema.get("$defs", {}).items()]:
        if name not in nullable:
            continue
        # `Section._null_means_default`: a key left empty takes its default.
        required = set(definition.get("required", ()))
        for key, prop in definition.get("properties", {}).items():
            if key not in required:
                definition["properties"][key] = _or(prop, {"type": "null"})
    schema = _widen(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Tollgate configuration",
        "description": "config/tollgate.yaml documents every key; `tollgate check-config` is the authority.",
        **{k: v for k, v in schema.items() if k != "title"},
    }

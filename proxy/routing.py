"""The route table, built once when the configuration is validated: exact names in a dict,
globs as precompiled regexes, tried in the order written. Pure."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.config_base import OTHER_LABEL, is_glob

if TYPE_CHECKING:
    from proxy.settings import Route, UpstreamSettings


@dataclass(frozen=True, slots=True)
class ResolvedRoute:
    """Where one model name goes."""

    upstream: str
    upstream_model: str  # the id sent upstream: the alias target, or the model as asked
    route_label: str  # bounded Prometheus `model` label: exact name, glob pattern, or "other"
    default_max_tokens: int | None
    matched_default: bool  # True when only default_upstream took it


@dataclass(frozen=True, slots=True)
class _GlobRoute:
    match: Callable[[str], re.Match[str] | None]
    pattern: str
    upstream: str
    alias: str | None
    default_max_tokens: int | None


class Router:
    """The route table compiled for lookup: a dict for exact names, regexes for globs."""

    __slots__ = ("default", "default_cap", "exact", "globs")

    def __init__(
        self, routes: tuple[Route, ...], upstreams: Mapping[str, UpstreamSettings], default: str | None
    ) -> None:
        self.exact: dict[str, ResolvedRoute] = {}
        globs: list[_GlobRoute] = []
        for route in routes:
            upstream = upstreams[route.upstream]
            cap = (
                route.default_max_tokens
                if route.default_max_tokens is not None
                else upstream.default_max_tokens
            )
            for pattern in route.models:
                if is_glob(pattern):
                    # fnmatch.translate gives a full-match regex; compiling without IGNORECASE
                    # keeps it case-sensitive (fnmatchcase semantics) on every platform.
                    regex = re.compile(fnmatch.translate(pattern))
                    globs.append(_GlobRoute(regex.match, pattern, route.upstream, route.model, cap))
                else:
                    self.exact[pattern] = ResolvedRoute(
                        upstream=route.upstream,
                        upstream_model=route.model or pattern,
                        route_label=pattern,
                        default_max_tokens=cap,
                        matched_default=False,
                    )
        self.globs = tuple(globs)
        self.default: str | None = default
        self.default_cap: int | None = (
            None if default is None else upstreams[default].default_max_tokens
        )

    def route_for(self, model: str) -> ResolvedRoute | None:
        hit = self.exact.get(model)
        if hit is not None:
            return hit
        for glob in self.globs:
            if glob.match(model):
                return ResolvedRoute(
                    upstream=glob.upstream,
                    upstream_model=glob.alias or model,
                    route_label=glob.pattern,
                    default_max_tokens=glob.default_max_tokens,
                    matched_default=False,
                )
        if self.default is None:
            return None
        return ResolvedRoute(self.default, model, OTHER_LABEL, self.default_cap, True)

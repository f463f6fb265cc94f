"""The import rule of docs/ARCHITECTURE.md: a module imports only modules of its own layer
or below, and a pipeline stage never imports a stage that runs after it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROXY = REPO / "proxy"

# Layer of each module (a package prefix covers its modules), lowest first. Keep in step
# with the table in docs/ARCHITECTURE.md.
LAYERS: list[tuple[str, list[str]]] = [
    ("core", [
        "proxy.errors", "proxy.exchange", "proxy.usage", "proxy.sse", "proxy.pricing", "proxy.estimate",
        "proxy.encodings", "proxy.globs", "proxy.output_cap", "proxy.keys", "proxy.paths", "proxy.settings", "proxy.config_base",
        "proxy.config_sections", "proxy.routing", "proxy.config_file", "proxy.config_schema",
        "proxy.faults", "proxy.images", "proxy.azure", "proxy.output", "proxy.strip", "proxy.content_shape", "proxy.body", "proxy.client_cost", "proxy.response_cache", "proxy.spend", "proxy.spend.money", "proxy.spend.rules", "proxy.spend.buckets",
        "proxy.spend.messages", "proxy.spend.budgets", "proxy.spend.forecast", "proxy.replicas", "proxy.ratelimit",
    ]),
    ("infrastructure", [
        "proxy.upstream", "proxy.cache_store", "proxy.replica_health", "proxy.engine_telemetry", "proxy.policy", "proxy.observer", "proxy.measure", "proxy.observers",
        "proxy.spend.ledger", "proxy.spend.metrics", "proxy.spend.webhook", "proxy.ratelimit.store",
    ]),
    ("spend", ["proxy.spend.quota", "proxy.spend.hold", "proxy.spend.lifecycle", "proxy.ratelimit.limiter", "proxy.state"]),
    # The pipeline's stages, in the order a request meets them.
    ("stages", ["proxy.accept", "proxy.route", "proxy.cached", "proxy.spend.admission", "proxy.throttle", "proxy.forward", "proxy.finish"]),
    ("assembly", ["proxy.handlers", "proxy.app"]),
    ("entry points", ["proxy.serve", "proxy.__main__", "proxy.cli_ledger", "proxy.cli_export", "proxy.cli_advise", "proxy.demo", "proxy.demo_report", "proxy.synthetic", "proxy.synthetic_truth", "proxy.healthcheck"]),
]
STAGES = LAYERS[3][1]


def _place(module: str) -> tuple[int, str]:
    """(layer index, the entry that matched) of a proxy module: the longest prefix wins."""
    best: tuple[int, str] | None = None
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    if best is None:
        raise AssertionError(f"{module} has no layer in LAYERS (and docs/ARCHITECTURE.md)")
    return best


def _modules() -> dict[str, Path]:
    found = {}
    for path in PROXY.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Every proxy module `module` imports, at any depth (function-level imports too)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                # `from proxy import handlers` imports the module proxy.handlers.
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {n for n in names if n == "proxy" or n.startswith("proxy.")} - {"proxy"}


MODULES = _modules()


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        if module != "proxy":
            _place(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "proxy"))
def test_imports_go_down_the_layers_and_never_forward_in_the_pipeline(module: str) -> None:
    layer, entry = _place(module)
    for imported in sorted(_imports(module, MODULES[module])):
        if imported.startswith(module + ".") or imported == module:
            continue
        their_layer, their_entry = _place(imported)
        assert their_layer <= layer, (
            f"{module} ({LAYERS[layer][0]}) imports {imported} ({LAYERS[their_layer][0]}), a layer above it"
        )
        if entry in STAGES and their_entry in STAGES:
            assert STAGES.index(their_entry) <= STAGES.index(entry), (
                f"the stage {module} imports {imported}, a stage that runs after it"
            )


def test_the_rule_catches_a_forward_import() -> None:
    """The check itself can fail: route importing finish would be refused."""
    assert STAGES.index("proxy.finish") > STAGES.index("proxy.route")
    assert _place("proxy.spend.ledger.sqlite") == (1, "proxy.spend.ledger")
    assert _place("proxy.spend.admission")[0] == 3

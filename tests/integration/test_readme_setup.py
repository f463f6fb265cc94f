"""The README's set-up installs what its commands run.

`./scripts/serve` (pip install -e ., no extras) and then `.venv/bin/tollgate demo`: the demo
drives the proxy with the openai SDK, which once came only with the test extra, so the
README's first run crashed on an ImportError. Two checks: every third-party module that
proxy/ imports comes with a plain install (fast, from the installed metadata), and the
README's commands themselves on a clean copy of the checkout with a fresh virtualenv.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _runtime_closure(dist: str) -> set[str]:
    """Normalised names of `dist` and everything its requirements pull in, extras left out."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded dependency (another platform or Python)
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(req.name)
    return seen


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the proxy/ files importing it, for modules outside stdlib and proxy."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "proxy" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def test_a_plain_install_provides_every_module_proxy_imports() -> None:
    installed = _runtime_closure("tollgate")
    providers = metadata.packages_distributions()
    missing = {}
    for module, files in _third_party_imports().items():
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(module, [])}
        if not dists & installed:
            missing[module] = sorted(files)
    assert "openai" in _third_party_imports()  # the demo's import, which this test is about
    assert not missing, f"imported by proxy/ but not installed without extras: {missing}"


def test_the_readme_set_up_runs_the_demo(tmp_path: Path) -> None:
    """`./scripts/serve` on a clean checkout with no .venv, then `.venv/bin/tollgate demo`.
    `--help` makes serve print its usage after the set-up instead of serving."""
    readme = (REPO / "README.md").read_text()
    assert "./scripts/serve" in readme and ".venv/bin/tollgate demo" in readme
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    checkout = tmp_path / "tollgate"
    for name in files:
        source = REPO / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PYTHON"] = sys.executable
    setup = subprocess.run(
        [str(checkout / "scripts" / "serve"), "--help"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "usage: tollgate serve" in setup.stdout
    assert "installing Tollgate" in setup.stderr
    # Issue 15: the second start installs nothing (pip cost ~3 s on every start) ...
    again = subprocess.run(
        [str(checkout / "scripts" / "serve"), "--help"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert again.returncode == 0 and "usage: tollgate serve" in again.stdout, again.stdout + again.stderr
    assert "installing" not in again.stderr, again.stderr
    # ... until pyproject.toml changes (a dependency added, say): then it installs again.
    with open(checkout / "pyproject.toml", "a") as f:
        f.write("\n# edited\n")
    edited = subprocess.run(
        [str(checkout / "scripts" / "serve"), "--help"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert edited.returncode == 0, edited.stdout + edited.stderr
    assert "installing Tollgate" in edited.stderr
    demo = subprocess.run(
        [str(checkout / ".venv" / "bin" / "tollgate"), "demo", "--requests", "2", "--json", "--metrics-port", "0"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    report = json.loads(demo.stdout)
    assert report["options"]["requests"] == 2, demo.stdout

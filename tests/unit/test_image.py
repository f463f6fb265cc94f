"""Reproducible images (issue 15): no Docker daemon here, so the Dockerfile is read.

It must build from exact base-image versions, install every runtime dependency at the
version constraints.txt pins (and constraints.txt must pin each one pyproject.toml lists, at a
version that satisfies it), and probe the port the server is configured to listen on.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from proxy.healthcheck import healthz_url

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not name==version"
            pins[_norm(name)] = version
    return pins


def test_base_images_are_exact_versions() -> None:
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE, re.M))
    froms = re.findall(r"^FROM (\S+)", DOCKERFILE, re.M)
    assert len(froms) == 2
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        # name:MAJOR.MINOR.PATCH-variant-debianrelease (or a digest): never a moving tag.
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    # The image's Python is the one constraints.txt was resolved on (scripts/lock).
    image = args["PYTHON_IMAGE"]
    assert image.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}.")


def test_every_pip_command_installs_under_the_constraints() -> None:
    pips = [cmd for cmd in re.findall(r"pip (?:wheel|install)[^&\n]*(?:\\\n[^&\n]*)*", DOCKERFILE)]
    assert len(pips) == 2, pips
    for cmd in pips:
        assert re.search(r"--constraint \S*constraints\.txt", cmd), cmd
    assert re.search(r"^COPY .*constraints\.txt", DOCKERFILE, re.M)


def test_constraints_pin_every_runtime_dependency_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for line in project["dependencies"]:
        req = Requirement(line)
        assert _norm(req.name) in pins, f"{req.name} (pyproject.toml) is not in constraints.txt: run scripts/lock"
        assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), (req, pins[_norm(req.name)])
    test_only = {_norm(Requirement(r).name) for r in project["optional-dependencies"]["test"]}
    assert not test_only & set(pins) - {"packaging"}, "constraints.txt is for the runtime image only"


def test_the_healthcheck_probes_the_configured_port(tmp_path: Path) -> None:
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["python", "-m", "proxy\.healthcheck"', DOCKERFILE, re.M)
    cfg = tmp_path / "t.yaml"
    cfg.write_text("server: {host: 0.0.0.0, port: 9000}\nupstreams: {o: {base_url: 'http://127.0.0.1:1/v1'}}\n"
                   "default_upstream: o\n")
    assert healthz_url(cfg, {}) == "http://127.0.0.1:9000/healthz"
    assert healthz_url(cfg, {"TOLLGATE_PORT": "9123"}) == "http://127.0.0.1:9123/healthz"
    assert healthz_url(cfg, {"TOLLGATE_HOST": "::1", "TOLLGATE_PORT": "9123"}) == "http://[::1]:9123/healthz"
    # The shipped config, as the image runs it (TOLLGATE_HOST=0.0.0.0 is set in the image).
    assert healthz_url(ROOT / "config" / "tollgate.yaml", {"TOLLGATE_HOST": "0.0.0.0"}) == "http://127.0.0.1:8080/healthz"


@pytest.mark.parametrize("name", ["scripts/lock"])
def test_the_lock_script_is_shipped(name: str) -> None:
    assert (ROOT / name).stat().st_mode & 0o111

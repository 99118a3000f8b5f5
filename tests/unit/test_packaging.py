"""The Debian package's inputs agree with pyproject.toml (debian/, requirements.lock)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def test_the_package_version_is_tvorchs():
    first = (ROOT / "debian" / "changelog").read_text().splitlines()[0]
    assert re.match(r"tvorch \(([^)]+)\)", first).group(1) == PYPROJECT["version"]


def test_every_runtime_dependency_is_pinned_exactly():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", line), f"not an exact pin: {line}"
            pins[name_of(line)] = line
    assert {name_of(r) for r in PYPROJECT["dependencies"]} <= set(pins)


def test_every_python_package_of_tvorch_is_installed():
    """pyproject lists tvorch's packages by name (two live outside tvorch/): a new subpackage left out of
    the list works in the editable checkout and is missing from `make deb`'s /opt/tvorch."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tvorch").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found - listed == set(), "add them to [tool.setuptools] packages in pyproject.toml"

"""The package's layers, read from the source with `ast` (nothing is imported).

- core/ never imports the layers above it (adapters, service, the CLI, the hook, the daemon):
  formats and judgements stay pure and testable on bytes.
- The service modules import each other without a cycle, counting the imports
  inside functions too: an import moved into a function to dodge a cycle hides
  the cycle from Python, not from whoever reads the code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "tvorch"
ABOVE_CORE = ("tvorch.adapters", "tvorch.service", "tvorch.cli", "tvorch.hook", "tvorch.daemon")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> Iterator[str]:
    """Every tvorch module PATH imports, anywhere in it (module level, functions, TYPE_CHECKING blocks)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)  # `from . import vtpm`


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def service_graph() -> dict[str, set[str]]:
    """Service module -> the service modules it imports."""
    paths = {p.stem: p for p in (PACKAGE / "service").glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for stem, path in paths.items():
        graph[stem] = {
            m.split(".")[2] for m in imported(path)
            if _is_under(m, "tvorch.service") and m.count(".") >= 2 and m.split(".")[2] in paths
        } - {stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of GRAPH as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_core_imports_no_layer_above_it() -> None:
    modules = sorted((PACKAGE / "core").rglob("*.py"))
    assert len(modules) > 40, "core's modules, in its subpackages too"
    wrong = sorted(
        f"{_module_name(path)} imports {module}"
        for path in modules
        for module in imported(path)
        if any(_is_under(module, layer) for layer in ABOVE_CORE)
    )
    assert wrong == []


def test_core_is_grouped_by_domain() -> None:
    """Issue #17: core is not one flat room; besides the shared formats, each module lives in its domain."""
    shared = {"__init__", "codec", "timestamps", "signing", "signed", "chain", "der"}
    flat = sorted(p.stem for p in (PACKAGE / "core").glob("*.py") if p.stem not in shared)
    assert flat == [], "put it in core/launch, core/boot, core/vtpm, core/attestation or core/migration"
    groups = {p.parent.name for p in (PACKAGE / "core").glob("*/__init__.py")}
    assert groups == {"launch", "boot", "vtpm", "attestation", "migration"}


def test_service_modules_import_each_other_without_a_cycle() -> None:
    cycle = find_cycle(service_graph())
    assert cycle is None, "service import cycle: " + " -> ".join(cycle or [])


def test_the_reader_sees_imports_inside_functions() -> None:
    """The graph counts a function-level import (else the cycle test proves nothing)."""
    graph = service_graph()
    assert {"host", "keylime"} <= graph["attest"]  # `from . import host` inside attest's functions
    assert graph["node"] == set()
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None

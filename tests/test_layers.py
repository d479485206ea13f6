"""The layers, checked statically: every module's imports, read with `ast`, run one way.

`lake/` (the contract) is at the bottom; the batch jobs (`spark_jobs/`) and the server
(`online/`) stand beside each other on it; the DAGs (`dags/`), the benchmarks (`bench/`)
and the launchers (`infra/`) are on top. The client library (`lambdarec_client`, shipped
on its own) stands apart: it imports no project package, and anyone may import it. An
import inside a function counts as much as one at the top of a file (it runs the same,
only later), and so does one under `if TYPE_CHECKING:` (the type checker follows it, and
it is the first step of a real one). No two project modules may import each other,
directly or round a longer circle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"lake": ROOT, "spark_jobs": ROOT, "online": ROOT, "dags": ROOT, "bench": ROOT,
            "infra": ROOT, "lambdarec_client": ROOT / "clients" / "python"}
"""Each project package and the directory it is imported from."""

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "lake": ("spark_jobs", "online", "dags", "bench", "infra"),
    "spark_jobs": ("online", "dags", "bench"),
    "online": ("spark_jobs", "dags", "bench"),
    "dags": ("online", "bench"),
    "lambdarec_client": ("lake", "spark_jobs", "online", "dags", "bench", "infra"),
}
"""Packages each layer must not import: nothing runs back up, the two middle layers
(batch and online) do not lean on each other, and the client needs none of the project."""


def module_name(path: Path, base: Path) -> str:
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every project module (`lake.bundle`, `online.console.data`, ...) and its file."""
    return {module_name(p, base): p for pkg, base in PACKAGES.items()
            for p in sorted((base / pkg).rglob("*.py")) if "__pycache__" not in p.parts}


def imported_names(name: str, path: Path) -> Iterator[tuple[str, int]]:
    """(absolute module named, line) for each import anywhere in the file, nested ones too.

    `from pkg import mod` names `pkg.mod` as well as `pkg`: a submodule is imported that
    way, and an attribute of `pkg` is reached through `pkg` either way.
    """
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            yield stem, node.lineno
            for alias in node.names:
                yield f"{stem}.{alias.name}", node.lineno


def project_target(imported: str) -> str | None:
    """The project module an import name resolves to (the longest one it starts with)."""
    known = modules()
    parts = imported.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in known:
            return candidate
    return None


@cache
def graph() -> dict[str, dict[str, int]]:
    """module -> {project module it imports: first line doing so}."""
    out: dict[str, dict[str, int]] = {}
    for name, path in modules().items():
        edges: dict[str, int] = {}
        for imported, line in imported_names(name, path):
            target = project_target(imported)
            if target is not None and target != name:
                edges.setdefault(target, line)
        out[name] = edges
    return out


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_scan_sees_every_kind_of_import() -> None:
    # known answers: a top-level import, a `from x import y`, one inside a function
    g = graph()
    assert "lake.config" in g["spark_jobs.cli"]
    assert "spark_jobs.staging" in g["spark_jobs.cli"]
    assert "lake.vector_index" in g["spark_jobs.publish"]  # imported inside _ensure_bundle
    assert "lambdarec_client.client" in modules()
    assert len(modules()) > 50


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_runs_back_up(layer: str) -> None:
    bad = [f"{mod} -> {target} ({modules()[mod].relative_to(ROOT)}:{line})"
           for mod, edges in graph().items() if mod.split(".")[0] == layer
           for target, line in edges.items() if target.split(".")[0] in FORBIDDEN[layer]]
    assert not bad, f"{layer}/ imports what it must not:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    found = cycles(g)

    def show(component: list[str]) -> str:
        members = set(component)
        return "\n".join(f"  {m} -> {t} (line {line})" for m in component
                         for t, line in g[m].items() if t in members)

    assert not found, "import cycles:\n" + "\n\n".join(show(c) for c in found)


def test_cycle_finder_on_a_known_graph() -> None:
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {"e": 1}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []

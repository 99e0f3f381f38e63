"""The package's layers: an import only ever points down, and no module imports itself back.

The layer order is written once, here (docs/architecture.md explains it). A module may import
from its own layer or any layer below; every import counts, including those inside functions
and under ``if TYPE_CHECKING:``, because a circle hidden from the interpreter is still a circle
for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mtlsproxy"

# Lowest first. Each entry is a top-level module or sub-package of mtlsproxy.
LAYERS: tuple[tuple[str, ...], ...] = (
    # The package's __init__ decides which build of the compiled modules runs before any
    # is imported (mtlsproxy/compiled.py).
    ("compiled",),
    ("__init__", "errors", "reasons"),
    ("runtime",),
    ("metrics",),
    ("identity",),
    ("http",),
    ("config",),
    ("truststore",),
    ("tls",),
    ("revocation",),
    ("admission",),
    ("proxy",),
    ("server",),
    ("dev",),
    ("cli",),
    ("__main__",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every mtlsproxy module this file imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from a.b import c" imports a.b, and a.b.c too when c is a module.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_every_module_belongs_to_a_layer() -> None:
    unplaced = sorted(m for m in all_modules() if layer_of(m) not in RANK)
    assert not unplaced, f"add these to LAYERS: {unplaced}"


def test_no_import_points_up_a_layer() -> None:
    upward = sorted(
        f"{importer} -> {imported}"
        for importer, targets in graph().items()
        for imported in targets
        if RANK[layer_of(imported)] > RANK[layer_of(importer)]
    )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_layer_imports_a_peer_of_the_same_rank() -> None:
    sideways = sorted(
        f"{importer} -> {imported}"
        for importer, targets in graph().items()
        for imported in targets
        if layer_of(imported) != layer_of(importer)
        and RANK[layer_of(imported)] == RANK[layer_of(importer)]
        and layer_of(imported) != "__init__"
    )
    assert not sideways, "\n".join(sideways)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_imports_itself_back() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": {"c"}, "c": set()}, False)],
)
def test_the_circle_finder_finds_circles(edges: dict[str, set[str]], expected: bool) -> None:
    assert (find_cycle(edges) is not None) is expected


def test_loading_a_config_imports_no_http_parser() -> None:
    # A config is read by check-config, the CLI and every worker: it must not pull in the
    # parsers (or the authorizer's client) to validate a file.
    import subprocess
    import sys
    code = ("import sys, mtlsproxy.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('httptools', 'h11')"
            " or m.startswith('mtlsproxy.http.') and m != 'mtlsproxy.http.normalize'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"

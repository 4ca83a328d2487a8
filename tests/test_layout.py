"""The layout the README's Architecture section describes: no import loop, layers kept, small files.

Every import counts, at the top of a module or inside a function (a lazy import is still a
dependency); only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "fedit"

# Lower layers never import higher ones. A module's layer is the first prefix that matches.
LAYERS = [
    ("fedit.errors", "fedit.registry", "fedit.seeding", "fedit.files", "fedit.progress",
     "fedit.faults", "fedit.tracking"),
    ("fedit.config",),
    ("fedit.data", "fedit.models", "fedit.resources", "fedit.compression", "fedit.protocol"),
    ("fedit.lora", "fedit.checkpoint", "fedit.fingerprint", "fedit.deltas"),
    ("fedit.client.batching",),
    ("fedit.client.train", "fedit.heldout", "fedit.inference", "fedit.fairness", "fedit.card",
     "fedit.tagplot"),
    ("fedit.client", "fedit.server"),
    ("fedit.engines.inprocess", "fedit.engines.pool", "fedit.engines.flower.node",
     "fedit.engines.flower.certs", "fedit.engines.flower.launch", "fedit.engines"),
    ("fedit.recipe",),
    ("fedit.engines.flower.app", "fedit.evaluate", "fedit.serve", "fedit.export"),
    ("fedit.cli",),
]  # fmt: skip


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(path: Path, known: set[str]) -> set[str]:
    """fedit modules `path` imports anywhere except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fedit"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedit"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def layer(module: str) -> int:
    best = (-1, -1)  # (length of the matching prefix, layer)
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best[0]:
                best = (len(p), i)
    assert best[1] >= 0, f"{module} is in no layer of tests/test_layout.py"
    return best[1]


def test_no_import_loops() -> None:
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                loop = [*stack[stack.index(n) :], n]
                raise AssertionError("import loop: " + " -> ".join(loop))
            if n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            walk(m)


def test_no_module_imports_a_higher_layer() -> None:
    bad = [
        f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})"
        for m, deps in sorted(graph().items())
        for n in sorted(deps)
        if "fedit" not in (m, n) and layer(n) > layer(m)
    ]
    assert not bad, "\n".join(bad)


def test_the_two_sides_never_import_each_other() -> None:
    g = graph()
    for m, deps in g.items():
        if m.startswith("fedit.client"):
            assert not any(d.startswith("fedit.server") for d in deps), m
        if m.startswith("fedit.server"):
            assert not any(d.startswith(("fedit.client", "fedit.engines")) for d in deps), m


def test_modules_stay_small() -> None:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules().items()}
    assert all(n <= 420 for n in sizes.values()), {m: n for m, n in sizes.items() if n > 420}

"""One composition root, no cycles, no private names across modules (read from the source).

`cli` and `supervisor` both build their settings, clients and app through `compose`, which
imports neither; the package's import graph (lazy imports inside functions included, those
under `if TYPE_CHECKING:` left out) has no cycle; and no module imports an underscore name
from another perago_worker module, reads or sets another module's underscore attribute
(`conductor._retry_seconds`), or passes one as a keyword. Each exception is allow-listed with
its reason.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "perago_worker"
ROOT_MODULES = ("perago_worker.cli", "perago_worker.supervisor", "perago_worker.compose")

# (module, what) -> why it is allowed.
ALLOWED = {
    ("*", "import perago_worker._version"): (
        "the version lives in a module of its own so setuptools reads it without importing "
        "the package (`perago_worker.__version__` re-exports it); any module may name it"
    ),
    ("*", "attribute os._exit"): "a documented os function: leave at once, no cleanup",
    ("*", "attribute hashlib._Hash"): "the stdlib's only name for a hash object's type",
    ("*", "keyword _return_http_data_only"): "a documented keyword of conductor-python's API",
    ("perago_worker.runner", "keyword _config"): (
        "TaskContext's constructor: the worker gives each context its config lookup; the "
        "field stays private so handlers see only ctx.config()"
    ),
    ("perago_worker.testing", "keyword _config"): "as in runner: the test double builds a context",
    ("perago_worker.invocation.process", "keyword _config"): "as in runner: a child's context",
    ("perago_worker.manual", "keyword _config"): "as in runner: a manual execution's context",
    ("perago_worker.invocation.process", "keyword _workspace"): (
        "TaskContext's constructor: a process-isolated child rebuilds its context with the "
        "parent's workspace"
    ),
}


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    imports: set[str] = field(default_factory=set)  # perago_worker modules it imports
    problems: list[str] = field(default_factory=list)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def defined_names(tree: ast.AST) -> set[str]:
    """Underscore names this module defines: functions, classes, variables, attributes it
    assigns (`self._x = ...`), class fields (`_x: int = 0`), parameters."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store | ast.Del):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if private(n)}


def analyse(name: str, path: Path, tree: ast.Module, known: set[str]) -> Module:
    module = Module(name, path, tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own = defined_names(tree)

    def visit(node: ast.AST, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            checking = type_checking or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.Import | ast.ImportFrom) and not checking:
                note_import(child)
            elif isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Load):
                value = child.value
                is_self = isinstance(value, ast.Name) and value.id in ("self", "cls")
                if private(child.attr) and not is_self and child.attr not in own:
                    module.problems.append(f"attribute {ast.unparse(value)}.{child.attr}")
            elif (
                isinstance(child, ast.keyword)
                and child.arg
                and private(child.arg)
                and child.arg not in own
            ):
                module.problems.append(f"keyword {child.arg}")
            visit(child, checking)

    def note_import(node: ast.Import | ast.ImportFrom) -> None:
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            targets = [(base, a.name) for a in node.names]
        for base, imported in targets:
            if not base.startswith("perago_worker"):
                continue
            target = f"{base}.{imported}" if f"{base}.{imported}" in known else base
            if target != name and target in known:
                module.imports.add(target)
            if any(private(part) for part in target.split(".")):
                module.problems.append(f"import {target}")
            if imported is not None and private(imported) and target == base:
                module.problems.append(f"import {base}.{imported}")

    visit(tree, False)
    return module


def package_modules(root: Path = PACKAGE) -> dict[str, Module]:
    paths = sorted(root.rglob("*.py"))
    known = {module_name(p, root) for p in paths}
    return {
        module_name(p, root): analyse(module_name(p, root), p, ast.parse(p.read_text()), known)
        for p in paths
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def unallowed(module: Module) -> list[str]:
    return [p for p in module.problems if not {(module.name, p), ("*", p)} & set(ALLOWED)]


MODULES = package_modules()


def test_the_walk_sees_the_whole_package() -> None:
    assert set(ROOT_MODULES) <= set(MODULES)
    assert {"perago_worker.runner", "perago_worker.lakefs", "perago_worker.invocation.process"} <= (
        set(MODULES)
    )


def test_cli_and_supervisor_share_the_composition_root() -> None:
    compose = MODULES["perago_worker.compose"]
    assert "perago_worker.compose" in MODULES["perago_worker.cli"].imports
    assert "perago_worker.compose" in MODULES["perago_worker.supervisor"].imports
    assert not compose.imports & {"perago_worker.cli", "perago_worker.supervisor"}
    assert "perago_worker.cli" not in MODULES["perago_worker.supervisor"].imports


def test_the_import_graph_has_no_cycle() -> None:
    graph = {name: module.imports for name, module in MODULES.items()}
    found = cycles(graph)
    assert found == [], f"import cycles: {found}"
    touching = [c for c in found if set(c) & set(ROOT_MODULES)]
    assert touching == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(name: str) -> None:
    assert unallowed(MODULES[name]) == []


def test_every_allowance_is_still_needed() -> None:
    used = {(m.name, p) for m in MODULES.values() for p in m.problems}
    used |= {("*", p) for _, p in used}
    assert set(ALLOWED) - used == set()


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    root = tmp_path / "perago_worker"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "cli.py").write_text(
        "from perago_worker.supervisor import run\n_hidden = 1\ndef main():\n    return run()\n"
    )
    (root / "supervisor.py").write_text(
        "def run():\n"
        "    from perago_worker.cli import _hidden\n"
        "    from perago_worker import conductor\n"
        "    conductor.client._retry_seconds\n"
        "    conductor.Conductor(_secret=1)\n"
        "    return _hidden\n"
    )
    (root / "conductor.py").write_text(
        "class Conductor:\n    def __init__(self, _secret=0):\n        self._retry_seconds = 1\n"
    )
    modules = package_modules(root)
    assert cycles({n: m.imports for n, m in modules.items()}) == [
        ["perago_worker.cli", "perago_worker.supervisor"]
    ]
    assert sorted(modules["perago_worker.supervisor"].problems) == [
        "attribute conductor.client._retry_seconds",
        "import perago_worker.cli._hidden",
        "keyword _secret",
    ]
    assert unallowed(modules["perago_worker.supervisor"]) != []
    assert modules["perago_worker.conductor"].problems == []

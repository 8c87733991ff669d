"""The package's shape: imports run one way (no cycles), and SearchConfig, the search flags
and the README's option table list the same options."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from autocompress.cli import build_parser
from autocompress.config import config_keys

PACKAGE = Path(__file__).resolve().parents[1] / "autocompress"
README = PACKAGE.parent / "README.md"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """Modules of the package ``path`` imports, at module level or inside functions, except
    under ``if TYPE_CHECKING:``; ``from package import submodule`` counts as the submodule
    (the lazy public API in autocompress/__init__.py is not an import of anything)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(
                    test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else source)

    Visitor().visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m not in (name, "autocompress")}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = set(paths)
    return {name: _imports(path, name, names) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = _graph()
    assert graph.get("autocompress.search")  # the walk works
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_config_field_has_a_search_flag_and_a_readme_row() -> None:
    parser = build_parser()
    search = parser._subparsers._group_actions[0].choices["search"]  # type: ignore[union-attr]
    dests = {action.dest for action in search._actions}
    # Fields set in a YAML file only, or by flags of another spelling.
    flagless = {"budgets"}  # --budget (repeatable) fills it
    missing_flags = [k for k in config_keys() if k not in dests and k not in flagless]
    assert missing_flags == []
    table = README.read_text().split("`search` options", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"`--([a-z0-9-]+)", table))
    spelled = {k: k.replace("_", "-") for k in config_keys()}
    spelled.update(budgets="budget", baselines="no-baselines", warm_starts="no-warm-starts",
                   guided="no-guided")
    assert sorted(k for k, flag in spelled.items() if flag not in documented) == []


def test_modules_stay_small_and_say_their_job() -> None:
    too_long = []
    no_docstring = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 600:
            too_long.append(f"{path.relative_to(PACKAGE)} ({len(text.splitlines())} lines)")
        if not ast.get_docstring(ast.parse(text)):
            no_docstring.append(str(path.relative_to(PACKAGE)))
    assert too_long == []
    assert no_docstring == []

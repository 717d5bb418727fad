"""The floors of DESIGN.md hold: steer <- hub <- train <- apps, the CLI on top, and no import cycle.

Every module of the four packages is parsed (never imported), so a violation is caught even in code that
no test runs. Imports inside functions count for the floors; the cycle check follows what runs when a
module is imported (module level, `if TYPE_CHECKING:` blocks left out).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("steer", "hub", "train", "apps")
# A package may import only the packages on its floor and below it.
FLOOR = {name: index for index, name in enumerate(PACKAGES)}
# (importing module, enclosing function, imported package): the one import DESIGN.md allows upward.
ALLOWED_UPWARD = {("steer.spec", "load_sae_reference", "hub")}
CLI = "apps.cli"
# Modules allowed to import the CLI besides the CLI itself: `python -m apps`.
CLI_IMPORTERS = {"apps.__main__"}
# Runs in its own venv beside SAELens, so it must not need fast-steer at all.
STANDALONE = {"apps.bench.saelens_worker"}


@dataclass(frozen=True)
class Import:
    """One import statement's project target, and where it stands."""

    source: str
    target: str
    line: int
    function: str | None
    """The innermost enclosing function, or None for an import that runs when the module is imported."""
    type_checking: bool


def module_name(path: Path, root: Path) -> str:
    """`apps/cli/__init__.py` -> `apps.cli`; `apps/cli/bench.py` -> `apps.cli.bench`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of the four packages, by dotted name."""
    return {
        module_name(path, root): path
        for package in PACKAGES
        for path in sorted((root / package).rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _targets(
    node: ast.Import | ast.ImportFrom, source: str, is_package: bool, modules: set[str]
) -> list[str]:
    """The project modules one import statement names (a submodule where `from x import y` names one)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] in PACKAGES]
    if node.level:
        package = source.split(".") if is_package else source.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] not in PACKAGES:
        return []
    return list(
        dict.fromkeys(
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
        )
    )


def _named_modules(node: ast.AST, modules: set[str]) -> list[str]:
    """Modules loaded by name: `import_module("x.y")`, or a tuple/list of module names (a command registry)."""
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
    ):
        names = node.args[:1]
    elif isinstance(node, ast.Tuple | ast.List):
        names = node.elts
    else:
        return []
    values = [name.value for name in names if isinstance(name, ast.Constant) and isinstance(name.value, str)]
    return values if values and len(values) == len(names) and set(values) <= modules else []


def imports_of(source: str, path: Path, modules: set[str]) -> list[Import]:
    """The project imports of one module, each with its enclosing function and TYPE_CHECKING guard."""
    found: list[Import] = []
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, function: str | None, type_checking: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            targets = _targets(node, source, is_package, modules)
        else:
            targets = _named_modules(node, modules)
        found.extend(Import(source, target, node.lineno, function, type_checking) for target in targets)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            function = getattr(node, "name", "<lambda>")
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                visit(statement, function, True)
            for statement in node.orelse:
                visit(statement, function, type_checking)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, function, type_checking)

    visit(ast.parse(path.read_text(), filename=str(path)), None, False)
    return found


def all_imports(root: Path) -> list[Import]:
    """The project imports of every module of the four packages."""
    modules = project_modules(root)
    return [found for name, path in modules.items() for found in imports_of(name, path, set(modules))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path `a -> b -> ... -> a` through the graph, or None when it has no cycle."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def _where(found: Import) -> str:
    inside = f" (in {found.function})" if found.function else ""
    return f"{found.source}:{found.line}{inside} imports {found.target}"


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = all_imports(ROOT)
    assert {item.source.split(".")[0] for item in found} == set(PACKAGES), "every package was read"
    return found


def test_floors_import_only_downwards(imports: list[Import]) -> None:
    upward = [
        _where(found)
        for found in imports
        if FLOOR[found.target.split(".")[0]] > FLOOR[found.source.split(".")[0]]
        and (found.source, found.function, found.target.split(".")[0]) not in ALLOWED_UPWARD
    ]
    assert not upward, "imports that run up a floor (steer <- hub <- train <- apps):\n" + "\n".join(upward)


def test_steer_imports_hub_in_one_function_only(imports: list[Import]) -> None:
    """The one documented upward import exists where DESIGN.md says, inside its function."""
    allowed = [
        found
        for found in imports
        if (found.source, found.function, found.target.split(".")[0]) in ALLOWED_UPWARD
    ]
    assert [(found.source, found.function, found.target) for found in allowed] == [
        ("steer.spec", "load_sae_reference", "hub")
    ]


def test_cli_is_the_top_floor(imports: list[Import]) -> None:
    into_cli = [
        _where(found)
        for found in imports
        if (found.target == CLI or found.target.startswith(CLI + "."))
        and not (found.source == CLI or found.source.startswith(CLI + "."))
        and found.source not in CLI_IMPORTERS
    ]
    assert not into_cli, "modules below the CLI that import it:\n" + "\n".join(into_cli)


def test_standalone_workers_import_nothing_from_the_project(imports: list[Import]) -> None:
    modules = project_modules(ROOT)
    assert set(modules) >= STANDALONE
    leaks = [_where(found) for found in imports if found.source in STANDALONE]
    assert not leaks, "standalone modules that import fast-steer:\n" + "\n".join(leaks)


def test_no_import_cycle(imports: list[Import]) -> None:
    graph: dict[str, set[str]] = {}
    for found in imports:
        if found.function is None and not found.type_checking and found.target != found.source:
            graph.setdefault(found.source, set()).add(found.target)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_checker_sees_relative_function_level_guarded_and_named_imports(tmp_path: Path) -> None:
    """The parser resolves what the four packages' checks rely on, so a real violation cannot slip by."""
    package = tmp_path / "hub" / "formats"
    package.mkdir(parents=True)
    (tmp_path / "hub" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("from . import gguf\n")
    (package / "gguf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from ..formats import gguf as same\n"
        "if TYPE_CHECKING:\n    import train.data\n"
        "def load():\n    from apps.cli import main\n"
        "PLUGINS = ('hub.formats', 'hub')\nNAMES = ('hub', 'not a module')\n"
        "importlib.import_module('hub')\n"
    )
    modules = {"hub", "hub.formats", "hub.formats.gguf"}
    found = imports_of("hub.formats.gguf", package / "gguf.py", modules)
    assert [(f.target, f.line, f.function, f.type_checking) for f in found] == [
        ("hub.formats.gguf", 2, None, False),
        ("train.data", 4, None, True),
        ("apps.cli", 6, "load", False),
        ("hub.formats", 7, None, False),
        ("hub", 7, None, False),
        ("hub", 9, None, False),
    ]
    assert [f.target for f in imports_of("hub.formats", package / "__init__.py", modules)] == [
        "hub.formats.gguf"
    ]


def test_cycle_finder_reports_the_path() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]

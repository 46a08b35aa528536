"""The layout of docs/architecture.md s.5, asserted on the import statements of every ``.py`` file
(read with ``ast``, nothing is imported): the library imports no application, an application
imports the library and ``memflow_apps.shared`` but no other application, and the shared module
imports the library only. The one exception: the ``memflow`` command hands ``memflow eval``,
``memflow demo``, ``memflow compare`` and ``memflow live`` to the benchmark's, the world's and
the live page's own code, imported inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
#: The folders holding code; each folder is its import path.
PACKAGES = ("memflow_adapter", "integrations", "memflow_apps", "recipes")
APPLICATIONS = ("cli", "eval", "world", "live", "recipes")
#: (importing layer, imported module): the ``memflow`` command's dispatch, function-local only.
DISPATCH = {
    ("cli", "memflow_apps.eval.cli"),
    ("cli", "memflow_apps.eval.compare"),
    ("cli", "memflow_apps.world.demo"),
    ("cli", "memflow_apps.world.compare"),
    ("cli", "memflow_apps.live"),
}


def dispatched(own: str | None, module: str) -> str | None:
    """The dispatch target ``module`` is (or is a name of), if ``own`` may import it lazily."""
    for source, target in DISPATCH:
        if own == source and (module == target or module.startswith(target + ".")):
            return target
    return None


def layer(module: str) -> str | None:
    """The layer of a dotted module name: ``library``, ``shared``, an application's name,
    ``apps`` (the bare ``memflow_apps`` package), or ``None`` for anything outside the project."""
    top, _, rest = module.partition(".")
    if top in ("memflow_adapter", "integrations"):
        return "library"
    if top == "recipes":
        return "recipes"
    if top == "memflow_apps":
        sub = rest.partition(".")[0]
        return sub if sub in ("shared", *APPLICATIONS) else "apps"
    return None


def module_of(path: Path) -> str:
    parts = list(path.relative_to(REPOSITORY).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, module, inside a function)`` for every import in ``path``; a ``from M import n``
    gives ``M`` and ``M.n`` (``n`` may be a submodule), relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    source = ".".join([*base, *([child.module] if child.module else [])])
                else:
                    source = child.module or ""
                found.append((child.lineno, source, in_function))
                found.extend((child.lineno, f"{source}.{alias.name}", in_function)
                             for alias in child.names if alias.name != "*")
            visit(child, local)

    visit(tree, False)
    return found


def python_files() -> list[Path]:
    return [path for package in PACKAGES for path in sorted((REPOSITORY / package).rglob("*.py"))]


def offenders(allowed: dict[str, set[str | None]]) -> list[str]:
    """``path:line -> module`` for each import from a file of a layer in ``allowed`` of a module
    whose layer is not allowed there (the dispatch exception applied)."""
    found = []
    for path in python_files():
        own = layer(module_of(path))
        if own not in allowed:
            continue
        for line, module, in_function in imports(path):
            imported = layer(module)
            if imported in allowed[own] or imported == own:
                continue
            if in_function and dispatched(own, module):
                continue
            found.append(f"{path.relative_to(REPOSITORY)}:{line} -> {module}")
    return sorted(set(found))


def test_every_package_has_code_and_the_layers_are_known():
    """Guards the tests below against passing on an empty or renamed tree."""
    layers = {layer(module_of(path)) for path in python_files()}
    assert layers == {"library", "shared", "apps", *APPLICATIONS}


def test_the_library_imports_no_application():
    assert offenders({"library": {None}}) == []


def test_the_shared_module_imports_the_library_only():
    assert offenders({"shared": {None, "library"}}) == []


@pytest.mark.parametrize("application", APPLICATIONS)
def test_an_application_imports_the_library_and_shared_but_no_other_application(application):
    assert offenders({application: {None, "library", "shared"}}) == []


def test_the_apps_package_itself_imports_nothing_of_the_project():
    assert offenders({"apps": {None}}) == []


def test_the_command_dispatches_to_eval_the_world_and_live_only_inside_functions():
    """``memflow --help`` must not load the benchmark, the world or the live page: the dispatch
    imports are function-local, and they are there (the exception above is not dead)."""
    dispatch = {}
    for path in python_files():
        if layer(module_of(path)) != "cli":
            continue
        for _, module, in_function in imports(path):
            target = dispatched("cli", module)
            if target:
                dispatch.setdefault(target, set()).add(in_function)
    assert dispatch == {module: {True} for _, module in DISPATCH}

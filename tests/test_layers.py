"""The layers of ``charlm/`` (docs/architecture.md, the import-linter contracts in ``.importlinter``): every module
sits in one, no module imports in a circle, and ``lint-imports`` refuses an import that runs upward."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info < (3, 11):  # import-linter and grimp (the dev extra's) need Python 3.11
    pytest.skip("import-linter needs Python 3.11", allow_module_level=True)

import grimp

REPO = Path(__file__).resolve().parent.parent
CONTRACTS = configparser.ConfigParser()
CONTRACTS.read(REPO / ".importlinter")
TOP_LEVEL_MODULES = {"__init__", "__main__", "cli", "config"}  # all else lives in a layer's package


def layer_names() -> list[str]:
    stack = CONTRACTS["importlinter:contract:layers"]
    return [name.strip() for line in stack["layers"].split("\n") if line.strip() for name in line.split("|")]


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself): Tarjan's."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1 or module in graph.find_modules_directly_imported_by(module):
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_imports_in_a_circle() -> None:
    """Imports inside functions and under TYPE_CHECKING count: a circle hidden in a function is still one."""
    graph = grimp.build_graph("charlm", exclude_type_checking_imports=False)
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(module)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert import_cycles(graph) == [["a.x", "a.y", "a.z"]]


def test_every_module_sits_in_a_layer() -> None:
    """Nothing loose at the top of charlm/ but the package itself, ``python -m charlm``, the CLI and the
    config; every package there is a layer of the contract."""
    package = REPO / "charlm"
    loose = {p.stem for p in package.glob("*.py")}
    assert loose == TOP_LEVEL_MODULES
    packages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert packages <= set(layer_names())
    assert set(layer_names()) == packages | (TOP_LEVEL_MODULES - {"__init__"})


@pytest.mark.parametrize(("importer", "imported"), [("model/char_lm.py", "charlm.training.fit"),
                                                     ("generation/beam.py", "charlm.evaluation.scoring"),
                                                     ("tools/viz/page.py", "charlm.tools.compare.plot")])
def test_lint_imports_refuses_a_planted_import(tmp_path: Path, importer: str, imported: str) -> None:
    """A copy of the package with one import added inside a function (upward, between siblings, between tools):
    ``lint-imports`` with this repository's contracts fails on it, and passes on the copy as it is."""
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is not installed (the dev extra)"
    shutil.copytree(REPO / "charlm", tmp_path / "charlm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([lint, "--no-cache"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})

    clean = run()
    assert clean.returncode == 0, clean.stdout + clean.stderr
    with (tmp_path / "charlm" / importer).open("a") as f:
        f.write(f"\n\ndef _planted() -> None:\n    import {imported}  # noqa: F401\n")
    planted = run()
    assert planted.returncode != 0 and "BROKEN" in planted.stdout
    assert importer.removesuffix(".py").replace("/", ".") in planted.stdout

"""The design card's boundaries, read from the source: storage knows nothing of models, segmentation nothing of
Prefect or the flows, no module reaches into another's private names, and module-level imports form no circle.

These are checked on the import statements themselves (``ast``), so an import inside a function counts as much
as one at the top: a circle closed by a lazy import (``storage.ingest`` dispatching to a reader that imported its
helpers back from ``storage.ingest``) still ties the two modules together.  Imports for type checkers alone
(``if TYPE_CHECKING:``) load nothing and are left out of the circles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("storage", "segmentation", "flows")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(module, names imported from it, whether it loads the module when run: not under ``if TYPE_CHECKING``)
    per import statement."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for inner in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [a.name for a in node.names], id(node) not in typing_only))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], id(node) not in typing_only) for a in node.names)
    return found


def _targets(module: str, names: list[str]) -> list[str]:
    """The segflow modules an import loads: ``from segmentation import models`` is the submodule."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or ([module] if module in MODULES else [])


@pytest.mark.parametrize("package, forbidden", [
    ("storage", ("segmentation", "flows", "torch", "monai", "prefect", "prefect_dask")),
    ("segmentation", ("flows", "prefect", "prefect_dask")),
])
def test_packages_stay_in_their_layer(package: str, forbidden: tuple[str, ...]) -> None:
    bad = [f"{name}: imports {module}" for name, path in MODULES.items() if name.split(".")[0] == package
           for module, _, _ in _imports(path) if module.split(".")[0] in forbidden]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [f"{name}: from {module} import {n}" for name, path in MODULES.items()
           for module, names, _ in _imports(path) if module.split(".")[0] in PACKAGES and module != name
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "share helpers through a module made for them:\n" + "\n".join(bad)


def test_imports_form_no_circle() -> None:
    graph = {name: sorted({t for module, names, runs in _imports(path) if runs for t in _targets(module, names)
                           if t != name and not name.startswith(t + ".")})  # a package's own __init__: no edge
             for name, path in MODULES.items()}
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_checks_see_the_imports() -> None:
    """The walk finds what it should (a check that parsed nothing would pass everything)."""
    assert len(MODULES) > 100
    ingest = {module for module, _, _ in _imports(MODULES["storage.ingest"])}
    assert {"storage.inputfiles", "storage.geotiff", "storage.nifti"} <= ingest
    assert _targets("segmentation", ["models"]) == ["segmentation.models"]
    typing_only = [m for m, _, runs in _imports(MODULES["segmentation.validation"]) if not runs]
    assert typing_only == ["segmentation.training"]

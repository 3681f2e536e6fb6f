"""The package's import graph: every module imports on its own, first, in a new process (an
import cycle shows only when a module of the cycle is imported first), and no library module
imports a CLI module (``fedmerge_plugins/cli.py``, ``*/cli.py``), at module level or in a
function."""

from __future__ import annotations

import ast
import multiprocessing
import traceback
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedmerge_plugins"
# Imported once by the server that forks each test process (not fedmerge, nor mergekit: importing
# mergekit's registry runs fedmerge's autoload hook, which imports fedmerge modules).
PRELOAD = ["torch", "numpy", "yaml", "click", "tqdm.auto", "safetensors.torch", "transformers", "peft"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def is_cli(module: str) -> bool:
    return module == "fedmerge_plugins.cli" or (module.startswith("fedmerge_plugins.") and module.endswith(".cli"))


def import_alone(module: str) -> Optional[str]:
    """Run in a process of its own: ``module`` is the first fedmerge module imported there."""
    import importlib
    import sys

    already = sorted(m for m in sys.modules if m == "fedmerge_plugins" or m.startswith("fedmerge_plugins."))
    if already:
        return f"not alone: {already} already imported"
    try:
        importlib.import_module(module)
    except BaseException:
        return traceback.format_exc(limit=-3)
    return None


@pytest.fixture(scope="module")
def import_failures() -> Dict[str, str]:
    """{module: traceback} for the modules that fail to import first in a new process. Each
    runs in a process forked from a server that has only third-party libraries loaded (a new
    interpreter, started once, so that torch is not imported 80 times)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    with context.Pool(processes=2, maxtasksperchild=1) as pool:
        results = pool.map(import_alone, MODULES, chunksize=1)
    return {module: error for module, error in zip(MODULES, results) if error is not None}


def test_the_package_has_the_modules_the_check_expects() -> None:
    assert {"fedmerge_plugins", "fedmerge_plugins.cli", "fedmerge_plugins.methods.common", "fedmerge_plugins.store"} <= set(MODULES)
    assert len(MODULES) > 60


@pytest.mark.parametrize("module", MODULES)
def test_each_module_imports_first_and_alone(module: str, import_failures: Dict[str, str]) -> None:
    assert module not in import_failures, import_failures.get(module)


def imported_modules(path: Path) -> List[Tuple[int, str]]:
    """(line, module) of every import in ``path``; ``from a import b`` gives ``a`` and ``a.b``
    (``b`` may be a module)."""
    found: List[Tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: a relative import (the package uses absolute ones)"
            base = node.module or ""
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def cli_imports(path: Path) -> List[str]:
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}" for line, module in imported_modules(path) if is_cli(module)]


LIBRARY = [p for p in sorted(PACKAGE.rglob("*.py")) if not is_cli(module_name(p))]
@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_library_module_imports_a_cli_module(path: Path) -> None:
    assert cli_imports(path) == []


def test_the_cli_scan_sees_imports_in_functions(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from fedmerge_plugins.cli import one_line_errors\n\nfrom fedmerge_plugins.sweep import cli\n")
    assert sorted(module for _, module in imported_modules(sample) if is_cli(module)) == ["fedmerge_plugins.cli", "fedmerge_plugins.sweep.cli"]


# The README's "Where things are", lowest first: a unit imports only from its own layer and
# the layers before it (at module level or in a function). Not checked: the package's own
# __init__ (the autoload's entry, which wires in guards/) and the CLI modules (the top).
LAYERS = [
    {"errors", "boundary", "files", "numerics", "store", "catalogue"},
    {"norms"},
    {"methods"},
    {"guards"},
    {"search"},
    {"evaluation"},
    {"diagnostics"},
    {"clip"},
    {"sweep"},
    {"demo"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> Optional[str]:
    """The layer unit (a subpackage or a top-level module) of a fedmerge module; None for the
    package itself and for names that are not modules."""
    parts = module.split(".")
    if parts[0] != "fedmerge_plugins" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in RANK or parts[1] == "cli" else None


def upward_imports(path: Path) -> List[str]:
    own = unit_of(module_name(path))
    return [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} (layer {RANK[unit]} > {RANK[own]})"
        for line, module in imported_modules(path)
        if not is_cli(module) and (unit := unit_of(module)) is not None and unit in RANK and RANK[unit] > RANK[own]
    ]


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {unit_of(m) or m for m in MODULES if m != "fedmerge_plugins" and not is_cli(m)}
    assert units == set(RANK)


@pytest.mark.parametrize(
    "path", [p for p in LIBRARY if module_name(p) != "fedmerge_plugins"], ids=lambda p: str(p.relative_to(PACKAGE.parent))
)
def test_no_module_imports_from_a_higher_layer(path: Path) -> None:
    assert upward_imports(path) == []

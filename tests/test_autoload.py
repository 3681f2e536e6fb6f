"""The methods reach mergekit with no import and no wrapper, for editable and regular
installs, without importing torch or mergekit at interpreter start-up."""

from __future__ import annotations

import importlib
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import BIN

METHODS = ("fednova", "fedgma", "median", "cclip")


def python(code: str, *flags: str, cwd: Path | None = None) -> str:
    run = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip()


def test_start_up_imports_neither_torch_nor_mergekit() -> None:
    out = python(
        "import sys; print(sorted(m for m in ('torch', 'mergekit', 'fedmerge_plugins', 'importlib.abc', 'typing') if m in sys.modules));"
        "print(type(sys.meta_path[0]).__name__ if not isinstance(sys.meta_path[0], type) else sys.meta_path[0].__name__)"
    )
    assert out.splitlines() == ["[]", "FedmergePostImportFinder"]


def test_mergekit_registry_has_the_methods_without_any_import_of_ours() -> None:
    out = python(
        "from mergekit.merge_methods import registry\n"
        f"print(' '.join(registry.get(n).spec.name for n in {METHODS!r}))"
    )
    assert out == " ".join(METHODS)


@pytest.mark.parametrize("first", [
    "fedmerge_plugins.methods", "fedmerge_plugins.methods.params", "fedmerge_plugins.methods.fednova",
    "fedmerge_plugins.guards.recipe", "mergekit.merge_methods", "mergekit.merge_methods.registry",
])
def test_every_import_order_registers_all_four(first: str) -> None:
    """register() takes a method from a completed import: whichever module a program
    imports first, the registry ends with all four (-S: without the autoload, the methods
    package registers them itself at the end of its import)."""
    code = (
        f"import {first}\n"
        "from mergekit.merge_methods import registry\n"
        f"print(' '.join(n for n in {METHODS!r} if n in {{m.spec.name for m in registry.registered_methods()}}))"
    )
    assert python(code) == " ".join(METHODS)
    purelib = sysconfig.get_paths()["purelib"]
    root = str(Path(__file__).resolve().parents[1])
    bare = f"import sys; sys.path[:0] = [{root!r}, {purelib!r}]\nimport fedmerge_plugins.methods.params\n" + code
    assert python(bare, "-S") == " ".join(METHODS)


def test_mergekit_yaml_help_still_works() -> None:
    run = subprocess.run([str(BIN / "mergekit-yaml"), "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "CONFIG_FILE" in run.stdout


def test_register_is_idempotent_and_survives_a_registry_reload() -> None:
    import fedmerge_plugins
    from mergekit.merge_methods import registry

    fedmerge_plugins.register()
    fedmerge_plugins.register()
    reloaded = importlib.reload(registry)
    assert all(reloaded.get(name).spec.name == name for name in METHODS)
    for _ in range(2):
        fedmerge_plugins.install_planner_check()
        fedmerge_plugins.install_run_merge_check()
    import mergekit.merge
    from mergekit.plan import MergePlanner

    for hooked in (MergePlanner.__init__, mergekit.merge.run_merge):
        assert hooked.fedmerge_checked
        assert not getattr(hooked.__wrapped__, "fedmerge_checked", False)  # wrapped once


@pytest.mark.slow
def test_regular_wheel_install_autoloads(tmp_path: Path) -> None:
    """Build the wheel, install it into a bare directory, and load it the way ``site``
    loads site-packages: the .pth at its root registers the methods."""
    root = Path(__file__).resolve().parents[1]
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fedmerge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {"fedmerge_autoload.pth", "fedmerge_autoload.py", "fedmerge_plugins/__init__.py"}
    shipped.add("fedmerge_plugins/evaluation/lm_eval_tasks/fedmerge_gsm8k.yaml")  # eval/ travels too
    assert shipped <= set(names)
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    # -S: no site-packages of this environment (so not our editable install's .pth);
    # mergekit and torch are reachable through a plain sys.path entry, which runs no .pth.
    code = (
        "import site, sys\n"
        f"site.addsitedir({str(target)!r})\n"
        f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "from mergekit.merge_methods import registry\n"
        "import fedmerge_plugins\n"
        f"print(registry.get('cclip').spec.name, fedmerge_plugins.__file__.startswith({str(target)!r}))"
    )
    assert python(code, "-S", cwd=tmp_path) == "cclip True"  # not the checkout's package


def test_mergekit_suite_is_skipped_in_one_line_when_offline(tmp_path: Path) -> None:
    """``make mergekit-tests`` (.ci/mergekit_suite.py) without a reachable package index:
    one line saying why, exit 0, nothing half-made in its cache."""
    import os

    script = Path(__file__).resolve().parents[1] / ".ci" / "mergekit_suite.py"
    env = {**os.environ, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "3",
           "PIP_NO_INDEX": "", "PIP_FIND_LINKS": ""}
    done = subprocess.run([sys.executable, str(script), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [done.stdout.strip()] and done.stdout.startswith(
        "mergekit-tests: skipped: cannot fetch mergekit==") and "from the package index" in done.stdout
    assert not list((tmp_path / "cache").rglob("*.tar.gz"))

"""Run the installed mergekit's own test suite with fedmerge installed (issue 31, item 15).

usage: python .ci/mergekit_suite.py [--cache DIR] [PYTEST_ARGS...]

fedmerge puts hooks into every program that imports mergekit; mergekit's own tests are the
check that they change nothing mergekit promises. The sdist of the installed version is
fetched once from the package index (``pip download``, so pip's index settings apply) into
the cache, and its ``tests/`` run against the installed mergekit (the cache holds no
``mergekit`` folder to shadow it). mergekit's sdist lacks ``tests/common.py``, a helper its
merge tests import: it is taken from ``$MERGEKIT_TESTS_COMMON`` if set, else from
``mergekit_tests_common.py`` beside this script (mergekit's own file, copied unchanged);
without it those modules are skipped, named in one line. Offline (no sdist): one line,
exit 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import List

SHIPPED_COMMON = Path(__file__).with_name("mergekit_tests_common.py")
NEEDS_COMMON = ("tests.common", "tests.test_tokenizer")  # test_tokenizer imports tests.common


def say(message: str) -> None:
    print(f"mergekit-tests: {message}", flush=True)


def sdist(version: str, folder: Path) -> Path | None:
    """The sdist of mergekit ``version`` in ``folder``, downloaded if it is not there yet."""
    found = sorted(folder.glob(f"mergekit-{version}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
               f"mergekit=={version}", "-d", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True)
    found = sorted(folder.glob(f"mergekit-{version}.tar.gz"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
        say(f"skipped: cannot fetch mergekit=={version}'s sdist from the package index (offline?): {last}")
        return None
    return found[0]


def unpack_tests(archive: Path, target: Path) -> None:
    """``tests/`` and ``pyproject.toml`` (pytest's settings) of the sdist, as a package."""
    if (target / "tests").is_dir():
        return
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as tar:
        root = tar.getnames()[0].split("/")[0]
        members = [m for m in tar.getmembers() if m.name.startswith((f"{root}/tests/", f"{root}/pyproject.toml"))]
        tar.extractall(partial, members=members, filter="data")
    (partial / root / "tests" / "__init__.py").touch()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial / root, target)
    shutil.rmtree(partial, ignore_errors=True)


def provide_common(tests: Path) -> bool:
    """tests/common.py in place: from $MERGEKIT_TESTS_COMMON or the copy beside this script."""
    common = tests / "common.py"
    if common.is_file():
        return True
    source = Path(os.environ.get("MERGEKIT_TESTS_COMMON") or SHIPPED_COMMON)
    try:
        text = source.read_bytes()
    except OSError as error:
        say(f"tests/common.py (not in mergekit's sdist) unavailable: {error}")
        return False
    common.with_suffix(".partial").write_bytes(text)
    os.replace(common.with_suffix(".partial"), common)
    return True


def needing_common(tests: Path) -> List[str]:
    return sorted(p.name for p in tests.glob("test_*.py") if any(m in p.read_text(encoding="utf-8") for m in NEEDS_COMMON))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/mergekit-tests"))
    options, pytest_args = parser.parse_known_args()
    version = importlib.metadata.version("mergekit")
    cache = options.cache.resolve()
    archive = sdist(version, cache / "sdist")
    if archive is None:
        return 0
    root = cache / f"mergekit-{version}"
    unpack_tests(archive, root)
    ignored: List[str] = []
    if not provide_common(root / "tests"):
        ignored = needing_common(root / "tests")
        say(f"skipping {', '.join(ignored)} (they import tests/common.py)")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(root / "pyproject.toml"),
               "--rootdir", str(root), *[f"--ignore=tests/{name}" for name in ignored], *pytest_args, "tests"]
    say(f"mergekit {version}'s tests with fedmerge installed ({' '.join(command[1:])})")
    return subprocess.run(command, cwd=root).returncode


if __name__ == "__main__":
    sys.exit(main())

"""A merge's output appears at its path only once it is complete.

mergekit writes the weight shards, then ``config.json``, then the tokenizer straight into
the output folder, and nothing marks a finished merge: a merge killed after
``config.json`` leaves a folder that loads as a model. ``staged_output`` gives mergekit a
hidden folder next to the output (``.NAME.fedmerge-partial-PID-*/NAME``, so the model
card's name is unchanged) and, when the merge returns, moves it into place with one
``rename``. Into an existing output folder, its ``config.json`` and the weight files the new
merge does not replace are removed first, the new files are moved in, and the new
``config.json`` comes last, so at no moment does the folder hold a config next to weights
of another merge. A merge that fails removes its staging
folder (partial shards included); one that is killed leaves it hidden, and the next merge
to the same path removes it once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List

from fedmerge_plugins.errors import FedmergeError

CONFIG = "config.json"
PARTIAL = ".fedmerge-partial-"
WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


class OutputError(FedmergeError):
    """An output path that cannot receive a merge."""


def _missing_ancestors(folder: Path) -> List[Path]:
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead(parent: Path, pattern: re.Pattern[str]) -> None:
    """Remove the folders in ``parent`` whose name ``pattern`` matches with a process id
    (its first group) that is no longer running."""
    for entry in parent.iterdir():
        found = pattern.match(entry.name)
        if found and entry.is_dir() and not entry.is_symlink() and not _alive(int(found.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


def remove_stale(parent: Path, name: str) -> None:
    """Remove staging folders for ``parent/name`` left by merges whose process is gone."""
    remove_dead(parent, re.compile(re.escape(f".{name}{PARTIAL}") + r"(\d+)-"))


def _replace(source: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


def publish(stage: Path, final: Path) -> None:
    """Move the finished ``stage`` folder to ``final``; its config.json arrives last."""
    if not final.exists():
        os.rename(stage, final)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(final / CONFIG)
    for entry in final.iterdir():  # another merge's weights would mix with these (its shards, its index)
        if WEIGHT_FILE.match(entry.name) and not (stage / entry.name).exists():
            entry.unlink()
    for entry in sorted(stage.iterdir()):
        if entry.name != CONFIG:
            _replace(entry, final / entry.name)
    if (stage / CONFIG).exists():
        os.replace(stage / CONFIG, final / CONFIG)


@contextlib.contextmanager
def staged_output(out_path: str) -> Iterator[str]:
    """Yield the folder mergekit should write to; it becomes ``out_path`` when the block
    ends normally and is removed when it raises."""
    final = Path(os.path.abspath(out_path))
    if final.exists() and not final.is_dir():
        raise OutputError(f"output path {out_path} is a file, not a folder")
    created = _missing_ancestors(final.parent)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, final.name)
    root = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}{os.getpid()}-", dir=final.parent))
    try:
        yield str(root / final.name)
        # mergekit may have written elsewhere under root (an architecture that refills
        # parameters into a new folder): publish whatever it left there
        for entry in sorted(root.iterdir()):
            publish(entry, final.parent / entry.name)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for folder in created:  # innermost first; only those still empty
            with contextlib.suppress(OSError):
                folder.rmdir()

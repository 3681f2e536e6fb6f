"""A merge's output appears at its path only once it is complete.

mergekit writes the weight shards, then ``config.json``, then the tokenizer straight into
the output folder, and nothing marks a finished merge: a merge killed after
``config.json`` leaves a folder that loads as a model. ``staged_output`` gives mergekit a
hidden folder next to the output (``.NAME.fedmerge-partial-PID-*/NAME``, so the model
card's name is unchanged) and, when the merge returns, moves it into place with one
``rename``. Into an existing output folder, its ``config.json`` and every other file an
earlier merge wrote that the new one does not replace (weight shards and index, model card,
``mergekit_config.yml``, tokenizer files) are removed first, the new files are moved in,
and the new ``config.json`` comes last, so at no moment does the folder hold a config
next to weights of another merge, and nothing of the earlier merge describes the new one
(other files, e.g. the user's notes, stay). Published files get the mode the umask gives
(safetensors writes weights 0600). A merge that fails removes its staging folder (partial
shards included); a full disk or a folder it cannot write to is an ``OutputError`` naming
the output path; a merge that is killed leaves its staging folder hidden, and the next
merge to the same path removes it once its process is gone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.files import WRITE_ERRNOS, follow_umask, refused_errno

CONFIG = "config.json"
PARTIAL = ".fedmerge-partial-"
# what a merge writes into its folder: weights (shards, index), config, card, recipe, tokenizer
MERGE_FILE = re.compile(
    r"^((model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?"
    r"|(generation_)?config\.json|mergekit_config\.yml|README\.md"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(json|txt)|merges\.txt|chat_template\.(jinja|json))$"
)
# a full disk or quota, a file too large, a folder one may not write to


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
    for file in stage.rglob("*"):
        if file.is_file() and not file.is_symlink():
            follow_umask(file)
    if not final.exists():
        os.rename(stage, final)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(final / CONFIG)
    for entry in final.iterdir():  # the earlier merge's files would mix with these or describe them
        if MERGE_FILE.match(entry.name) and entry.is_file() and not (stage / entry.name).exists():
            entry.unlink()
    for entry in sorted(stage.iterdir()):
        if entry.name != CONFIG:
            _replace(entry, final / entry.name)
    if (stage / CONFIG).exists():
        os.replace(stage / CONFIG, final / CONFIG)


def _write_errno(error: BaseException, root: Path) -> Optional[int]:
    """The errno of a write refused under ``root`` (``files.refused_errno``), else None."""
    if isinstance(error, OSError) and error.filename is not None and not Path(os.path.abspath(error.filename)).is_relative_to(root):
        return None
    return refused_errno(error)


def _output_error(out_path: str, code: int) -> OutputError:
    return OutputError(f"cannot write the merge to {out_path}: {os.strerror(code)}")


@contextlib.contextmanager
def staged_output(out_path: str) -> Iterator[str]:
    """Yield the folder mergekit should write to; it becomes ``out_path`` when the block
    ends normally and is removed when it raises."""
    final = Path(os.path.abspath(out_path))
    if final.exists() and not final.is_dir():
        raise OutputError(f"output path {out_path} is a file, not a folder")
    created = _missing_ancestors(final.parent)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(final.parent, final.name)
        root = Path(tempfile.mkdtemp(prefix=f".{final.name}{PARTIAL}{os.getpid()}-", dir=final.parent))
    except OSError as error:
        _remove_empty(created)
        if error.errno not in WRITE_ERRNOS:
            raise
        raise _output_error(out_path, error.errno) from None
    try:
        yield str(root / final.name)
        # mergekit may have written elsewhere under root (an architecture that refills
        # parameters into a new folder): publish whatever it left there
        for entry in sorted(root.iterdir()):
            publish(entry, final.parent / entry.name)
    except Exception as error:
        code = _write_errno(error, final.parent)
        if code is None:
            raise
        raise _output_error(out_path, code) from None
    finally:
        shutil.rmtree(root, ignore_errors=True)
        _remove_empty(created)


def _remove_empty(created: List[Path]) -> None:
    for folder in created:  # innermost first; only those still empty
        with contextlib.suppress(OSError):
            folder.rmdir()

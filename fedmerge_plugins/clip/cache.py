"""Where the CLIP adapter keeps what it computes once (heads, preprocessed images,
fine-tuned accuracies), and how it recognises that an input has not changed.

Default location: ``$FEDMERGE_CACHE_DIR/clip`` (``~/.cache/fedmerge/clip``). Entries are
keyed by a ``digest`` (``fedmerge_plugins.store``) of everything they depend on; a
local file's identity is the store's ``file_identity`` (path, size, mtime, ctime, inode), so
a rewritten checkpoint or data folder gets a new entry even when its size and mtime are put
back. Fine-tuned accuracies go to ``finetuned.json``, a locked ``JsonStore``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, List, Optional

from fedmerge_plugins.norms.cache import cache_dir
from fedmerge_plugins.store import JsonStore, file_identity

LOG = logging.getLogger(__name__)
KEY_LENGTH = 24  # hex digits of the digest in a CLIP cache key


def clip_cache_dir(override: Optional[Path] = None) -> Path:
    return Path(override) if override is not None else cache_dir() / "clip"


def valid_accuracy(entry: object) -> bool:
    """Whether a ``finetuned.json`` entry is ``{"accuracy": number in [0, 1], …}``."""
    accuracy = entry.get("accuracy") if isinstance(entry, dict) else None
    return isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and 0 <= accuracy <= 1


def finetuned_store(cache_root: Path) -> JsonStore:
    """The fine-tuned towers' own accuracies, ``<cache_root>/finetuned.json``."""
    return JsonStore(Path(cache_root) / "finetuned.json", what="CLIP cache", log=LOG, valid=valid_accuracy)


def source_identity(source: str) -> List[Any]:
    """Identity of a model or data source: for a local folder or file, every file under it
    with its file identity; for anything else (a hub id), the name itself."""
    path = Path(source)
    if not path.exists():
        return [source]
    root = path.resolve()
    if root.is_file():
        return list(file_identity(str(root)))
    entries: List[Any] = [str(root)]
    for directory, folders, files in os.walk(root):
        folders.sort()
        for name in sorted(files):
            full = os.path.join(directory, name)
            entries.append([os.path.relpath(full, root), *file_identity(full)[1:]])
    return entries

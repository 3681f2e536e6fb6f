"""Where the CLIP adapter keeps what it computes once (heads, preprocessed images,
fine-tuned accuracies), and how it recognises that an input has not changed.

Default location: ``$FEDMERGE_CACHE_DIR/clip`` (``~/.cache/fedmerge/clip``). Entries are
keyed by a digest of everything they depend on; a local file's identity is the norm
cache's (path, size, mtime, ctime, inode), so a rewritten checkpoint or data folder gets a
new entry even when its size and mtime are put back.
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from fedmerge_plugins.files import write_atomic
from fedmerge_plugins.norms.cache import cache_dir, file_identity

LOG = logging.getLogger(__name__)


def clip_cache_dir(override: Optional[Path] = None) -> Path:
    return Path(override) if override is not None else cache_dir() / "clip"


def digest(*parts: Any) -> str:
    """A short stable key for JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


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


class JsonStore:
    """A small JSON dictionary on disk, replaced atomically on every write. An optimisation:
    a file that cannot be read is empty, one that cannot be written is warned about once and
    the value is kept in memory for this process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._memory: Dict[str, Any] = {}
        self._warned = False

    def read(self) -> Dict[str, Any]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}
        return {**(entries if isinstance(entries, dict) else {}), **self._memory}

    def get(self, key: str) -> Any:
        return self.read().get(key)

    def put(self, key: str, value: Any) -> None:
        self._memory[key] = value
        entries = self.read()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(entries, indent=1))
        except OSError as error:
            if not self._warned:
                self._warned = True
                LOG.warning("fedmerge: cache %s not updated (%s); the value is kept in this process only", self.path, error.strerror or error)

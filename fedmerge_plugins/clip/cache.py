"""Where the CLIP adapter keeps what it computes once (heads, preprocessed images,
fine-tuned accuracies), and how it recognises that an input has not changed.

Default location: ``$FEDMERGE_CACHE_DIR/clip`` (``~/.cache/fedmerge/clip``). Entries are
keyed by a digest of everything they depend on; a local file's identity is its path,
size and modification time, so a rewritten checkpoint or data folder gets a new entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from fedmerge_plugins.norm_cache import cache_dir


def clip_cache_dir(override: Optional[Path] = None) -> Path:
    return Path(override) if override is not None else cache_dir() / "clip"


def digest(*parts: Any) -> str:
    """A short stable key for JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def source_identity(source: str) -> List[Any]:
    """Identity of a model or data source: for a local folder or file, every file under it
    with size and mtime; for anything else (a hub id), the name itself."""
    path = Path(source)
    if not path.exists():
        return [source]
    root = path.resolve()
    if root.is_file():
        stat = root.stat()
        return [str(root), stat.st_size, stat.st_mtime_ns]
    entries: List[Any] = [str(root)]
    for directory, folders, files in os.walk(root):
        folders.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(directory, name))
            entries.append([os.path.relpath(os.path.join(directory, name), root), stat.st_size, stat.st_mtime_ns])
    return entries


class JsonStore:
    """A small JSON dictionary on disk, replaced atomically on every write."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Any:
        return self.read().get(key)

    def put(self, key: str, value: Any) -> None:
        entries = self.read()
        entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as handle:
            json.dump(entries, handle, indent=1)
        os.replace(tmp, self.path)

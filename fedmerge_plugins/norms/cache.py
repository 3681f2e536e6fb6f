"""The norm cache: global task-vector norms remembered across merges and processes.

Norms live in this process and in ``$FEDMERGE_CACHE_DIR/norms.json`` (default
``~/.cache/fedmerge``), a ``fedmerge_plugins.store.JsonStore``: locked, atomic, and
never a reason for a merge to fail (one warning line names the file and the reason; the
merge goes on with the norms computed in-process). An entry is ``{"norm": <finite float ≥
0>, …}``; any other entry is ignored and the norm computed again.

A norm is keyed by the ``file_identity`` (resolved path, size, mtime, ctime, inode) of every
weight file of the base and the task checkpoint, so a rewrite of a checkpoint, even one of
the same size whose mtime is put back (``cp -p``), gets a new key; no weight is read to
build it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins.store import FileIdentity, JsonStore, digest, file_identity

if TYPE_CHECKING:  # this module imports neither torch nor mergekit
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

LOG = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: files identified by (path, size, mtime_ns, ctime_ns, inode)


def cache_dir() -> Path:
    return Path(os.environ.get("FEDMERGE_CACHE_DIR") or Path.home() / ".cache" / "fedmerge")


def checkpoint_identity(index: ShardedTensorIndex) -> Tuple[FileIdentity, ...]:
    """The identity of every weight file of a checkpoint, in path order."""
    # A shard holds many tensors: resolve each file once, not once per tensor.
    files = sorted({os.path.realpath(os.path.join(index.base_path, f)) for f in set(index.tensor_paths.values())})
    return tuple(file_identity(path) for path in files)


def cache_key(base: ShardedTensorIndex, model: ShardedTensorIndex) -> str:
    return cache_keys(base, [model])[0]


def cache_keys(base: ShardedTensorIndex, models: Sequence[ShardedTensorIndex]) -> List[str]:
    """The key of each (base, model) pair; the base's files are looked at once."""
    base_identity = checkpoint_identity(base)
    return [digest(CACHE_VERSION, base_identity, checkpoint_identity(model)) for model in models]


def valid_norm(entry: object) -> Optional[float]:
    """The norm of a cache entry, or None unless it is ``{"norm": finite number ≥ 0}``."""
    if not isinstance(entry, dict):
        return None
    norm = entry.get("norm")
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) and norm >= 0 else None


class NormCache:
    """Norms by key, in ``path`` (default: ``norms.json`` in ``cache_dir()``, looked up at
    each call); one store, hence one memory, per file."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self._path = path
        self._stores: Dict[Path, JsonStore] = {}
        self._lock = threading.Lock()  # mergekit may run tasks in threads

    @property
    def path(self) -> Path:
        return self._path or cache_dir() / "norms.json"

    def _store(self) -> JsonStore:
        path = self.path
        with self._lock:
            if path not in self._stores:
                self._stores[path] = JsonStore(path, what="norm cache", log=LOG, valid=lambda e: valid_norm(e) is not None)
            return self._stores[path]

    def lookup(self, keys: Iterable[str]) -> Dict[str, float]:
        """The norms known for ``keys``: from memory, else from one read of the file."""
        return {key: float(entry["norm"]) for key, entry in self._store().lookup(keys).items()}

    def get(self, key: str) -> Optional[float]:
        return self.lookup([key]).get(key)

    def put(self, key: str, norm: float, **info: object) -> None:
        self.put_many({key: (norm, info)})

    def put_many(self, entries: Mapping[str, Tuple[float, Mapping[str, object]]]) -> None:
        """Remember ``{key: (norm, info)}`` here, and on disk when that works."""
        self._store().put_many({key: {"norm": norm, **info} for key, (norm, info) in entries.items()})

    def remember(self, key: str, norm: float) -> None:
        """Hold a norm computed elsewhere (a search's driver) in memory only."""
        self._store().remember(key, {"norm": float(norm)})


CACHE = NormCache()


def cached_norms(base: ShardedTensorIndex, models: Sequence[ShardedTensorIndex], cache: NormCache = CACHE) -> Optional[Dict[str, float]]:
    """``{cache key: norm}`` of each model's task vector against ``base``, in model order, when
    every one is cached (None otherwise); the keys go to ``NormCache.remember`` elsewhere."""
    keys = cache_keys(base, models)
    found = cache.lookup(keys)
    return {key: found[key] for key in keys} if all(key in found for key in keys) else None

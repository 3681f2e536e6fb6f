"""The on-disk norm cache: an optimisation that is never a reason for a merge to fail.

Global task-vector norms live in this process and in ``$FEDMERGE_CACHE_DIR/norms.json``
(default ``~/.cache/fedmerge``), keyed by the identity of the weight files of the base and
the task checkpoint: for every file its resolved path, size, modification time, status
change time (``st_ctime_ns``) and inode, as git's index does. A rewrite of a checkpoint,
even one of the same size whose mtime is put back (``cp -p``, ``rsync -a``, ``tar x``,
``os.utime``), changes its ctime and usually its inode, which no user-space tool can set
back, so the old norm is not used; no weight is read to build the key.

- Reading: a file that cannot be read, is not JSON, is not a JSON object, or an entry that
  is not ``{"norm": <finite float ≥ 0>, …}`` is ignored (the norm is computed again).
- Writing: under an exclusive ``fcntl.flock`` on ``norms.json.lock`` next to it, the file
  is read again, the new entries merged in (invalid ones dropped) and the result written to
  a temporary file that replaces it atomically, so concurrent merges lose no entry and
  readers never see a torn file. If the lock cannot be taken within ``LOCK_TIMEOUT_S`` or
  anything fails, nothing is written (no temporary file is left): the norm is kept in
  memory, and goes to disk with the next write of this process that succeeds.
- Every such problem is logged once per cache file and process, as one warning line that
  names the file and the reason; the merge goes on with the norms computed in-process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:  # this module imports neither torch nor mergekit
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

LOG = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: files identified by (path, size, mtime_ns, ctime_ns, inode)
LOCK_TIMEOUT_S = 10.0
FileIdentity = Tuple[str, int, int, int, int]


def cache_dir() -> Path:
    return Path(os.environ.get("FEDMERGE_CACHE_DIR") or Path.home() / ".cache" / "fedmerge")


def file_identity(path: str) -> FileIdentity:
    """(path, size, mtime_ns, ctime_ns, inode) of one file, from one ``stat``."""
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


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
    return [
        hashlib.sha256(json.dumps([CACHE_VERSION, base_identity, checkpoint_identity(model)]).encode()).hexdigest()
        for model in models
    ]


def valid_norm(entry: object) -> Optional[float]:
    """The norm of a cache entry, or None unless it is ``{"norm": finite number ≥ 0}``."""
    if not isinstance(entry, dict):
        return None
    norm = entry.get("norm")
    if isinstance(norm, bool) or not isinstance(norm, (int, float)):
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) and norm >= 0 else None


class CacheProblem(Exception):
    """Why the cache file could not be used; logged as a warning, never raised to callers."""


class NormCache:
    """In-process dictionary backed by one JSON file (see the module docstring)."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self._path = path
        self._memory: Dict[str, float] = {}
        self._lock = threading.Lock()
        self._warned: Set[str] = set()
        self._unsaved: Dict[str, dict] = {}  # entries a failed write left for the next one

    @property
    def path(self) -> Path:
        return self._path or cache_dir() / "norms.json"

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    # ---- reading --------------------------------------------------------------------

    def _warn(self, path: Path, reason: str, writing: bool = False) -> None:
        """One warning line per cache file and process; later problems go to the debug log."""
        if writing:
            message = f"fedmerge: norm cache {path} not updated: {reason}; new norms are kept in this process only"
        else:
            message = f"fedmerge: norm cache {path}: {reason}; ignored, the norms it lacks are computed in this process"
        if str(path) in self._warned:
            LOG.debug("%s", message)
            return
        self._warned.add(str(path))
        LOG.warning("%s", message)

    def _load(self, path: Path) -> Dict[str, object]:
        """The raw entries of ``path`` ({} if it does not exist); raises CacheProblem."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except NotADirectoryError:
            raise CacheProblem("a parent of it is not a directory") from None
        except (OSError, UnicodeError) as error:
            raise CacheProblem(f"cannot read it ({_reason(error)})") from None
        try:
            entries = json.loads(text)
        except ValueError as error:
            raise CacheProblem(f"not valid JSON ({error})") from None
        if not isinstance(entries, dict):
            raise CacheProblem(f"not a JSON object but a {type(entries).__name__}")
        return entries

    def _read_disk(self) -> Dict[str, float]:
        """The valid entries on disk; problems are warned about and read as no entries."""
        path = self.path
        try:
            entries = self._load(path)
        except CacheProblem as problem:
            self._warn(path, str(problem))
            return {}
        valid = {key: norm for key, entry in entries.items() if (norm := valid_norm(entry)) is not None}
        invalid = [key for key in entries if key not in valid]
        if invalid:
            example = json.dumps(entries[invalid[0]])[:60]
            self._warn(path, f"{len(invalid)} invalid entr{'y' if len(invalid) == 1 else 'ies'} (e.g. {invalid[0][:12]}: {example})")
        return valid

    def lookup(self, keys: Iterable[str]) -> Dict[str, float]:
        """The norms known for ``keys``: from memory, else from one read of the file."""
        keys = list(keys)
        with self._lock:
            if any(key not in self._memory for key in keys):
                disk = self._read_disk()
                self._memory.update({key: disk[key] for key in keys if key in disk and key not in self._memory})
            return {key: self._memory[key] for key in keys if key in self._memory}

    def get(self, key: str) -> Optional[float]:
        return self.lookup([key]).get(key)

    # ---- writing --------------------------------------------------------------------

    def put(self, key: str, norm: float, **info: object) -> None:
        self.put_many({key: (norm, info)})

    def put_many(self, entries: Mapping[str, Tuple[float, Mapping[str, object]]]) -> None:
        """Remember ``{key: (norm, info)}`` here, and on disk when that works."""
        if not entries:
            return
        with self._lock:
            self._memory.update({key: norm for key, (norm, _) in entries.items()})
            self._unsaved.update({key: {"norm": norm, **info} for key, (norm, info) in entries.items()})
            try:
                self._write(self._unsaved)
                self._unsaved = {}
            except CacheProblem as problem:
                self._warn(self.path, str(problem), writing=True)

    def _write(self, new: Dict[str, dict]) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CacheProblem(f"cannot create its directory ({_reason(error)})") from None
        with self._file_lock():
            try:
                entries = self._load(path)
            except CacheProblem:
                entries = {}  # replaced by a good file; the problem was warned about on reading
            entries = {key: entry for key, entry in entries.items() if valid_norm(entry) is not None}
            entries.update(new)
            _replace(path, json.dumps(entries, indent=1))

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        lock_path = self.lock_path
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise CacheProblem(f"cannot open the lock file {lock_path} ({_reason(error)})") from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise CacheProblem(f"cannot lock {lock_path} ({_reason(error)})") from None
                    if time.monotonic() > deadline:
                        raise CacheProblem(f"{lock_path} stayed locked for {LOCK_TIMEOUT_S:g} s") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock

    def remember(self, key: str, norm: float) -> None:
        """Hold a norm computed elsewhere (a search's driver) in memory only."""
        with self._lock:
            self._memory[key] = float(norm)

    def clear_memory(self) -> None:
        """Forget what this process knows (as a new process would), warnings included."""
        with self._lock:
            self._memory.clear()
            self._warned.clear()
            self._unsaved.clear()


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file next to ``path`` and move it over ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise CacheProblem(f"cannot write in {path.parent} ({_reason(error)})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CacheProblem(f"cannot replace it ({_reason(error)})") from None


def _reason(error: OSError | UnicodeError) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


CACHE = NormCache()


def cached_norms(base: ShardedTensorIndex, models: Sequence[ShardedTensorIndex], cache: NormCache = CACHE) -> Optional[Dict[str, float]]:
    """``{cache key: norm}`` of each model's task vector against ``base``, in model order, when
    every one is cached (None otherwise); the keys go to ``NormCache.remember`` elsewhere."""
    keys = cache_keys(base, models)
    found = cache.lookup(keys)
    return {key: found[key] for key in keys} if all(key in found for key in keys) else None

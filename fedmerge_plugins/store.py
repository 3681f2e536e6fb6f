"""One JSON store on disk shared by processes, one file identity, one digest.

fedmerge remembers what it computes once (CCLIP's task-vector norms, the CLIP adapter's
fine-tuned accuracies) in small JSON objects on disk, keyed by a ``digest`` of everything a
value depends on; a local file enters a key through its ``file_identity``.

``file_identity``: resolved path, size, modification time, status change time
(``st_ctime_ns``) and inode, from one ``stat``, as git's index keeps them. A rewrite of a
file, even one of the same size whose mtime is put back (``cp -p``, ``rsync -a``, ``tar x``,
``os.utime``), changes its ctime and usually its inode, which no user-space tool can set
back; no byte of the file is read.

``JsonStore``: a JSON object in one file, and an optimisation that is never a reason to fail.

- Reading: a file that cannot be read, is not JSON or is not a JSON object counts as empty;
  an entry the store's ``valid`` rejects counts as absent. The file is read once for the
  keys this process does not know yet; what it read or wrote is kept in memory.
- Writing: under an exclusive ``fcntl.flock`` on ``<file>.lock`` next to it, the file is read
  again, the new entries merged in (invalid ones dropped) and the result written to a
  temporary file (created as any other file is, so the umask decides its mode) that
  replaces it atomically: concurrent writers lose no entry, and readers never see a torn
  file. If the lock cannot be taken within ``LOCK_TIMEOUT_S`` or anything fails, nothing is
  written (no temporary file is left): the entries stay in memory and go to disk with this
  store's next write that succeeds.
- Every such problem is logged once per store and process, as one warning line that names
  the file and the reason (later ones go to the debug log).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Tuple

from fedmerge_plugins.errors import reason
from fedmerge_plugins.files import write_atomic

LOG = logging.getLogger(__name__)
LOCK_TIMEOUT_S = 10.0
FileIdentity = Tuple[str, int, int, int, int]


def file_identity(path: str) -> FileIdentity:
    """(path, size, mtime_ns, ctime_ns, inode) of one file, from one ``stat``; ``path`` as given
    (callers pass it resolved)."""
    st = os.stat(path)
    return (path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def digest(*parts: Any, length: int = 64) -> str:
    """The sha256 (hex, its first ``length`` digits) of ``parts`` as canonical JSON: keys
    sorted, tuples as lists, anything else JSON lacks (a ``Path``) as its ``str``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]


class StoreProblem(Exception):
    """Why a store's file could not be used; logged as a warning, never raised to callers."""


def _any_entry(entry: object) -> bool:
    return True


class JsonStore:
    """``{key: entry}`` in memory and in the JSON file ``path`` (see the module docstring).

    ``what`` names the store in warnings ("norm cache"); ``log`` is the logger they go to;
    ``valid(entry)`` says whether an entry read from the file may be used."""

    def __init__(
        self, path: Path, *, what: str, log: logging.Logger = LOG, valid: Callable[[object], bool] = _any_entry
    ) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._what, self._log, self._valid = what, log, valid
        self._memory: Dict[str, Any] = {}
        self._unsaved: Dict[str, Any] = {}  # entries a failed write left for the next one
        self._warned = False
        self._lock = threading.Lock()

    # ---- reading --------------------------------------------------------------------

    def lookup(self, keys: Iterable[str]) -> Dict[str, Any]:
        """The entries known for ``keys``: from memory, else from one read of the file."""
        keys = list(keys)
        with self._lock:
            if any(key not in self._memory for key in keys):
                disk = self._read_valid()
                self._memory.update({key: disk[key] for key in keys if key in disk and key not in self._memory})
            return {key: self._memory[key] for key in keys if key in self._memory}

    def get(self, key: str) -> Any:
        """The entry of ``key``, or None."""
        return self.lookup([key]).get(key)

    def _read_valid(self) -> Dict[str, Any]:
        """The valid entries on disk; problems are warned about and read as no entries."""
        try:
            entries = self._load()
        except StoreProblem as problem:
            self._warn(f"{problem}; ignored, what it lacks is computed in this process")
            return {}
        valid = {key: entry for key, entry in entries.items() if self._valid(entry)}
        invalid = [key for key in entries if key not in valid]
        if invalid:
            example = json.dumps(entries[invalid[0]])[:60]
            count = f"{len(invalid)} invalid entr{'y' if len(invalid) == 1 else 'ies'}"
            self._warn(f"{count} (e.g. {invalid[0][:12]}: {example}); ignored, computed again in this process")
        return valid

    def _load(self) -> Dict[str, Any]:
        """The raw entries of the file ({} if it does not exist); raises StoreProblem."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except NotADirectoryError:
            raise StoreProblem("a parent of it is not a directory") from None
        except (OSError, UnicodeError) as error:
            raise StoreProblem(f"cannot read it ({reason(error)})") from None
        try:
            entries = json.loads(text)
        except ValueError as error:
            raise StoreProblem(f"not valid JSON ({error})") from None
        if not isinstance(entries, dict):
            raise StoreProblem(f"not a JSON object but a {type(entries).__name__}")
        return entries

    # ---- writing --------------------------------------------------------------------

    def put(self, key: str, entry: Any) -> None:
        self.put_many({key: entry})

    def put_many(self, entries: Mapping[str, Any]) -> None:
        """Remember ``entries`` here, and in the file when that works."""
        if not entries:
            return
        with self._lock:
            self._memory.update(entries)
            self._unsaved.update(entries)
            try:
                self._write(self._unsaved)
                self._unsaved = {}
            except StoreProblem as problem:
                self._warn(f"{problem}; not updated, new entries are kept in this process only")

    def remember(self, key: str, entry: Any) -> None:
        """Hold an entry computed elsewhere in memory only (the file is not written)."""
        with self._lock:
            self._memory[key] = entry

    def _write(self, new: Mapping[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreProblem(f"cannot create its directory ({reason(error)})") from None
        with self._file_lock():
            try:
                entries = self._load()
            except StoreProblem:
                entries = {}  # replaced by a good file; the problem was warned about on reading
            entries = {key: entry for key, entry in entries.items() if self._valid(entry)}
            entries.update(new)
            self._replace(json.dumps(entries, indent=1))

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        lock_path = self.lock_path
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as error:
            raise StoreProblem(f"cannot open the lock file {lock_path} ({reason(error)})") from None
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise StoreProblem(f"cannot lock {lock_path} ({reason(error)})") from None
                    if time.monotonic() > deadline:
                        raise StoreProblem(f"{lock_path} stayed locked for {LOCK_TIMEOUT_S:g} s") from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _replace(self, text: str) -> None:
        """Replace the file by ``text`` atomically (``files.write_atomic``)."""
        try:
            write_atomic(self.path, text)
        except OSError as error:
            raise StoreProblem(f"cannot replace {self.path} ({reason(error)})") from None

    def _warn(self, message: str) -> None:
        """One warning line per store and process; later problems go to the debug log."""
        line = f"fedmerge: {self._what} {self.path}: {message}"
        if self._warned:
            self._log.debug("%s", line)
            return
        self._warned = True
        self._log.warning("%s", line)

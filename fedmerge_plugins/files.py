"""Files fedmerge writes for its user: whole or not at all, with the mode the umask gives
(as mergekit's own files: ``follow_umask`` for files others create with 0600, such as
safetensors' weights); and the one line naming the path when the disk refuses.

``write_atomic`` writes a temporary file in the same folder and moves it over the real
name (``os.replace``), so a full disk or a kill leaves the previous file, or none, never
a truncated or empty one under the real name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Iterator, Optional, Union

from fedmerge_plugins.errors import PathError, reason

PathLike = Union[str, "os.PathLike[str]"]


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def refused_errno(error: BaseException) -> Optional[int]:
    """The errno of a disk refusing a write (full, read-only, no permission): an ``OSError``'s,
    or the one the safetensors writer reports only in its text ("(os error 28)", or the
    error kind's name); None for any other error."""
    if isinstance(error, OSError):
        return error.errno if error.errno in WRITE_ERRNOS else None
    if type(error).__name__ != "SafetensorError":
        return None
    text = str(error)
    found = re.search(r"\(os error (\d+)\)", text)
    if found and int(found.group(1)) in WRITE_ERRNOS:
        return int(found.group(1))
    for code, name in ((errno.ENOSPC, "StorageFull"), (errno.EROFS, "ReadOnlyFilesystem"), (errno.EACCES, "PermissionDenied")):
        if os.strerror(code) in text or name in text:
            return code
    return None


def write_refused(error: BaseException) -> bool:
    """Whether ``error`` is a disk refusing a write (``refused_errno``)."""
    return refused_errno(error) is not None


def path_error(path: PathLike, error: OSError, doing: str = "write") -> PathError:
    """``PathError`` "cannot DOING PATH: REASON"."""
    return PathError(f"cannot {doing} {path}: {reason(error)}")


@contextlib.contextmanager
def user_path(path: PathLike, doing: str = "write") -> Iterator[None]:
    """An ``OSError`` raised in the block becomes a ``PathError`` naming ``path``."""
    try:
        yield
    except OSError as error:
        raise path_error(path, error, doing) from error


def write_atomic(path: PathLike, data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` all at once: a temporary file beside it (created with
    0666 less the umask), flushed to disk, then moved over ``path``. Raises ``OSError``;
    the temporary file is removed on failure."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_output(path: PathLike, data: Union[str, bytes]) -> None:
    """``write_atomic`` into a user's output path, its folder created; a ``PathError`` naming
    ``path`` when that fails."""
    with user_path(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)


def check_writable(path: PathLike) -> None:
    """Refuse, before any long work, an output ``path`` that cannot be written (a read-only
    or full file system, a folder where the file should be): a ``PathError`` naming it.
    One byte is written and removed in its folder, or in the nearest folder above that
    exists; nothing is left behind, no folder created."""
    path = Path(path)
    with user_path(path):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent  # the missing folders are made when the file is written
        if not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
        probe = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.probe"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, b"\n")  # a full disk refuses the byte
        finally:
            os.close(fd)
            os.unlink(probe)


LOCK_NAME = ".fedmerge.lock"


@contextlib.contextmanager
def folder_lock(folder: PathLike, command: str) -> Iterator[None]:
    """Hold the output ``folder`` for this process while the block runs (``fcntl.flock`` on
    ``FOLDER/.fedmerge.lock``, which holds the holder's pid): a second process asking for
    it is refused at once, in a ``PathError`` naming the folder and the holder's pid. The
    folder is created when missing, and removed again afterwards if it is still empty; the
    lock file is removed when the block ends (a process that opened it just before is
    not fooled: it checks that it locked the file that is still there)."""
    folder = Path(folder)
    created = not folder.exists()
    with user_path(folder, "create the output folder"):
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    while True:
        with user_path(path, "write"):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise PathError(f"{folder} is in use by another {command} (pid {holder}); wait for it to end, or use another folder") from None
        except OSError as error:
            os.close(fd)
            raise path_error(path, error, "lock") from error
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        locked = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
            break
        os.close(fd)  # its holder removed it meanwhile: lock the file that is there now
    try:
        with user_path(path, "write"):  # a full disk is refused here, before any work
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if nothing was written


_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (from /proc where it is there: reading it by ``os.umask`` sets
    it for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path: PathLike) -> None:
    """Give the regular file ``path`` the mode a file created by ``open()`` would have."""
    os.chmod(path, 0o666 & ~umask())

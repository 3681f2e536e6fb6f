"""Files fedmerge writes get the mode the process's umask gives a new file.

``tempfile.mkstemp`` (fedmerge's atomic writes) and safetensors (the weight files mergekit
writes) create files with mode 0600 whatever the umask, while ``open()`` gives 0666 less
the umask (0644 under umask 022): a teammate on a shared machine could read a merge's
config but not its weights. ``follow_umask`` sets the mode ``open()`` would have given.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Union

_LOCK = threading.Lock()


def umask() -> int:
    """The process's umask (from /proc where it is there: reading it by ``os.umask`` sets
    it for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def follow_umask(path: Union[str, "os.PathLike[str]"]) -> None:
    """Give the regular file ``path`` the mode a file created by ``open()`` would have."""
    os.chmod(path, 0o666 & ~umask())

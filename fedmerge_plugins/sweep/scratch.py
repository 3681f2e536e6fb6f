"""Where a grid point's merge is written for its evaluator to read.

A point's merge lives only until its evaluator has scored it (unless ``--keep-merges``).
Written under ``OUT/merges`` each point writes the whole merged checkpoint to the disk, and
the kernel's page cache then holds it dirty until it is written back; in RAM-backed
``/dev/shm`` (tmpfs) the same write is a memory copy. So the sweep stages its points there
when it has room for the merged copies the sweep writes at once (one per worker process)
and the memory plan still fits with them counted (a tmpfs file is memory); otherwise, or
where there is no ``/dev/shm``, under ``OUT/merges`` as before. ``FEDMERGE_SCRATCH_DIR``
names another folder (it must exist and be writable; ``OUT`` puts them under ``OUT/merges``).

Each point's folder is ``.point-NNNN-PID-XXXX`` under the chosen root and is removed once
scored; a process killed mid-point leaves its folder behind, and the next sweep to use that
root removes the folders of processes that are gone. So it does ``.factors-PID-SWEEP-XXXX``
under ``OUT/merges``: in disk mode, the θ₀ and D of the group of points being scored by
process PID (the driver or a Ray worker, which keeps its own until the sweep's driver removes
every folder of its sweep, ``remove_factors``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

from fedmerge_plugins.guards.staging import remove_dead
from fedmerge_plugins.sweep.errors import SweepError
from fedmerge_plugins.sweep.memory import HEADROOM, available_memory, human

ENV = "FEDMERGE_SCRATCH_DIR"
SHM = Path("/dev/shm")
IN_OUT = "OUT"  # FEDMERGE_SCRATCH_DIR=OUT: stage under OUT/merges
MARGIN = 1.1  # room asked of a scratch file system per merged copy
FACTORS = "factors"  # a group's θ₀ and D in disk mode (``factored.FactorFiles``), always under OUT/merges
POINT_FOLDER = re.compile(r"^\.(?:point-\d+|factors)-(\d+)-")


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _writable_folder(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def choose_scratch(out: Path, merged_bytes: int, copies: int, memory_needed: int,
                   echo: Callable[[str], None], *, shm: Path = SHM, available: Optional[int] = None) -> Path:
    """The root under which grid points are staged: ``FEDMERGE_SCRATCH_DIR`` if set, else
    ``/dev/shm`` if ``copies`` merged copies fit there and in memory beside ``memory_needed``
    bytes (the sweep's own plan), else ``out/merges``."""
    merges = Path(out) / "merges"
    named = os.environ.get(ENV)
    if named == IN_OUT:
        return merges
    if named:
        folder = Path(named)
        if not _writable_folder(folder):
            raise SweepError(f"{ENV}={named}: not a writable folder")
        echo(f"fedmerge sweep: grid points staged in {folder} ({ENV})")
        return folder
    needed = int(MARGIN * merged_bytes * copies)
    if not _writable_folder(shm):
        return merges
    free = _free_bytes(shm)
    memory = available_memory() if available is None else available
    if needed <= free and memory_needed + needed <= HEADROOM * memory:
        echo(f"fedmerge sweep: grid points staged in {shm} (RAM; {human(needed)} of {human(free)} free)")
        return shm
    return merges


def remove_abandoned(root: Path) -> None:
    """Remove point (and factor) folders under ``root`` left by sweep processes that are gone."""
    if root.is_dir():
        remove_dead(root, POINT_FOLDER)


def factors_folder(root: Path, sweep: str) -> Path:
    """A new folder of this process's own for the factors of one group of points of sweep
    ``sweep`` (a token the sweep's driver chose): ``.factors-PID-SWEEP-XXXX``."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{FACTORS}-{os.getpid()}-{sweep}-", dir=root))


def remove_factors(root: Path, sweep: str) -> None:
    """Remove the factor folders of sweep ``sweep`` under ``root``, whichever process (a Ray
    worker's, still running) made them: once the sweep's points are scored none is in use."""
    for folder in root.glob(f".{FACTORS}-*-{sweep}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def point_folder(root: Path, name: str) -> Path:
    """A new folder of this process's own for point ``name`` (an attempt still running
    elsewhere, a worker of a killed driver or a retried unit, never writes into it)."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-{os.getpid()}-", dir=root))


def keep(merged: Path, target: Path) -> None:
    """Move a scored merge to ``target`` (replacing it); from another file system (/dev/shm
    to the output's disk) it is copied next to ``target`` first, so ``target`` is replaced
    only by a complete copy."""
    partial = None
    if os.stat(merged).st_dev != os.stat(target.parent).st_dev:
        partial = point_folder(target.parent, target.name)
        shutil.copytree(merged, partial / target.name)
        merged = partial / target.name
    try:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(merged, target)
    finally:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)

"""Does a sweep fit in memory? Input checkpoints held once plus one merged copy.

The in-memory sweep keeps every input checkpoint in RAM for the whole sweep; each point's
merge is written out (to /dev/shm where ``scratch.choose_scratch`` finds room for it, counted
there as memory too), then the evaluator loads it (one merged copy). If inputs and that copy
need more than 90% of the available memory the sweep merges each point from disk instead.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Optional

from fedmerge_plugins.sweep.errors import SweepError

HEADROOM = 0.9  # share of the available memory the sweep may plan to use
UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'24GB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    try:
        if not match or match.group(2).upper() not in UNITS:
            raise ValueError
        return int(float(match.group(1)) * UNITS[match.group(2).upper()])
    except (ValueError, OverflowError):
        raise SweepError(f"not a memory size: {text!r} (e.g. 24GB, 512MiB)") from None


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(size) < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"


def available_memory() -> int:
    """Memory available to new allocations: psutil if installed, else /proc/meminfo."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise SweepError("cannot tell the available memory: install psutil or pass --max-memory")


def weight_bytes(index) -> int:
    """Bytes of a checkpoint's weight files (a ``ShardedTensorIndex``)."""
    files = {os.path.join(index.base_path, name) for name in index.tensor_paths.values()}
    return sum(os.path.getsize(f) for f in files)


@dataclass
class MemoryPlan:
    inputs: int
    merged: int
    available: int

    @property
    def needed(self) -> int:
        return self.inputs + self.merged

    @property
    def fits(self) -> bool:
        return self.needed <= HEADROOM * self.available

    def describe(self) -> str:
        return (
            f"the input checkpoints ({human(self.inputs)}) plus one merged copy ({human(self.merged)}) "
            f"need {human(self.needed)}; {human(self.available)} available"
        )


def plan_memory(input_indices: Iterable, merged_index, available: Optional[int] = None) -> MemoryPlan:
    inputs = sum(weight_bytes(index) for index in input_indices)
    return MemoryPlan(inputs, weight_bytes(merged_index), available_memory() if available is None else available)

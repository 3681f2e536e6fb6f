"""Does a sweep fit in memory? Input checkpoints held once, one merged copy, one D.

The in-memory sweep keeps every input checkpoint in RAM for the whole sweep. An evaluator
that loads a model once holds it (one merged copy), and the sweep holds the D of one group of
points (``factored``: θ₀ + λ·D, D in the compute dtype, float32: ``delta``). Otherwise each
point's merge is written out (to /dev/shm where ``scratch.choose_scratch`` finds room for it,
counted there as memory too) and the evaluator loads it (one merged copy). If these need
more than 90% of the available memory the sweep merges each point from disk instead; there,
points merged into a loaded model hold no D: each group's θ₀ and D are written to disk as
they are computed and read back one tensor at a time, so that mode needs the loaded model
plus one tensor's factors (``disk_needed``).
"""

from __future__ import annotations

import math
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


def element_size(index) -> int:
    """Bytes per element of a checkpoint's first tensor (its stored dtype)."""
    from safetensors import safe_open

    name, path = next(iter(index.tensor_paths.items()))
    if not path.endswith(".safetensors"):
        return 4
    with safe_open(os.path.join(index.base_path, path), framework="pt") as handle:
        dtype = handle.get_slice(name).get_dtype()
    return {"F64": 8, "F32": 4, "BF16": 2, "F16": 2}.get(dtype, 4)


def largest_tensor(index) -> int:
    """Elements of a checkpoint's largest tensor, from its safetensors headers (no tensor is
    read); for other formats an upper bound, the whole checkpoint's."""
    from safetensors import safe_open

    largest = 0
    for path in set(index.tensor_paths.values()):
        if not path.endswith(".safetensors"):
            return weight_bytes(index) // element_size(index)
        with safe_open(os.path.join(index.base_path, path), framework="pt") as handle:
            for name in handle.keys():
                largest = max(largest, math.prod(handle.get_slice(name).get_shape()))
    return largest


@dataclass
class MemoryPlan:
    inputs: int
    merged: int
    available: int
    delta: int = 0  # one group's D, when points are merged into a loaded model
    tensor: int = 0  # disk mode, points merged into a loaded model: one tensor's factors instead of D

    @property
    def needed(self) -> int:
        return self.inputs + self.merged + self.delta

    @property
    def disk_needed(self) -> int:
        """Memory of disk mode: the one merged copy, and one tensor's factors (no D, no inputs)."""
        return self.merged + self.tensor

    @property
    def fits(self) -> bool:
        return self.needed <= HEADROOM * self.available

    def describe(self) -> str:
        delta = f", one D ({human(self.delta)})" if self.delta else ""
        return (
            f"the input checkpoints ({human(self.inputs)}) plus one merged copy ({human(self.merged)}){delta} "
            f"need {human(self.needed)}; {human(self.available)} available"
        )


def plan_memory(input_indices: Iterable, merged_index, available: Optional[int] = None, *, factored: bool = False) -> MemoryPlan:
    """``factored``: the points are merged into a loaded model from one D at a time (float32);
    in disk mode from one tensor's factors at a time: θ₀ and D of the tensor being written and
    of the one being computed (``factored.FactorFiles``), or of the tensor being merged and
    its float32 working copy."""
    inputs = sum(weight_bytes(index) for index in input_indices)
    merged = weight_bytes(merged_index)
    size = element_size(merged_index)
    delta = merged * 4 // size if factored else 0
    tensor = largest_tensor(merged_index) * 2 * (size + 4) if factored else 0
    return MemoryPlan(inputs, merged, available_memory() if available is None else available, delta, tensor)

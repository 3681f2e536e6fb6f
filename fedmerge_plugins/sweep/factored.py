"""A grid point's merged tensors in memory, θ₀ + λ·D with D computed once per group of points.

Every method the sweep runs merges θ₀ + λ·D, D depending on the method, its other
parameters and the task vectors but not on λ. ``capture`` plans one point's recipe with
mergekit's own planner in memory (``MergePlanner.plan_in_memory`` and ``Executor``, as
mergekit-evolve did: loading, ``dtype``, vocabulary alignment), with the kernels recording
each tensor's D (``methods.common.capture_deltas``); ``Factors.tensors(λ)`` then makes any
λ's tensors by the kernel's own finishing operation (``methods.common.refinish``) and
mergekit's output cast (``out_dtype``), so they are, bit for bit, what ``mergekit-yaml``
writes for that point's recipe. mergekit's task_arithmetic (``base + λ · Σ deltas`` in the
dtype mergekit loaded the tensors in) is captured by ``TaskArithmeticCapture``, its kernel
with D kept: the same operations, in the same order. Tensors no kernel computes (no task
model has them, non-float buffers) are the same at every point and are not returned.

In disk mode (``capture(..., on_disk=FOLDER)``, inputs too large for memory) D is not held:
each tensor's θ₀ (as the kernel got it) and D are written to two checkpoints in ``FOLDER`` as
the kernels compute them, and each point reads those two, one tensor at a time
(``StoredFactors``), instead of the T + 1 inputs; the same ``Factors`` finishes both.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from mergekit.io.tensor_writer import TensorWriter
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

from fedmerge_plugins.errors import reason
from fedmerge_plugins.files import write_refused
from fedmerge_plugins.methods import common
from fedmerge_plugins.methods.common import Captured, capture_deltas, refinish
from fedmerge_plugins.search.engine import Point
from fedmerge_plugins.sweep.errors import SweepError

TASK_ARITHMETIC = "task_arithmetic"
WRITE_BLOCK = 1 << 20  # elements per block when a point's tensors go into a model (4 MiB in float32)
PARTS = ("base", "delta")  # the two checkpoints of a group's factors on disk: θ₀ as the kernel got it, D


def delta_key(point: Point) -> str:
    """Points with the same key share D: every parameter but λ."""
    return json.dumps({k: v for k, v in point.parameters.items() if k != "lambda"}, sort_keys=True)


@dataclass(frozen=True)
class TaskArithmeticCapture(GeneralizedTaskArithmeticMerge):
    """mergekit's task_arithmetic kernel, its ``mixed_delta`` (D) recorded under capture."""

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        base = group.base.tensor
        entries = group.non_base
        if not entries or not common.recording():
            return super().merge_group(group, **parameters)
        deltas = base.new_empty((len(entries), *base.shape))  # mergekit's operations, in its order
        for index, entry in enumerate(entries):
            deltas[index] = entry.tensor - base
        weights = torch.tensor([parameters["weight"][entry.id] for entry in entries], dtype=deltas.dtype, device=deltas.device)
        while deltas.dim() > weights.dim():
            weights.unsqueeze_(-1)
        deltas.mul_(weights)
        mixed_delta = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
        if parameters["normalize"]:
            mixed_delta /= divisor
        common.record(group.metadata.name, Captured(base, mixed_delta, TASK_ARITHMETIC))
        if not common.merging():
            return base  # D only: the caller discards the merge
        return task_arithmetic_finish(base, mixed_delta, parameters["lambda"])


def task_arithmetic_finish(base: torch.Tensor, mixed_delta: torch.Tensor, lam: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mergekit's last lines: ``mixed_delta *= lambda`` when λ ≠ 1, ``(base + mixed_delta).to(base.dtype)``.

    With ``out`` (contiguous, of ``base``'s dtype and shape, as D is), the same two operations
    into it by the kernels' ``finish``: λ·D (or D) there, then ``+= base`` (addition commutes,
    bit for bit)."""
    if out is None or mixed_delta.dtype != base.dtype:
        if lam != 1:
            mixed_delta = mixed_delta * lam
        return (base + mixed_delta).to(base.dtype)
    return common.finish(base, mixed_delta, lam, out)


@contextlib.contextmanager
def mergekit_task_arithmetic_captured() -> Iterator[None]:
    """mergekit's registry serves ``TaskArithmeticCapture`` for task_arithmetic while the block
    runs (only the sweep's own planning is inside it)."""
    from mergekit.merge_methods import registry

    original = registry._METHODS[TASK_ARITHMETIC]
    if type(original) is not GeneralizedTaskArithmeticMerge or original.sparsification_method or original.consensus_method:
        yield  # not the kernel this module mirrors: leave it alone (its points are then not factored)
        return
    registry._METHODS[TASK_ARITHMETIC] = TaskArithmeticCapture(**{f.name: getattr(original, f.name) for f in fields(original)})
    try:
        yield
    finally:
        registry._METHODS[TASK_ARITHMETIC] = original


class FactorFiles(dict):
    """The kernels' record under ``capture`` in disk mode: each tensor's factors written to two
    checkpoints under ``folder`` as soon as that tensor is done, θ₀ as the kernel got it to
    ``folder/base`` and D to ``folder/delta`` (mergekit's ``TensorWriter``, one tensor a shard).
    A kernel records its entry before filling its D, and mergekit's ``Executor`` runs one task at
    a time, so an entry is complete once the next one is recorded; ``close`` writes the last."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder
        self.methods: Dict[str, str] = {}
        self.shapes: Dict[str, torch.Size] = {}
        self.device = "cpu"
        with _writing(folder):
            self.writers = {part: TensorWriter(str(folder / part), max_shard_size=1) for part in PARTS}

    def __setitem__(self, name: str, captured: Captured) -> None:
        self.write_out()
        super().__setitem__(name, captured)

    def write_out(self) -> None:
        with _writing(self.folder):
            for name, captured in self.items():
                self.writers["base"].save_tensor(name, captured.base)
                self.writers["delta"].save_tensor(name, captured.delta)
                self.methods[name], self.shapes[name], self.device = captured.method, captured.base.shape, str(captured.delta.device)
        self.clear()

    def close(self) -> "StoredFactors":
        self.write_out()
        with _writing(self.folder):
            for writer in self.writers.values():
                writer.finalize()
        return StoredFactors(self.folder, self.methods, self.device)


class StoredFactors(Mapping[str, Captured]):
    """The factors ``FactorFiles`` wrote, read back one tensor per lookup (mergekit's
    ``LazyTensorLoader``: two checkpoints read per point); ``remove`` (or this object's end,
    the process's included) removes the folder."""

    def __init__(self, folder: Path, methods: Dict[str, str], device: str) -> None:
        from mergekit.io.lazy_tensor_loader import LazyTensorLoader

        self.folder, self.methods, self.device = folder, methods, device
        self.loaders = {part: LazyTensorLoader.from_disk(str(folder / part)) for part in PARTS} if methods else {}
        self.remove = weakref.finalize(self, _remove, folder, list(self.loaders.values()))

    def __getitem__(self, name: str) -> Captured:
        method = self.methods[name]
        base, delta = (self.loaders[part].get_tensor(name, device=self.device) for part in PARTS)
        return Captured(base, delta, method)

    def __iter__(self) -> Iterator[str]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)


def _remove(folder: Path, loaders: List[Any]) -> None:
    for loader in loaders:
        loader.flush()
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """A disk refusing the factors' write: one line naming their folder."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        if not write_refused(error):
            raise
        cause = reason(error) if isinstance(error, OSError) else str(error)
        raise SweepError(f"cannot write the factors (θ₀ and D) in {folder}: {cause}") from error


@dataclass
class Factors:
    """The captured D of every computed tensor of one group of points, and mergekit's output
    dtypes: ``captured`` is a dict in memory, ``StoredFactors`` on disk (read one tensor at a time)."""

    captured: Mapping[str, Captured]
    out_dtypes: Dict[str, Optional[torch.dtype]]
    shapes: Dict[str, torch.Size]  # each tensor's shape, known without reading it
    _buffers: Dict[Tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def tensor(self, name: str, lam: float, out: Optional[torch.Tensor] = None, scratch: Optional[torch.Tensor] = None,
               captured: Optional[Captured] = None) -> torch.Tensor:
        """Tensor ``name`` merged at ``lam`` (written into ``out`` where its dtype is the output's;
        ``scratch``: refinish's buffer; ``captured``: its factors, if already read)."""
        captured = self.captured[name] if captured is None else captured
        dtype = self.out_dtypes.get(name)
        direct = out is not None and out.dtype == captured.base.dtype and (dtype is None or dtype == out.dtype) \
            and out.is_contiguous() and out.shape == captured.base.shape and out.device == captured.base.device
        target = out if direct else None
        if captured.method == TASK_ARITHMETIC:
            tensor = task_arithmetic_finish(captured.base, captured.delta, lam, target)
        else:
            tensor = refinish(captured, lam, target, scratch)
        return tensor if dtype is None or dtype == tensor.dtype else tensor.to(dtype=dtype)

    def tensors(self, lam: float) -> Iterator[Tuple[str, torch.Tensor]]:
        """(name, merged tensor at ``lam``) for every computed tensor, one at a time."""
        for name in self.captured:
            yield name, self.tensor(name, lam)

    def write(self, lam: float, targets: Dict[str, torch.Tensor]) -> None:
        """Every computed tensor at ``lam`` into ``targets[name]`` (a model's parameters), in place,
        in blocks of ``WRITE_BLOCK`` elements that stay in the cache through every pass: straight
        into the target where it has the output's dtype, else made in a buffer of the output's
        dtype (mergekit's casts) and copied in. Every operation is element-wise, so the blocks
        give the bits of whole tensors. The buffers are kept for the next λ. (On disk each
        tensor's θ₀ and D are read here, once.)"""
        for name, captured in self.captured.items():
            target = targets[name].data
            dtype = self.out_dtypes.get(name) or captured.base.dtype
            if not target.is_contiguous():
                target.copy_(self.tensor(name, lam, captured=captured))
                continue
            flat, base, delta = target.view(-1), captured.base.reshape(-1), captured.delta.reshape(-1)
            for start in range(0, flat.numel(), WRITE_BLOCK):
                part = slice(start, start + WRITE_BLOCK)
                piece, dest = Captured(base[part], delta[part], captured.method), flat[part]
                out = dest if target.dtype == dtype else self._buffer("out", dtype, piece.base)
                tensor = self.tensor(name, lam, out, self._buffer("scratch", delta.dtype, piece.delta), piece)
                if tensor is not dest:
                    dest.copy_(tensor)

    def _buffer(self, role: str, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        """The kept ``role`` buffer of ``dtype`` (one block), viewed in ``like``'s flat shape."""
        kept = self._buffers.get((role, dtype))
        if kept is None or kept.device != like.device:
            kept = self._buffers[(role, dtype)] = torch.empty(WRITE_BLOCK, dtype=dtype, device=like.device)
        return kept[: like.numel()]

    def release(self) -> None:
        """Give the factors up (on disk: their folder is removed)."""
        if isinstance(self.captured, StoredFactors):
            self.captured.remove()


def capture(config: Any, options: Any, write_to: Optional[Path] = None, on_disk: Optional[Path] = None) -> Factors:
    """Plan ``config`` (a checked ``MergeConfiguration``) in memory and record every D; with
    ``write_to``, mergekit's own ``run_merge`` also writes the merge there (config, tokenizer
    and weights: what ``mergekit-yaml`` writes) while D is recorded; with ``on_disk`` (a new
    folder), each tensor's factors are written there as soon as it is computed
    (``FactorFiles``) and read back one tensor at a time (the folder is removed when the
    factors are released, or at once if the capture fails).

    The plan is ``plan_to_disk``'s, whose save tasks name each tensor's merge task and
    output dtype; only the merge tasks run (nothing is written). (mergekit 0.1.5's
    ``plan_in_memory`` cannot be used: its ``ReturnTensor`` refuses the merge tasks,
    typed ``Task[Optional[Tensor]]``, in pydantic's validation.)"""
    from mergekit.architecture import get_architecture_info
    from mergekit.common import dtype_from_name
    from mergekit.graph import Executor
    from mergekit.io.tasks import LoaderCache, SaveTensor
    from mergekit.merge import _model_out_config, run_merge
    from mergekit.plan import MergePlanner

    LoaderCache().setup(options=options)
    arch_info = get_architecture_info(config, options)
    out_config = _model_out_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planned = MergePlanner(config, arch_info, options=options, out_model_config=out_config).plan_to_disk("unwritten")
    saves = [task for task in planned if isinstance(task, SaveTensor)]
    out_dtypes = {save.tensor_name: dtype_from_name(save.dtype) if save.dtype else None for save in saves}
    try:
        record = None if on_disk is None else FactorFiles(on_disk)
        # without write_to the merge is discarded: the kernels record D only
        with capture_deltas(record, merge=write_to is not None) as captured, mergekit_task_arithmetic_captured():
            if write_to is not None:
                run_merge(config, str(write_to), options=options)
            else:
                device = options.device
                executor = Executor(targets=[save.tensor_task for save in saves], math_device=device,
                                    storage_device=device if options.low_cpu_memory else "cpu")
                for _task, value in executor.run(quiet=True):
                    del value
        if record is None:
            return Factors(dict(captured), out_dtypes, {name: c.base.shape for name, c in captured.items()})
        return Factors(record.close(), out_dtypes, record.shapes)
    except BaseException:
        if on_disk is not None:
            shutil.rmtree(on_disk, ignore_errors=True)
        raise

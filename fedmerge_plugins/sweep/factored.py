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
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

from fedmerge_plugins.methods import common
from fedmerge_plugins.methods.common import Captured, capture_deltas, refinish
from fedmerge_plugins.search.engine import Point

TASK_ARITHMETIC = "task_arithmetic"


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


@dataclass
class Factors:
    """The captured D of every computed tensor of one group of points, and mergekit's output dtypes."""

    captured: Dict[str, Captured]
    out_dtypes: Dict[str, Optional[torch.dtype]]
    _buffers: Dict[Tuple[str, torch.dtype], torch.Tensor] = field(default_factory=dict, repr=False)

    def tensor(self, name: str, lam: float, out: Optional[torch.Tensor] = None, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tensor ``name`` merged at ``lam`` (written into ``out`` where its dtype is the output's;
        ``scratch``: refinish's buffer)."""
        captured = self.captured[name]
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
        """Every computed tensor at ``lam`` into ``targets[name]`` (a model's parameters), in place:
        straight into it where it has the output's dtype, else made in a buffer of the output's
        dtype (mergekit's casts) and copied in. The buffers are kept for the next λ: fresh
        memory costs a page fault per page at every point."""
        for name, captured in self.captured.items():
            target = targets[name].data
            dtype = self.out_dtypes.get(name) or captured.base.dtype
            direct = target.dtype == dtype and target.is_contiguous()
            out = target if direct else self._buffer("out", dtype, captured.base)
            scratch = self._buffer("scratch", captured.delta.dtype, captured.delta).view(-1)
            tensor = self.tensor(name, lam, out, scratch)
            if tensor is not target:
                target.copy_(tensor)

    def _buffer(self, role: str, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
        """The kept ``role`` buffer of ``dtype``, as large as the largest tensor, viewed in ``like``'s shape."""
        kept = self._buffers.get((role, dtype))
        if kept is None or kept.device != like.device:
            largest = max(c.delta.numel() for c in self.captured.values())
            kept = self._buffers[(role, dtype)] = torch.empty(largest, dtype=dtype, device=like.device)
        return kept[: like.numel()].view(like.shape)

    @property
    def delta_bytes(self) -> int:
        return sum(c.delta.numel() * c.delta.element_size() for c in self.captured.values())


def capture(config: Any, options: Any, write_to: Optional[Path] = None) -> Factors:
    """Plan ``config`` (a checked ``MergeConfiguration``) in memory and record every D; with
    ``write_to``, mergekit's own ``run_merge`` also writes the merge there (config, tokenizer
    and weights: what ``mergekit-yaml`` writes) while D is recorded.

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
    with capture_deltas() as captured, mergekit_task_arithmetic_captured():
        if write_to is not None:
            run_merge(config, str(write_to), options=options)
        else:
            device = options.device
            executor = Executor(targets=[save.tensor_task for save in saves], math_device=device,
                                storage_device=device if options.low_cpu_memory else "cpu")
            for _task, value in executor.run(quiet=True):
                del value
    return Factors(dict(captured), out_dtypes)

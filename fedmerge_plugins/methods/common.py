"""Numerics shared by the method kernels: compute dtype, blockwise evaluation, finiteness.

Kernels compute in float32 (float64 when the inputs are float64) whatever the stored
dtype, on the device the inputs are on, and return the base tensor's dtype.

Every rule here is θ₀ + λ·D with D independent of λ: a kernel's ``delta_block`` computes D
and ``finish`` (one shared operation, ``D·λ + θ₀``) makes the merge. Under ``capture_deltas()``
``blockwise`` also keeps each tensor's whole D (with ``merge=False``, only D: the merge is
skipped), and ``refinish`` turns it into the merge at any λ by the very operations the
kernel runs (``fedmerge sweep`` computes D once per ρ).

On the CPU they walk the flattened tensors in blocks of ``BLOCK`` elements with a few
scratch buffers allocated once per tensor. Whole-tensor temporaries are fresh memory
whose first touch (page faults) costs more than the arithmetic, while a block stays in
cache through all the passes of a rule. Each element goes through the same operations
in the same order either way, so results do not depend on the block size.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup

from fedmerge_plugins.errors import NonFiniteError
from fedmerge_plugins.numerics import compute_dtype

ARXIV = "https://arxiv.org/abs/2411.18607"
BASE_REQUIRED = InputContract(base=BasePolicy.REQUIRED)
BLOCK = 1 << 18  # elements per block on the CPU: 1 MiB per float32 buffer

# delta_block(θ_0 block in the compute dtype, θ_t blocks as stored, scratch buffers) -> D block (a buffer)
BlockRule = Callable[[torch.Tensor, List[torch.Tensor], List[torch.Tensor]], torch.Tensor]


@dataclass
class Captured:
    """One tensor's factors: ``base`` as the kernel got it, ``delta`` = D in the compute dtype."""

    base: torch.Tensor
    delta: torch.Tensor
    method: str


_CAPTURED: Optional[Dict[str, Captured]] = None  # set by capture_deltas (a merge runs in one thread or several)
_MERGING = True  # False under capture_deltas(merge=False)


@contextlib.contextmanager
def capture_deltas(into: Optional[Dict[str, Captured]] = None, merge: bool = True) -> Iterator[Dict[str, Captured]]:
    """While the block runs, every fedmerge kernel also records its tensor's D (by tensor name)
    into ``into`` (a new dict if None; a kernel records its entry before filling its D). With
    ``merge=False`` the kernels only record D (checked finite) and return their base tensor
    unmerged: for a caller that discards the merge (``fedmerge sweep``'s groups of points)."""
    global _CAPTURED, _MERGING
    saved = _CAPTURED, _MERGING
    _CAPTURED, _MERGING = ({} if into is None else into), merge
    try:
        yield _CAPTURED
    finally:
        _CAPTURED, _MERGING = saved


def record(name: str, captured: Captured) -> None:
    """Keep ``captured`` as tensor ``name``'s factors if ``capture_deltas`` is recording."""
    if _CAPTURED is not None:
        _CAPTURED[name] = captured


def recording() -> bool:
    """Whether a ``capture_deltas`` block is recording."""
    return _CAPTURED is not None


def merging() -> bool:
    """Whether kernels return their merge (False only under ``capture_deltas(merge=False)``)."""
    return _MERGING


def finish(base: torch.Tensor, delta: torch.Tensor, lam: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """θ₀ + λ·D in the compute dtype, the last step of every rule: in place on ``delta``
    (scratch), or into ``out`` (D left as it is; the same operations, so the same bits)."""
    target = delta if out is None else out
    if lam != 1.0:
        torch.mul(delta, lam, out=target)
    elif target is not delta:
        target.copy_(delta)
    return target.add_(base)


def blockwise(group: TensorGroup, method: str, buffers: int, delta_block: BlockRule, lam: float) -> torch.Tensor:
    """θ₀ + λ·D over successive blocks of the flattened tensors of ``group``.

    ``delta_block`` gets the base block in the compute dtype, the models' blocks as
    stored (both read-only: they may be views of the inputs) and ``buffers`` scratch
    tensors of the block's length in the compute dtype; it returns the block of D
    (usually one of the buffers), which ``finish`` makes the merge, checked finite and
    cast to the base dtype. Off the CPU there is one block: the whole tensor.
    """
    base = group.base.tensor
    models = [entry.tensor.reshape(-1) for entry in group.non_base]
    captured = None
    if recording():
        captured = torch.empty(base.shape, dtype=compute_dtype(base.dtype), device=base.device)
        record(group.metadata.name, Captured(base, captured, method))

    def merge_block(base_block: torch.Tensor, part: slice, views: List[torch.Tensor]) -> torch.Tensor:
        delta = delta_block(base_block, [model[part] for model in models], views)
        if captured is not None:
            captured.view(-1)[part].copy_(delta)
            if not merging():
                return delta  # checked finite, not merged
        return finish(base_block, delta, lam)

    return _blocks(base, buffers, merge_block, lambda: raise_non_finite(group, method), write=merging())


def refinish(captured: Captured, lam: float, out: Optional[torch.Tensor] = None,
             scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kernel's merge at ``lam`` from its captured D: the same ``finish``, written into
    ``scratch`` (a flat compute-dtype buffer at least that large, or ``out`` when it has the
    compute dtype), the same finiteness check and cast to the base dtype (into ``out``,
    contiguous and of the base's shape, where given). Whole tensors: the operations are
    element-wise, so the kernel's blocks give the same bits."""
    base, delta = captured.base, captured.delta
    if out is not None and out.dtype == delta.dtype == base.dtype:
        work = out
    elif scratch is not None:
        work = scratch[: delta.numel()].view(delta.shape)
    else:
        work = torch.empty_like(delta)
    merged = finish(base, delta, lam, out=work)
    if not all_finite(merged):
        raise NonFiniteError(f"{captured.method}: merged tensor is not finite (overflow); lower lambda")
    if out is None:
        out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    return out if merged is out else out.copy_(merged)


def _blocks(base: torch.Tensor, buffers: int, merge_block: Callable[[torch.Tensor, slice, List[torch.Tensor]], torch.Tensor],
            non_finite: Callable[[], None], write: bool = True) -> torch.Tensor:
    """The block loop: scratch buffers, the base block upcast, the merged block checked and
    cast into the output (``write=False``: checked only, and ``base`` returned)."""
    dtype = compute_dtype(base.dtype)
    flat_base = base.reshape(-1)
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device) if write else base
    flat_out = out.view(-1) if write else None
    numel = flat_base.numel()
    block = BLOCK if base.device.type == "cpu" else max(numel, 1)
    upcast = base.dtype != dtype
    scratch = [torch.empty(min(block, numel), dtype=dtype, device=base.device) for _ in range(buffers + upcast)]
    for start in range(0, numel, block):
        part = slice(start, min(start + block, numel))
        views = [buffer[: part.stop - start] for buffer in scratch]
        base_block = views.pop().copy_(flat_base[part]) if upcast else flat_base[part]
        merged = merge_block(base_block, part, views)
        if not all_finite(merged):
            non_finite()
        if flat_out is not None:
            flat_out[part].copy_(merged)
    return out


def task_vector(model: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = τ_t = θ_t − θ_0 in the compute dtype (``base`` and ``out`` share it)."""
    if model.dtype == out.dtype:
        return torch.sub(model, base, out=out)
    if torch.promote_types(model.dtype, out.dtype) == out.dtype:
        return out.copy_(model).sub_(base)  # exact upcast, then the subtraction
    return out.copy_(torch.sub(model, base))  # a wider model: subtract in its dtype, round once


def weighted_task_sum(
    group: TensorGroup, coefficients: Sequence[float], lam: float, method: str
) -> torch.Tensor:
    """θ_0 + λ Σ_t c_t τ_t, accumulated one task vector at a time.

    With every c_t = 1 this is task arithmetic (paper eq. 4), in mergekit's operation order.
    """
    if not group.non_base:
        return group.base.tensor

    def delta_block(base: torch.Tensor, models: List[torch.Tensor], buffers: List[torch.Tensor]) -> torch.Tensor:
        total, delta = buffers
        for index, (model, coefficient) in enumerate(zip(models, coefficients)):
            target = delta if index else total
            task_vector(model, base, target)
            if coefficient != 1.0:
                target.mul_(coefficient)
            if index:
                total.add_(delta)
        return total  # scratch: ``finish`` never writes into an input

    return blockwise(group, method, 2, delta_block, lam)


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN and no ±inf: a finite sum proves it in one pass; otherwise look element-wise
    (the sum of finite values may still overflow)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def raise_non_finite(group: TensorGroup, method: str) -> None:
    name = group.metadata.name or "<unnamed tensor>"
    for entry in group.entries:
        if entry.tensor.is_floating_point() and not bool(torch.isfinite(entry.tensor).all()):
            role = "base model" if entry.is_base else "model"
            raise NonFiniteError(
                f"{method}: {role} {entry.id} has NaN or inf values in tensor {name}; "
                "its task vector is undefined"
            )
    raise NonFiniteError(f"{method}: merged tensor {name} is not finite (overflow); lower lambda")

"""Numerics shared by the method kernels: compute dtype, blockwise evaluation, finiteness.

Kernels compute in float32 (float64 when the inputs are float64) whatever the stored
dtype, on the device the inputs are on, and return the base tensor's dtype.

On the CPU they walk the flattened tensors in blocks of ``BLOCK`` elements with a few
scratch buffers allocated once per tensor. Whole-tensor temporaries are fresh memory
whose first touch (page faults) costs more than the arithmetic, while a block stays in
cache through all the passes of a rule. Each element goes through the same operations
in the same order either way, so results do not depend on the block size.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, TensorGroup

from fedmerge_plugins.errors import NonFiniteError
from fedmerge_plugins.numerics import compute_dtype

ARXIV = "https://arxiv.org/abs/2411.18607"
BASE_REQUIRED = InputContract(base=BasePolicy.REQUIRED)
BLOCK = 1 << 18  # elements per block on the CPU: 1 MiB per float32 buffer

# merge_block(θ_0 block in the compute dtype, θ_t blocks as stored, scratch buffers) -> merged block
BlockRule = Callable[[torch.Tensor, List[torch.Tensor], List[torch.Tensor]], torch.Tensor]


def blockwise(group: TensorGroup, method: str, buffers: int, merge_block: BlockRule) -> torch.Tensor:
    """Evaluate ``merge_block`` on successive blocks of the flattened tensors of ``group``.

    ``merge_block`` gets the base block in the compute dtype, the models' blocks as
    stored (both read-only: they may be views of the inputs) and ``buffers`` scratch
    tensors of the block's length in the compute dtype; it returns the merged block
    (usually one of the buffers), which is checked finite and cast to the base dtype.
    Off the CPU there is one block: the whole tensor.
    """
    base = group.base.tensor
    dtype = compute_dtype(base.dtype)
    flat_base = base.reshape(-1)
    models = [entry.tensor.reshape(-1) for entry in group.non_base]
    out = torch.empty(base.shape, dtype=base.dtype, device=base.device)
    flat_out = out.view(-1)
    numel = flat_base.numel()
    block = BLOCK if base.device.type == "cpu" else max(numel, 1)
    upcast = base.dtype != dtype
    scratch = [torch.empty(min(block, numel), dtype=dtype, device=base.device) for _ in range(buffers + upcast)]
    for start in range(0, numel, block):
        part = slice(start, min(start + block, numel))
        views = [buffer[: part.stop - start] for buffer in scratch]
        base_block = views.pop().copy_(flat_base[part]) if upcast else flat_base[part]
        merged = merge_block(base_block, [model[part] for model in models], views)
        if not all_finite(merged):
            raise_non_finite(group, method)
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

    def merge_block(base: torch.Tensor, models: List[torch.Tensor], buffers: List[torch.Tensor]) -> torch.Tensor:
        total, delta = buffers
        for index, (model, coefficient) in enumerate(zip(models, coefficients)):
            target = delta if index else total
            task_vector(model, base, target)
            if coefficient != 1.0:
                target.mul_(coefficient)
            if index:
                total.add_(delta)
        if lam != 1.0:
            total.mul_(lam)
        return total.add_(base)  # never written into an input: ``total`` is scratch

    return blockwise(group, method, 2, merge_block)


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

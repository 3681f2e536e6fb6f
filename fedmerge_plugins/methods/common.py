"""Numerics shared by the method kernels: compute dtype, task vectors, finiteness.

Kernels compute in float32 (float64 when the inputs are float64) whatever the stored
dtype, on the device the inputs are on, and return the base tensor's dtype.
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch
from mergekit.merge_methods.base import BasePolicy, InputContract, TensorEntry, TensorGroup

ARXIV = "https://arxiv.org/abs/2411.18607"
BASE_REQUIRED = InputContract(base=BasePolicy.REQUIRED)


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def base_in_compute_dtype(group: TensorGroup) -> torch.Tensor:
    base = group.base.tensor
    return base.to(compute_dtype(base))


def task_vectors(group: TensorGroup, base: torch.Tensor) -> Iterator[Tuple[TensorEntry, torch.Tensor]]:
    """Yield (entry, τ_t = θ_t − θ_0) one at a time, in ``base``'s (compute) dtype."""
    for entry in group.non_base:
        yield entry, torch.sub(entry.tensor, base).to(base.dtype)


def weighted_task_sum(
    group: TensorGroup, coefficients: Sequence[float], lam: float, method: str
) -> torch.Tensor:
    """θ_0 + λ Σ_t c_t τ_t, accumulated one task vector at a time.

    With every c_t = 1 this is task arithmetic (paper eq. 4), in mergekit's operation order.
    """
    base = base_in_compute_dtype(group)
    total = None
    for (_, delta), coefficient in zip(task_vectors(group, base), coefficients):
        if coefficient != 1.0:
            delta.mul_(coefficient)
        total = delta if total is None else total.add_(delta)
    if total is None:
        return group.base.tensor
    if lam != 1.0:
        total.mul_(lam)
    return finish(group, total.add_(base), method)  # never write into an input


def finish(group: TensorGroup, merged: torch.Tensor, method: str) -> torch.Tensor:
    """Cast back to the base dtype after checking that nothing non-finite came in."""
    if not bool(torch.isfinite(merged).all()):
        raise_non_finite(group, method)
    return merged.to(group.base.tensor.dtype)


def raise_non_finite(group: TensorGroup, method: str) -> None:
    name = group.metadata.name or "<unnamed tensor>"
    for entry in group.entries:
        if entry.tensor.is_floating_point() and not bool(torch.isfinite(entry.tensor).all()):
            role = "base model" if entry.is_base else "model"
            raise ValueError(
                f"{method}: {role} {entry.id} has NaN or inf values in tensor {name}; "
                "its task vector is undefined"
            )
    raise ValueError(f"{method}: merged tensor {name} is not finite (overflow); lower lambda")

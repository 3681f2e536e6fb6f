"""Coordinate-wise median of the task vectors (paper eq. 13)."""

from __future__ import annotations

from typing import Any, List

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from fedmerge_plugins.methods.common import ARXIV, BASE_REQUIRED, base_in_compute_dtype, finish
from fedmerge_plugins.params import LAMBDA

CHUNK = 1 << 24  # elements per pass: bounds scratch memory for any tensor size


def median_of(rows: List[torch.Tensor]) -> torch.Tensor:
    """Element-wise median of equally shaped tensors, overwriting them.

    An odd–even transposition network sorts the rows in place with min/max (no index
    tensors, no size limit); an even count gives the mean of the two middle values.
    """
    count = len(rows)
    for step in range(count):
        for j in range(step % 2, count - 1, 2):
            low = torch.minimum(rows[j], rows[j + 1])
            torch.maximum(rows[j], rows[j + 1], out=rows[j + 1])
            rows[j] = low
    middle = count // 2
    if count % 2:
        return rows[middle]
    return rows[middle - 1].add_(rows[middle]).mul_(0.5)


class MedianMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name="median",
        pretty_name="Coordinate-wise median",
        reference_url=ARXIV,
        contract=BASE_REQUIRED,
        parameters=(LAMBDA,),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """θ_0 + λ · med(τ_1, …, τ_T), coordinate-wise; even T takes the mean of the two middle values (eq. 13)."""
        if not group.non_base:
            return group.base.tensor
        base = base_in_compute_dtype(group).reshape(-1)
        models = [entry.tensor.reshape(-1) for entry in group.non_base]
        merged = torch.empty_like(base)
        for start in range(0, base.numel(), CHUNK):
            part = slice(start, start + CHUNK)
            rows = [torch.sub(model[part], base[part]).to(base.dtype) for model in models]
            merged[part] = median_of(rows)
        if parameters["lambda"] != 1.0:
            merged.mul_(parameters["lambda"])
        return finish(group, merged.add_(base).view(group.base.tensor.shape), "median")


median_merge = MedianMerge()

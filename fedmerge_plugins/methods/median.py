"""Coordinate-wise median of the task vectors (paper eq. 13)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any, List, Tuple

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from fedmerge_plugins.methods.common import ARXIV, BASE_REQUIRED, blockwise, task_vector
from fedmerge_plugins.methods.params import LAMBDA

# (i, j, keep_min, keep_max): rows i, j become min and max of the two, as far as needed
Comparator = Tuple[int, int, bool, bool]


def sorting_network(count: int) -> List[Tuple[int, int]]:
    """Batcher's odd–even merge sort for ``count`` rows (any count), as (i, j) pairs, i < j."""
    pairs = []
    p = 1
    while p < count:
        k = p
        while k >= 1:
            for j in range(k % p, count - k, 2 * k):
                for i in range(min(k, count - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return pairs


@lru_cache(maxsize=None)
def median_network(count: int) -> Tuple[Comparator, ...]:
    """The comparators of the sorting network that the middle row(s) depend on.

    Walking back from the middle positions, a comparator is kept when one of its outputs
    is needed, and computes only the outputs needed. With an even count a final
    comparator between the two middle positions is dropped: their mean does not depend
    on their order.
    """
    middle = {(count - 1) // 2, count // 2}
    needed, kept = set(middle), []
    interchangeable = count % 2 == 0
    for i, j in reversed(sorting_network(count)):
        if interchangeable and {i, j} == middle:
            continue
        keep_min, keep_max = i in needed, j in needed
        if not (keep_min or keep_max):
            continue
        interchangeable = interchangeable and not ({i, j} & middle)
        needed |= {i, j}
        kept.append((i, j, keep_min, keep_max))
    return tuple(reversed(kept))


def median_of(rows: List[torch.Tensor], spare: torch.Tensor) -> torch.Tensor:
    """Element-wise median of equally shaped tensors, overwriting them and ``spare``.

    A min/max selection network (no index tensors, no size limit, exact); an even count
    gives the mean of the two middle values.
    """
    rows = list(rows)
    for i, j, keep_min, keep_max in median_network(len(rows)):
        if keep_min and keep_max:
            torch.minimum(rows[i], rows[j], out=spare)
            torch.maximum(rows[i], rows[j], out=rows[j])
            rows[i], spare = spare, rows[i]
        elif keep_min:
            torch.minimum(rows[i], rows[j], out=rows[i])
        else:
            torch.maximum(rows[i], rows[j], out=rows[j])
    middle = len(rows) // 2
    if len(rows) % 2:
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
        count = len(group.non_base)
        if count == 0:
            return group.base.tensor
        lam = parameters["lambda"]

        def delta_block(base: torch.Tensor, models: List[torch.Tensor], buffers: List[torch.Tensor]) -> torch.Tensor:
            rows = [task_vector(model, base, row) for model, row in zip(models, buffers)]
            return median_of(rows, buffers[-1])

        return blockwise(group, "median", count + 1, delta_block, lam)


median_merge = MedianMerge()

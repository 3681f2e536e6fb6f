"""FedGMA: damp coordinates where the task vectors disagree in sign (paper eq. 12)."""

from __future__ import annotations

from typing import Any

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from fedmerge_plugins.methods.common import ARXIV, BASE_REQUIRED, base_in_compute_dtype, finish, task_vectors
from fedmerge_plugins.params import LAMBDA, AgreementRho, shared


def full_agreement_count(rho: float, count: int) -> int:
    """Smallest k with k/T ≥ ρ: coordinates where |Σ_t sign(τ_t)| ≥ k keep mask 1.

    Compared as the float64 quotient k/T, so ρ = 0.3 with T = 10 admits k = 3.
    """
    return next((k for k in range(count + 1) if k / count >= rho), count + 1)


class FedGMAMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name="fedgma",
        pretty_name="FedGMA",
        reference_url=ARXIV,
        contract=BASE_REQUIRED,
        parameters=(LAMBDA, shared("rho", AgreementRho, doc="agreement threshold ρ in [0, 1]")),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """θ_0 + λ M ⊙ Σ_t τ_t, A = |1/T Σ_t sign(τ_t)|, M_j = 1 if A_j ≥ ρ else A_j (eq. 12)."""
        count = len(group.non_base)
        if count == 0:
            return group.base.tensor
        base = base_in_compute_dtype(group)
        total = torch.zeros_like(base)
        votes = torch.zeros(base.shape, dtype=torch.int16, device=base.device)
        for _, delta in task_vectors(group, base):
            votes.add_(torch.sign(delta).to(torch.int16))
            total.add_(delta)
        votes.abs_()
        mask = votes.to(base.dtype).div_(count)
        mask.masked_fill_(votes >= full_agreement_count(parameters["rho"], count), 1.0)
        total.mul_(mask)
        if parameters["lambda"] != 1.0:
            total.mul_(parameters["lambda"])
        return finish(group, total.add_(base), "fedgma")


fedgma_merge = FedGMAMerge()

"""FedGMA: damp coordinates where the task vectors disagree in sign (paper eq. 12)."""

from __future__ import annotations

from typing import Any, List

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from fedmerge_plugins.methods.common import ARXIV, BASE_REQUIRED, blockwise, task_vector
from fedmerge_plugins.methods.params import LAMBDA, AgreementRho, recipe_required


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
        parameters=(
            LAMBDA,
            recipe_required("rho", AgreementRho, 0.0, doc="agreement threshold ρ in [0, 1] (recipes must give it; 0: task arithmetic)"),
        ),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """θ_0 + λ M ⊙ Σ_t τ_t, A = |1/T Σ_t sign(τ_t)|, M_j = 1 if A_j ≥ ρ else A_j (eq. 12)."""
        count = len(group.non_base)
        if count == 0:
            return group.base.tensor
        threshold = full_agreement_count(parameters["rho"], count)
        lam = parameters["lambda"]

        def delta_block(base: torch.Tensor, models: List[torch.Tensor], buffers: List[torch.Tensor]) -> torch.Tensor:
            total, delta, votes = buffers  # votes: Σ_t sign(τ_t), whole numbers, exact in float
            # the mask without a comparison (a boolean tensor and masked_fill cost more than the rest of the rule)
            task_vector(models[0], base, total)
            torch.sign(total, out=votes)
            for model in models[1:]:
                total.add_(task_vector(model, base, delta))
                votes.add_(delta.sign_())
            agreement = torch.div(votes.abs_(), count, out=delta)  # A = |Σ_t sign(τ_t)| / T
            full = votes.sub_(threshold - 1).clamp_(0, 1)  # 1 where |Σ_t sign(τ_t)| ≥ threshold, else 0
            mask = torch.maximum(agreement, full, out=votes)  # M = 1 there, A elsewhere (A ≥ 0)
            return total.mul_(mask)

        return blockwise(group, "fedgma", 3, delta_block, lam)


fedgma_merge = FedGMAMerge()

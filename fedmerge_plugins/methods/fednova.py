"""FedNova: normalise each task vector by its effective number of steps (paper eq. 11)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, List, Sequence

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from fedmerge_plugins.methods.common import ARXIV, BASE_REQUIRED, weighted_task_sum
from fedmerge_plugins.params import LAMBDA, LearningRate, Steps, per_model


def fednova_coefficients(effective_steps: Sequence[float]) -> List[float]:
    """c_t = (1/T Σ_s ‖a_s‖₁) / ‖a_t‖₁, in exact rational arithmetic, rounded once.

    Only ratios matter; equal training gives exactly c_t = 1 (task arithmetic).
    """
    exact = [Fraction(a) for a in effective_steps]
    mean = sum(exact, Fraction(0)) / len(exact)
    return [float(mean / a) for a in exact]


class FedNovaMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name="fednova",
        pretty_name="FedNova",
        reference_url=ARXIV,
        contract=BASE_REQUIRED,
        parameters=(
            LAMBDA,
            per_model("steps", Steps, doc="optimizer steps the task model was trained for"),
            per_model("learning_rate", LearningRate, 1.0, doc="constant learning rate, or the mean over steps"),
        ),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """θ_0 + λ · (1/T Σ_s ‖a_s‖₁) · Σ_t τ_t / ‖a_t‖₁, ‖a_t‖₁ = steps_t × learning_rate_t (eq. 11)."""
        effective = [
            Fraction(parameters["steps"][entry.id]) * Fraction(parameters["learning_rate"][entry.id])
            for entry in group.non_base
        ]
        return weighted_task_sum(group, fednova_coefficients(effective), parameters["lambda"], "fednova")


fednova_merge = FedNovaMerge()

"""FedNova: normalise each task vector by its effective number of steps (paper eq. 11)."""

from __future__ import annotations

from fractions import Fraction
from typing import Any, List, Sequence, Union

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from fedmerge_plugins.methods.common import ARXIV, BASE_REQUIRED, weighted_task_sum
from fedmerge_plugins.methods.params import (
    LAMBDA, LearningRate, ScheduleName, Steps, TrainingLog, WarmupRatio, WarmupSteps, per_model,
)
from fedmerge_plugins.methods.training_record import RECORD_KEYS, effective_steps


def fednova_coefficients(effective: Sequence[Union[float, Fraction]]) -> List[float]:
    """c_t = (1/T Σ_s ‖a_s‖₁) / ‖a_t‖₁, in exact rational arithmetic, rounded once.

    Only ratios matter; equal training gives exactly c_t = 1 (task arithmetic).
    """
    exact = [Fraction(a) for a in effective]
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
            per_model("steps", Steps, None, doc="optimizer steps the task model was trained for"),
            per_model("learning_rate", LearningRate, None, doc="constant rate (default 1), or the schedule's peak"),
            per_model("schedule", ScheduleName, None, doc="transformers' scheduler name; Σ_k η_k stepped exactly"),
            per_model("warmup_steps", WarmupSteps, None, doc="warm-up steps (below 1: a ratio, as transformers 5)"),
            per_model("warmup_ratio", WarmupRatio, None, doc="warm-up as a share of the steps (transformers 4)"),
            per_model("training_log", TrainingLog, None, doc="trainer_state.json or Trainer output folders, joined by ':'"),
        ),
    )

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """θ_0 + λ · (1/T Σ_s ‖a_s‖₁) · Σ_t τ_t / ‖a_t‖₁, ‖a_t‖₁ = Σ_k η_t^(k) (eq. 11)."""
        records = [{key: parameters[key][entry.id] for key in RECORD_KEYS} for entry in group.non_base]
        if all(value is None for record in records for value in record.values()):
            # no record at all (mergekit's API only; recipes give one): equal training
            return weighted_task_sum(group, [1.0] * len(records), parameters["lambda"], "fednova")
        effective = [effective_steps(record).value for record in records]
        return weighted_task_sum(group, fednova_coefficients(effective), parameters["lambda"], "fednova")


fednova_merge = FedNovaMerge()

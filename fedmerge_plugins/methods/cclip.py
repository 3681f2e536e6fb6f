"""CCLIP: centred clipping of each task vector by its global L2 norm (paper eq. 14)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence

import torch
from mergekit.merge_methods.base import GroupMergeMethod, MergeMethodSpec, TensorGroup

from fedmerge_plugins.errors import NonFiniteError, RecipeError
from fedmerge_plugins.methods.common import ARXIV, BASE_REQUIRED, weighted_task_sum
from fedmerge_plugins.methods.params import LAMBDA, ClipRho, Norm, per_model, recipe_required

# (base id, model ids, device) -> ‖θ_model − θ_base‖ per model, over every weight of the checkpoints.
NormProvider = Callable[[Hashable, Sequence[Hashable], torch.device], List[float]]


def clip_coefficients(rho: float, norms: Sequence[float]) -> List[float]:
    """c_t = min(1, ρ / ‖τ_t‖); a zero task vector keeps c_t = 1 and is never divided by."""
    return [1.0 if norm <= rho else rho / norm for norm in norms]


def checkpoint_norm_provider(base: Hashable, models: Sequence[Hashable], device: torch.device) -> List[float]:
    """The default provider: the cached norms of mergekit's input checkpoints, those not
    cached computed together in one streaming pass (``fedmerge_plugins.norms.streaming.reference_norms``;
    ids must be mergekit ModelReferences)."""
    from fedmerge_plugins.norms.streaming import reference_norms

    return reference_norms(base, models, device)


class CClipMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name="cclip",
        pretty_name="CCLIP (centred clipping)",
        reference_url=ARXIV,
        contract=BASE_REQUIRED,
        parameters=(
            LAMBDA,
            recipe_required("rho", ClipRho, None, doc="clipping radius ρ > 0, in units of the task-vector L2 norm (recipes must give it; none: no clipping)"),
            per_model("norm", Norm, None, doc="override of the model's global task-vector norm"),
        ),
    )

    def __init__(self, norm_provider: Optional[NormProvider] = checkpoint_norm_provider) -> None:
        self.norm_provider = norm_provider

    def merge_group(self, group: TensorGroup, /, **parameters: Any) -> torch.Tensor:
        """θ_0 + λ Σ_t τ_t · min(1, ρ / ‖τ_t‖), ‖τ_t‖ the L2 norm of model t's WHOLE task vector (eq. 14)."""
        if parameters["rho"] is None:  # no radius (mergekit's API only; recipes give one): no clipping
            coefficients = [1.0] * len(group.non_base)
        else:
            coefficients = clip_coefficients(parameters["rho"], self._norms(group, parameters["norm"]))
        return weighted_task_sum(group, coefficients, parameters["lambda"], "cclip")

    def _norms(self, group: TensorGroup, overrides: Mapping[Hashable, Optional[float]]) -> List[float]:
        """Each task model's `norm` where given, the others from the provider in one call."""
        ids = [entry.id for entry in group.non_base]
        missing = [model for model in ids if overrides[model] is None]
        provided: Dict[Hashable, float] = {}
        if missing and self.norm_provider is None:
            raise RecipeError(
                f"cclip: no task-vector norm for model {missing[0]!r}: pass the per-model parameter "
                "`norm` (fedmerge_plugins.norms.streaming.state_dict_norms computes it from state dicts)"
            )
        if missing:
            try:
                found = self.norm_provider(group.base.id, missing, group.base.tensor.device)
            except NonFiniteError as error:  # the streaming norm met a NaN: say which method stopped
                raise NonFiniteError(f"cclip: {error}") from None
            provided = dict(zip(missing, found))
        return [provided[model] if overrides[model] is None else overrides[model] for model in ids]


cclip_merge = CClipMerge()

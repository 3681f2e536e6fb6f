"""Task-vector statistics in one streaming pass: norms, Gram matrix, sign agreement.

For each tensor name of the base checkpoint (in the base's order), the base tensor and
every task model's tensor are loaded, used and dropped, so memory holds one tensor name
at a time whatever the model size.

- Norms ‖τ_t‖ are summed by ``fedmerge_plugins.norms.streaming.NormSums``, the accumulator of the
  norm pass ``norms.stream_norms``, term by term and in the same order, so they are the very
  numbers CCLIP uses; they are looked up and stored through ``norms.resolve_norms`` under
  the same keys (a norm already cached is reported as cached, since that is the value a
  merge will use).
- Inner products ⟨τ_s, τ_t⟩ (float64) give cosines. They, the zero counts and the sign
  agreement use the tensors every task model shares with the base, trimmed to the rows
  all of them have (the vocabulary rule of ``norms.shared_rows``).
- Sign agreement: per coordinate k = |Σ_t sign(τ_t)|, so A = k/T (FedGMA's A); the pass
  counts coordinates per k, in the compute dtype of the kernels (float32, or float64).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

from fedmerge_plugins.norms.cache import NormCache
from fedmerge_plugins.norms.streaming import NormSums, checkpoint_loaders, model_index, resolve_norms, shared_rows, stream_tensors

CHUNK = 1 << 22  # coordinates per float64 block of the Gram accumulation


@dataclass
class TaskVectorStats:
    """What one pass over a base and T task models measures (model order kept)."""

    labels: List[str]
    norms: List[float]  # ‖τ_t‖ over every float tensor model t shares with the base
    norms_cached: List[bool]  # True where the norm came from the norm cache
    gram: List[List[float]]  # ⟨τ_s, τ_t⟩ over the coordinates all models share
    zero_counts: List[int]  # coordinates with τ_t = 0 exactly
    agreement_counts: List[int]  # index k: coordinates with |Σ_t sign(τ_t)| = k
    coordinates: int  # coordinates all models share (the denominator of the above)
    tensors: int  # tensor names all models share

    @property
    def count(self) -> int:
        return len(self.labels)

    def cosines(self) -> List[List[Optional[float]]]:
        """cos(τ_s, τ_t); None where a task vector is zero."""
        diagonal = [math.sqrt(max(self.gram[t][t], 0.0)) for t in range(self.count)]
        return [
            [
                self.gram[s][t] / (diagonal[s] * diagonal[t]) if diagonal[s] > 0 and diagonal[t] > 0 else None
                for t in range(self.count)
            ]
            for s in range(self.count)
        ]


def _common_view(name: str, base: torch.Tensor, models: Sequence[torch.Tensor], labels: Sequence[str]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Base and task tensors trimmed to the rows all of them share."""
    for model, label in zip(models, labels):
        shared_rows(name, base, model, label)  # raises, naming the model, if they cannot be merged
    shape = [min(sizes) for sizes in zip(base.shape, *(m.shape for m in models))]
    index = tuple(slice(0, size) for size in shape)
    return base[index], [model[index] for model in models]


class _Accumulator:
    """Running sums for the tensors every task model shares with the base."""

    def __init__(self, count: int) -> None:
        self.gram = torch.zeros((count, count), dtype=torch.float64)
        self.zeros = [0] * count
        self.agreement = torch.zeros(count + 1, dtype=torch.int64)
        self.coordinates = 0
        self.tensors = 0

    def add(self, name: str, base: torch.Tensor, models: List[torch.Tensor], labels: Sequence[str]) -> None:
        base, models = _common_view(name, base, models, labels)
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        base = base.to(dtype)
        deltas = [torch.sub(model, base).to(dtype).reshape(-1) for model in models]
        votes = torch.zeros(base.numel(), dtype=torch.int16, device=base.device)
        for t, delta in enumerate(deltas):
            votes.add_(torch.sign(delta).to(torch.int16))
            self.zeros[t] += int((delta == 0).sum())
        self.agreement += torch.bincount(votes.abs_().long(), minlength=len(models) + 1).cpu()
        for start in range(0, base.numel(), CHUNK):
            block = torch.stack([d[start : start + CHUNK] for d in deltas]).double()
            self.gram += (block @ block.T).cpu()
        self.coordinates += base.numel()
        self.tensors += 1


def collect_stats(
    base: ModelReference,
    models: Sequence[ModelReference],
    *,
    labels: Optional[Sequence[str]] = None,
    device: str = "cpu",
    cache: Optional[NormCache] = None,
) -> TaskVectorStats:
    """Stream ``base`` and ``models`` once and measure their task vectors."""
    labels = list(labels or [str(m) for m in models])
    base_index = model_index(base)
    indices: List[ShardedTensorIndex] = [model_index(m) for m in models]
    sums = NormSums(labels)
    accumulator = _Accumulator(len(models))
    with checkpoint_loaders([base_index, *indices]) as loaders:
        for name, base_tensor, reads in stream_tensors(loaders[0], loaders[1:], device=device, desc="streaming task vectors"):
            if not base_tensor.is_floating_point():
                continue
            tensors = dict(reads)
            for t, tensor in tensors.items():  # exactly stream_norms's terms, in its order
                sums.add(t, name, base_tensor, tensor)
            if len(tensors) == len(models):
                accumulator.add(name, base_tensor, [tensors[t] for t in range(len(models))], labels)
            del tensors, base_tensor
    computed = sums.norms()
    norms, cached = resolve_norms(base_index, indices, lambda missing: [computed[t] for t in missing], cache)
    return TaskVectorStats(
        labels=labels,
        norms=norms,
        norms_cached=cached,
        gram=accumulator.gram.tolist(),
        zero_counts=accumulator.zeros,
        agreement_counts=[int(c) for c in accumulator.agreement],
        coordinates=accumulator.coordinates,
        tensors=accumulator.tensors,
    )


# ---- quantities derived from the pass and from the recipe ------------------------------

OUTLIER_FACTOR = 3.0
OUTLIER_RULE = (
    f"a task vector is an outlier when its norm is more than {OUTLIER_FACTOR:g}x (high) or less than "
    f"1/{OUTLIER_FACTOR:g} (low) of the median norm of all task vectors"
)


def flag_outliers(norms: Sequence[float], factor: float = OUTLIER_FACTOR) -> List[Optional[str]]:
    """"high" / "low" / None per norm, against the median of all norms.

    The median of all (not of the others) stays put when one vector is extreme, so with
    T = 3 an outlier does not drag the other two into "low". With T = 2 the median is
    the mean: only a ratio above 2·factor − 1 flags the smaller one, never the larger.
    """
    if len(norms) < 2:
        return [None] * len(norms)
    reference = statistics.median(norms)  # the mean of the middle two for an even count
    flags: List[Optional[str]] = []
    for norm in norms:
        if reference > 0 and norm > factor * reference:
            flags.append("high")
        elif norm * factor < reference:
            flags.append("low")
        else:
            flags.append(None)
    return flags


def fednova_weights(effective_steps: Sequence[float]) -> List[float]:
    """w_t = ‖a_t‖₁ / Σ_s ‖a_s‖₁, the weights task arithmetic implicitly uses (paper eq. 8)."""
    exact = [Fraction(a) for a in effective_steps]
    total = sum(exact, Fraction(0))
    return [float(a / total) for a in exact]


def chi_square(weights: Sequence[float]) -> float:
    """χ²(p‖w) = Σ_t (1/T − w_t)² / w_t, p uniform (paper Theorem 4.12); 0 for equal training."""
    exact = [Fraction(w) for w in weights]
    uniform = Fraction(1, len(exact))
    return float(sum(((uniform - w) ** 2 / w for w in exact), Fraction(0)))


def agreement_effects(counts: Sequence[int], rhos: Sequence[float]) -> List[dict]:
    """For each FedGMA ρ: the smallest agreement count k kept at mask 1, and the share of
    coordinates whose mask is below 1 (A < ρ, scaled by A); equal k means the same merge."""
    from fedmerge_plugins.methods.fedgma import full_agreement_count

    count = len(counts) - 1
    total = sum(counts) or 1
    effects = []
    for rho in rhos:
        k_min = full_agreement_count(rho, count)
        effects.append({"rho": rho, "k_min": k_min, "damped_fraction": sum(counts[:k_min]) / total})
    return effects

"""Global task-vector L2 norms, streamed one tensor at a time and remembered.

‖τ_t‖² = Σ ‖θ_t − θ_0‖² over every floating-point tensor that the base and the task
checkpoint share by name. Where a tensor's shape differs along one axis only (a
vocabulary: Llama-2 has 32000 rows, WizardMath 32001), only the rows both checkpoints
have are counted: those are the rows a merge with ``tokenizer: {source: base}`` keeps,
since added tokens come after the base vocabulary. The rows a task model adds have no
base row to differ from and are not part of its task vector.

``stream_norms`` computes the norms of all task models of a merge in ONE pass: each base
tensor is read once and compared with each task model's tensor of that name, read in turn
(T + 1 checkpoint reads, not 2T), through ``stream_tensors``, which faults each tensor's
pages in, in order, before it is used; memory holds one base and one task tensor (and a
float32 copy of each). Each model's sum has the same terms in the same order (the base's
tensor order) as a pass over that model alone, so the norms do not depend on which models
are computed together. The same pass serves cclip inside mergekit (``reference_norms``),
``fedmerge inspect`` (its statistics ride on ``stream_tensors`` and ``NormSums``) and the
sweep (``loader_norms`` on in-memory copies). Norms are remembered by
``fedmerge_plugins.norms.cache``; a cached norm is never streamed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import threading
from typing import Callable, Dict, Hashable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from tqdm.auto import tqdm

from fedmerge_plugins.errors import InputError, NonFiniteError, RecipeError
from fedmerge_plugins.norms import cache as norm_cache
from fedmerge_plugins.norms.cache import NormCache, cache_keys
from fedmerge_plugins.numerics import compute_dtype

LOG = logging.getLogger(__name__)
_PASS_LOCK = threading.Lock()  # mergekit may run tasks in threads: one norm pass at a time


class TensorSource(Protocol):
    """What the pass reads from: mergekit's ``LazyTensorLoader`` or the sweep's ``MemoryLoader``."""

    index: ShardedTensorIndex

    def get_tensor(self, key: str, device: str = "cpu") -> Optional[torch.Tensor]: ...


def shared_rows(name: str, base: torch.Tensor, model: torch.Tensor, model_label: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trim two tensors to the rows they share when they differ along exactly one axis."""
    if base.shape == model.shape:
        return base, model
    differing = [axis for axis, (b, m) in enumerate(zip(base.shape, model.shape)) if b != m]
    if base.ndim != model.ndim or len(differing) != 1:
        raise InputError(
            f"tensor {name}: model {model_label} has shape {tuple(model.shape)}, "
            f"the base {tuple(base.shape)}; they cannot be merged"
        )
    axis = differing[0]
    rows = min(base.shape[axis], model.shape[axis])
    return base.narrow(axis, 0, rows), model.narrow(axis, 0, rows)


def squared_distance(name: str, base: torch.Tensor, model: torch.Tensor, model_label: str) -> float:
    """‖model − base‖² of one tensor, in float32 (float64 for float64), checked finite.

    The model is converted to the compute dtype and the base subtracted in place (one
    temporary); a finite norm proves every term finite, so the element-wise check runs
    only when it is not (NaN or inf, or the squares overflowed)."""
    base, model = shared_rows(name, base, model, model_label)
    dtype = compute_dtype(base.dtype)
    delta = model.to(dtype, copy=True).sub_(base.to(dtype))
    norm = float(torch.linalg.vector_norm(delta))
    if not math.isfinite(norm) and not bool(torch.isfinite(delta).all()):
        raise NonFiniteError(f"model {model_label} has NaN or inf values in tensor {name}")
    return norm**2


class NormSums:
    """Running ‖τ_t‖² of several task models against one base, tensor by tensor."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = list(labels)
        self.squares = [0.0] * len(self.labels)
        self.tensors = [0] * len(self.labels)

    def add(self, t: int, name: str, base: torch.Tensor, model: torch.Tensor) -> None:
        self.squares[t] += squared_distance(name, base, model, self.labels[t])
        self.tensors[t] += 1

    def norms(self) -> List[float]:
        for label, count in zip(self.labels, self.tensors):
            if count == 0:
                raise InputError(f"model {label} shares no floating-point tensor name with the base model")
        return [math.sqrt(total) for total in self.squares]


def shared_names(base: ShardedTensorIndex, models: Sequence[ShardedTensorIndex]) -> Iterator[Tuple[str, List[int]]]:
    """(name, models that have it) for the base's tensor names, in the base's order."""
    for name in base.tensor_paths:
        present = [t for t, index in enumerate(models) if name in index.tensor_paths]
        if present:
            yield name, present


def fault_in(tensor: torch.Tensor) -> None:
    """Touch one byte of every memory page of a CPU tensor, in order.

    safetensors maps checkpoints into memory, so ``get_tensor`` returns at once and the
    file is read at the tensor's first use. Left to the arithmetic, that first use is
    torch's multi-threaded conversion, whose threads fault in separate parts of the tensor
    at once, which breaks the kernel's sequential read-ahead: at the 3b preset with the
    page cache dropped, the norm pass took 44–48 s that way and 30–32 s with each tensor
    faulted in first (bench/RESULTS.md, notes)."""
    if tensor.device.type == "cpu" and tensor.numel() and tensor.is_contiguous():
        data = tensor.reshape(-1).view(torch.uint8)
        data[:: mmap.PAGESIZE].sum()  # one byte a page: the page faults are the point
        data[-1].item()  # and the last page


TensorStream = Iterator[Tuple[str, torch.Tensor, Iterator[Tuple[int, torch.Tensor]]]]


def stream_tensors(
    base: TensorSource, models: Sequence[TensorSource], *, device: torch.device | str = "cpu", desc: str
) -> TensorStream:
    """(name, base tensor, (t, model t's tensor) for each model that has it), for the base's
    tensor names in its order, with a progress bar. Every tensor is read once, in that
    order, when it is due, and faulted in (``fault_in``) before it is used."""

    def read(source: TensorSource, name: str) -> torch.Tensor:
        tensor = source.get_tensor(name, device=str(device))
        assert tensor is not None  # the name is in the source's index
        fault_in(tensor)
        return tensor

    for name, present in tqdm(list(shared_names(base.index, [m.index for m in models])), desc=desc, unit="tensor", leave=False):
        yield name, read(base, name), ((t, read(models[t], name)) for t in present)


def stream_norms(
    base: TensorSource, models: Sequence[TensorSource], labels: Sequence[str], device: torch.device | str = "cpu"
) -> List[float]:
    """‖θ_t − θ_0‖ of every task model in one pass: each base tensor read once, then each
    task model's tensor of that name in turn."""
    sums = NormSums(labels)
    for name, base_tensor, tensors in stream_tensors(base, models, device=device, desc=f"task-vector norm of {len(models)} model(s)"):
        if not base_tensor.is_floating_point():
            continue
        base_tensor = base_tensor.to(compute_dtype(base_tensor.dtype))  # once for all models: exact
        for t, tensor in tensors:
            sums.add(t, name, base_tensor, tensor)
    return sums.norms()


def resolve_norms(
    base: ShardedTensorIndex,
    models: Sequence[ShardedTensorIndex],
    compute: Callable[[List[int]], List[float]],
    cache: Optional[NormCache] = None,
) -> Tuple[List[float], List[bool]]:
    """(norms, cached flags): cached norms looked up in one read of the cache, the others
    computed by ``compute(missing model positions)`` and stored together in one write;
    ``cache``: the process's norm cache (``norm_cache.CACHE``) unless given."""
    cache = norm_cache.CACHE if cache is None else cache
    keys = cache_keys(base, models)
    known = cache.lookup(keys)
    missing = [t for t, key in enumerate(keys) if key not in known and key not in keys[:t]]
    found: Dict[str, float] = dict(known)
    if missing:
        found.update((keys[t], norm) for t, norm in zip(missing, compute(missing)))
        cache.put_many(
            {keys[t]: (found[keys[t]], {"base": base.base_path, "model": models[t].base_path}) for t in missing}
        )
    return [found[key] for key in keys], [key in known for key in keys]


def loader_norms(
    base: TensorSource,
    models: Sequence[TensorSource],
    *,
    labels: Sequence[str],
    device: torch.device | str = "cpu",
    cache: Optional[NormCache] = None,
) -> List[float]:
    """The global norms of ``models`` against ``base``, through loaders the caller holds
    (fresh ones from ``reference_norms``, or a sweep's in-memory copies): the same cache
    keys and the same streaming sums, hence the same numbers."""

    def compute(missing: List[int]) -> List[float]:
        return stream_norms(base, [models[t] for t in missing], [labels[t] for t in missing], device)

    with _PASS_LOCK:
        norms, cached = resolve_norms(base.index, [m.index for m in models], compute, cache)
    for label, norm, was_cached in zip(labels, norms, cached):
        LOG.log(
            logging.DEBUG if was_cached else logging.INFO,
            "fedmerge: task-vector norm of %s = %.6g (%s)", label, norm, "cached" if was_cached else "computed",
        )
    return norms


@contextlib.contextmanager
def checkpoint_loaders(indices: Sequence[ShardedTensorIndex]) -> Iterator[List[LazyTensorLoader]]:
    """A loader per checkpoint, their open files closed when the block ends."""
    loaders = [LazyTensorLoader(index) for index in indices]
    try:
        yield loaders
    finally:
        for loader in loaders:
            loader.flush()


def model_index(model: ModelReference) -> ShardedTensorIndex:
    """The tensor index mergekit uses for a model reference (LoRA merged, hub cache resolved)."""
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model).index


def reference_norms(
    base: Hashable, models: Sequence[Hashable], device: torch.device | str = "cpu", cache: Optional[NormCache] = None
) -> List[float]:
    """Norms of task models given as mergekit ``ModelReference``s: cclip's default norm
    provider inside mergekit merges, and ``fedmerge inspect``'s and the sweep's from disk."""
    for model in models:
        if not isinstance(base, ModelReference) or not isinstance(model, ModelReference):
            raise RecipeError(
                f"cclip: no task-vector norm for model {model!r}: outside a mergekit recipe pass the "
                "per-model parameter `norm` (fedmerge_plugins.norms.streaming.state_dict_norms computes it)"
            )
    with checkpoint_loaders([model_index(base), *(model_index(m) for m in models)]) as loaders:
        return loader_norms(loaders[0], loaders[1:], labels=[str(m) for m in models], device=device, cache=cache)


def state_dict_norms(
    base: Mapping[str, torch.Tensor], models: Mapping[Hashable, Mapping[str, torch.Tensor]]
) -> Dict[Hashable, float]:
    """Global task-vector norms of in-memory state dicts, for the Python API's ``norm``."""
    norms = {}
    for key, state in models.items():
        total = sum(
            squared_distance(name, tensor, state[name], str(key))
            for name, tensor in base.items()
            if name in state and tensor.is_floating_point()
        )
        norms[key] = math.sqrt(total)
    return norms

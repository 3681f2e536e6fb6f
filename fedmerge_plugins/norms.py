"""Global task-vector L2 norms, streamed one tensor at a time and remembered.

‖τ_t‖² = Σ ‖θ_t − θ_0‖² over every floating-point tensor that the base and the task
checkpoint share by name. Where a tensor's shape differs along one axis only (a
vocabulary: Llama-2 has 32000 rows, WizardMath 32001), only the rows both checkpoints
have are counted: those are the rows a merge with ``tokenizer: {source: base}`` keeps,
since added tokens come after the base vocabulary. The rows a task model adds have no
base row to differ from and are not part of its task vector.

Norms are remembered in this process and in ``$FEDMERGE_CACHE_DIR/norms.json``
(default ``~/.cache/fedmerge``), keyed by the identity of the weight files of both
checkpoints (resolved path, size, modification time), so a later merge or sweep of the
same checkpoints reads none of them for norms; rewriting a checkpoint invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Dict, Hashable, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from tqdm.auto import tqdm

from fedmerge_plugins.errors import NonFiniteError

LOG = logging.getLogger(__name__)
CACHE_VERSION = 1
FileIdentity = Tuple[str, int, int]


def cache_dir() -> Path:
    return Path(os.environ.get("FEDMERGE_CACHE_DIR") or Path.home() / ".cache" / "fedmerge")


def checkpoint_identity(index: ShardedTensorIndex) -> Tuple[FileIdentity, ...]:
    """(resolved path, size, mtime in ns) of every weight file of a checkpoint."""
    # A shard holds many tensors: resolve each file once, not once per tensor.
    files = sorted({os.path.realpath(os.path.join(index.base_path, f)) for f in set(index.tensor_paths.values())})
    return tuple((path, (st := os.stat(path)).st_size, st.st_mtime_ns) for path in files)


def cache_key(base: ShardedTensorIndex, model: ShardedTensorIndex) -> str:
    payload = json.dumps([CACHE_VERSION, checkpoint_identity(base), checkpoint_identity(model)])
    return hashlib.sha256(payload.encode()).hexdigest()


class NormCache:
    """In-process dictionary backed by one JSON file; writes are atomic replacements."""

    def __init__(self, path: Optional[Path] = None) -> None:
        self._path = path
        self._memory: Dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self._path or cache_dir() / "norms.json"

    def _read_disk(self) -> Dict[str, dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Optional[float]:
        with self._lock:
            if key not in self._memory:
                entry = self._read_disk().get(key)
                if entry is None:
                    return None
                self._memory[key] = float(entry["norm"])
            return self._memory[key]

    def put(self, key: str, norm: float, **info: object) -> None:
        with self._lock:
            self._memory[key] = norm
            entries = self._read_disk()
            entries[key] = {"norm": norm, **info}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump(entries, handle, indent=1)
            os.replace(tmp, self.path)

    def remember(self, key: str, norm: float) -> None:
        """Hold a norm computed elsewhere (a search's driver) in memory only."""
        with self._lock:
            self._memory[key] = float(norm)

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()


CACHE = NormCache()


def shared_rows(name: str, base: torch.Tensor, model: torch.Tensor, model_label: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trim two tensors to the rows they share when they differ along exactly one axis."""
    if base.shape == model.shape:
        return base, model
    differing = [axis for axis, (b, m) in enumerate(zip(base.shape, model.shape)) if b != m]
    if base.ndim != model.ndim or len(differing) != 1:
        raise ValueError(
            f"tensor {name}: model {model_label} has shape {tuple(model.shape)}, "
            f"the base {tuple(base.shape)}; they cannot be merged"
        )
    axis = differing[0]
    rows = min(base.shape[axis], model.shape[axis])
    return base.narrow(axis, 0, rows), model.narrow(axis, 0, rows)


def squared_distance(name: str, base: torch.Tensor, model: torch.Tensor, model_label: str) -> float:
    """‖model − base‖² of one tensor, in float32 (float64 for float64), checked finite."""
    base, model = shared_rows(name, base, model, model_label)
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    delta = torch.sub(model.to(dtype), base.to(dtype))
    if not bool(torch.isfinite(delta).all()):
        raise NonFiniteError(f"model {model_label} has NaN or inf values in tensor {name}")
    return float(torch.linalg.vector_norm(delta)) ** 2


def shared_float_tensors(
    base: LazyTensorLoader, model: LazyTensorLoader, device: torch.device | str = "cpu"
) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """Stream (name, base tensor, model tensor) for the floating tensors both checkpoints hold."""
    for name in base.index.tensor_paths:
        if name not in model.index.tensor_paths:
            continue
        base_tensor = base.get_tensor(name, device=str(device))
        if not base_tensor.is_floating_point():
            continue
        yield name, base_tensor, model.get_tensor(name, device=str(device))


def stream_norm(
    base: LazyTensorLoader, model: LazyTensorLoader, model_label: str, device: torch.device | str = "cpu"
) -> float:
    """‖θ_model − θ_base‖ over every shared floating tensor, one tensor in memory at a time."""
    total, count = 0.0, 0
    names = [n for n in base.index.tensor_paths if n in model.index.tensor_paths]
    tensors = shared_float_tensors(base, model, device)
    for name, base_tensor, model_tensor in tqdm(
        tensors, total=len(names), desc=f"task-vector norm of {model_label}", unit="tensor", leave=False
    ):
        total += squared_distance(name, base_tensor, model_tensor, model_label)
        count += 1
    if count == 0:
        raise ValueError(f"model {model_label} shares no floating-point tensor name with the base model")
    return math.sqrt(total)


def checkpoint_norm(
    base: ShardedTensorIndex,
    model: ShardedTensorIndex,
    *,
    model_label: str,
    device: torch.device | str = "cpu",
    cache: NormCache = CACHE,
) -> float:
    """The global task-vector norm of ``model`` against ``base``, from cache when known."""
    return loader_norm(
        LazyTensorLoader(base), LazyTensorLoader(model), model_label=model_label, device=device, cache=cache
    )


def loader_norm(
    base: LazyTensorLoader,
    model: LazyTensorLoader,
    *,
    model_label: str,
    device: torch.device | str = "cpu",
    cache: NormCache = CACHE,
) -> float:
    """``checkpoint_norm`` through loaders the caller already holds (a sweep's in-memory
    copies): the same cache key and the same streaming sum, hence the same number."""
    key = cache_key(base.index, model.index)
    norm = cache.get(key)
    if norm is not None:
        LOG.debug("fedmerge: task-vector norm of %s = %.6g (cached)", model_label, norm)
        return norm
    norm = stream_norm(base, model, model_label, device)
    cache.put(key, norm, base=base.index.base_path, model=model.index.base_path)
    LOG.info("fedmerge: task-vector norm of %s = %.6g (computed)", model_label, norm)
    return norm


def model_index(model: ModelReference) -> ShardedTensorIndex:
    """The tensor index mergekit uses for a model reference (LoRA merged, hub cache resolved)."""
    from mergekit.io.tasks import LoaderCache

    return LoaderCache().get(model).index


def reference_norm(base: Hashable, model: Hashable, device: torch.device) -> float:
    """Norm provider for cclip inside mergekit merges, where input ids are ModelReferences."""
    if not isinstance(base, ModelReference) or not isinstance(model, ModelReference):
        raise ValueError(
            f"cclip: no task-vector norm for model {model!r}: outside a mergekit recipe pass the "
            "per-model parameter `norm` (fedmerge_plugins.norms.state_dict_norms computes it)"
        )
    return checkpoint_norm(model_index(base), model_index(model), model_label=str(model), device=device)


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


def recipe_norms(base: ModelReference, models: Iterable[ModelReference], device: str = "cpu") -> List[float]:
    """Norms of several task models against one base (used by inspect and sweep)."""
    return [reference_norm(base, model, torch.device(device)) for model in models]

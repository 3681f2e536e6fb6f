"""Merging grid points with mergekit's own ``run_merge``, inputs read from disk once.

mergekit reads every input tensor through ``LoaderCache().get(model).get_tensor``. In
memory mode each input checkpoint is read once, tensor by tensor, into a ``MemoryLoader``
that stands in for mergekit's loader of that model for the whole sweep; every point then
runs the unchanged ``run_merge`` (dtype casts, vocabulary alignment, the method kernel,
output dtype, shards, config and tokenizer), so a point's output is, bit for bit, what
``mergekit-yaml`` writes for the point's recipe. CCLIP's global norms are computed from
the same in-memory tensors by the norm pass (``norms.loader_norms``, all task models in
one pass) and stored in the norm cache under the checkpoints' keys, where the kernel (and
a later ``mergekit-yaml``) finds them.

In disk mode nothing is held: ``run_merge`` reads the checkpoints for every point.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from mergekit.common import ModelReference
from mergekit.io.lazy_tensor_loader import ShardedTensorIndex
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from tqdm.auto import tqdm


@dataclass
class MemoryLoader:
    """A ``LazyTensorLoader`` look-alike over tensors already in memory (a dataclass, so
    that ``workers.pack`` ships its tensors through Ray's object store)."""

    index: ShardedTensorIndex
    tensors: Dict[str, torch.Tensor]

    def get_tensor(
        self, key: str, device: str = "cpu", aliases: Optional[List[str]] = None, raise_on_missing: bool = True
    ) -> Optional[torch.Tensor]:
        if key not in self.tensors:
            key = next((a for a in aliases or [] if a in self.tensors), key)
        if key not in self.tensors:
            if raise_on_missing:
                raise KeyError(key)
            return None
        return self.tensors[key].to(device)

    def flush(self) -> None:
        pass


def read_checkpoint(model: ModelReference) -> MemoryLoader:
    """Every tensor of ``model``'s checkpoint, read once, shard by shard."""
    loader = LoaderCache().get(model)
    names = [name for shard in loader.index.shards for name in shard.contained_keys]
    tensors = {}
    for name in tqdm(names, desc=f"reading {model}", unit="tensor", leave=False):
        tensors[name] = loader.get_tensor(name)
    loader.flush()
    return MemoryLoader(loader.index, tensors)


@contextlib.contextmanager
def inputs_in_memory(models: Sequence[ModelReference], options: MergeOptions) -> Iterator[Dict[ModelReference, MemoryLoader]]:
    """Read ``models`` into memory and let mergekit load from there until the block ends."""
    cache = LoaderCache()
    cache.setup(options)
    saved = {model: cache.loaders.get(model) for model in models}
    loaders: Dict[ModelReference, MemoryLoader] = {}
    try:
        for model in models:
            loaders[model] = read_checkpoint(model)
            install({model: loaders[model]})
        yield loaders
    finally:
        for model, loader in saved.items():
            if loader is None:
                cache.loaders.pop(model, None)
            else:
                cache.loaders[model] = loader
        loaders.clear()


def install(loaders: Dict[ModelReference, MemoryLoader]) -> None:
    """Let mergekit load ``loaders``' models from them (on a Ray worker, once: afterwards
    each is already in place)."""
    cache = LoaderCache()
    for model, loader in loaders.items():
        if cache.loaders.get(model) is not loader:
            cache.loaders[model] = loader  # type: ignore[assignment]


def memory_norms(base: ModelReference, tasks: Sequence[ModelReference], loaders: Dict[ModelReference, MemoryLoader]) -> List[float]:
    """CCLIP's global norms from the in-memory tensors, cached under the checkpoints' keys."""
    from fedmerge_plugins.norms.streaming import loader_norms

    return loader_norms(loaders[base], [loaders[task] for task in tasks], labels=[str(task) for task in tasks])  # type: ignore[arg-type, list-item]


def disk_norms(base: ModelReference, tasks: Sequence[ModelReference], device: str = "cpu") -> List[float]:
    from fedmerge_plugins.norms.streaming import reference_norms

    return reference_norms(base, tasks, device=device)


def merge_options(base: ModelReference, device: str = "cpu") -> MergeOptions:
    """mergekit-yaml's defaults, quiet, without a model card, and copying the base's
    tokenizer only where it has one (a CLIP vision tower has none)."""
    from fedmerge_plugins.guards.model_folder import has_tokenizer
    from fedmerge_plugins.norms.streaming import model_index

    folder = Path(model_index(base).base_path)
    copy_tokenizer = has_tokenizer(folder)
    return MergeOptions(device=device, write_model_card=False, quiet=True, copy_tokenizer=copy_tokenizer)


def merge_point(config, out_dir: Path, options: MergeOptions) -> Path:
    """Write the merge of one point's recipe to ``out_dir`` (replaced if present)."""
    from mergekit.merge import run_merge

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    run_merge(config, str(out_dir), options=options)
    return out_dir

"""Which shape differences a merge accepts, decided from checkpoint headers alone.

Task vectors θ_t − θ_0 need every tensor of a task model to have its base tensor's shape.
One difference is allowed: along the vocabulary axis of the tensors mergekit aligns token
by token (those whose ``WeightInfo.vocabulary_axis`` is set in mergekit's architecture
info: ``embed_tokens``, ``lm_head`` and their aliases), and only when the recipe has a
tokenizer setting (``tokenizer:`` or ``tokenizer_source:``) or mergekit's
``--unsafe-truncate-embeddings`` is on. Any other difference is an error naming the model,
the tensor and both shapes, with advice that fits its cause.

Shapes come from safetensors headers, and for pickled ``.bin`` checkpoints from
``torch.load`` on the meta device (memory-mapped, ``weights_only``): no weight is read.
An unreadable weight file is an ``InputError`` naming it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration

from fedmerge_plugins.errors import FedmergeError, InputError, RecipeError, reason

Shape = Tuple[int, ...]
# the single weight file mergekit opens in a folder without an index (ShardedTensorIndex.from_disk)
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def file_shapes(path: str, label: str) -> Dict[str, Shape]:
    """Tensor shapes of one weight file, without reading its weights."""
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        return _pickle_shapes(path)
    except Exception as error:  # any failure to parse a header means the file is unusable
        raise InputError(f"model {label}: cannot read weight file {path}: {reason(error)}") from None


def _pickle_shapes(path: str) -> Dict[str, Shape]:
    import torch

    try:
        state = torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        state = torch.load(path, map_location="meta", weights_only=True)  # a legacy (non-zip) file
    if isinstance(state, dict) and "state_dict" in state:  # as mergekit reads such files
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"holds a {type(state).__name__}, not a state dict")
    return {name: tuple(t.shape) for name, t in state.items() if isinstance(t, torch.Tensor)}


def _where(model: ModelReference) -> str:
    folder = model.model.path
    if model.lora is None and os.path.isdir(folder):
        for name in SINGLE_FILES:
            path = os.path.join(folder, name)
            if os.path.exists(path) and not os.path.exists(path + ".index.json"):
                return f" in {path}"
        return f" in {folder}"
    return ""


def _index(model: ModelReference) -> Any:
    """mergekit's tensor index for ``model``; a local folder's straight from disk (as
    mergekit's loader reads it), so that mergekit's loader cache is not filled early."""
    from mergekit.io.lazy_tensor_loader import ShardedTensorIndex

    from fedmerge_plugins.norms.streaming import model_index

    if model.lora is None and os.path.isdir(model.model.path):
        return ShardedTensorIndex.from_disk(model.model.path)
    return model_index(model)


def checkpoint_shapes(model: ModelReference) -> Dict[str, Shape]:
    """Every tensor's shape in the checkpoint mergekit would read for ``model``."""
    try:
        index = _index(model)
    except FedmergeError:
        raise
    except Exception as error:
        raise InputError(f"model {model}: cannot read its weights{_where(model)}: {reason(error)}") from None
    shapes: Dict[str, Shape] = {}
    for shard in index.shards:
        found = file_shapes(os.path.join(index.base_path, shard.filename), str(model))
        missing = [name for name in shard.contained_keys if name not in found]
        if missing:
            raise InputError(
                f"model {model}: weight file {os.path.join(index.base_path, shard.filename)} lacks tensor "
                f"{missing[0]}, which its index lists"
            )
        listed = set(shard.contained_keys)
        shapes.update({name: shape for name, shape in found.items() if name in listed})
    return shapes


def check_readable(config: MergeConfiguration) -> None:
    """Every local model folder's weight files have readable headers (hub ids and LoRA
    adapters are read later, when mergekit has resolved them)."""
    for model in config.referenced_models():
        if model.lora is None and os.path.isdir(model.model.path):
            checkpoint_shapes(model)


def tokenizer_setting(config: MergeConfiguration) -> bool:
    """Whether mergekit aligns vocabularies for this recipe (it builds a tokenizer)."""
    source = config.tokenizer.source if config.tokenizer is not None else config.tokenizer_source
    return source is not None


def vocabulary_axes(config: MergeConfiguration, arch_info: Any = None) -> Dict[str, int]:
    """Tensor name (aliases included) -> vocabulary axis, from mergekit's architecture info
    for the base model; {} when mergekit has none for it."""
    from mergekit.architecture import ConfiguredModelArchitecture, get_architecture_info
    from mergekit.options import MergeOptions

    try:
        if arch_info is None:
            arch_info = get_architecture_info(config, MergeOptions())
        weights = ConfiguredModelArchitecture(info=arch_info, config=config.base_model.config()).all_weights()
    except Exception:  # no architecture info: no axis may differ
        return {}
    axes: Dict[str, int] = {}
    for weight in weights:
        if weight.vocabulary_axis is not None:
            for name in (weight.name, *(weight.aliases or ()), *(weight.tied_names or ())):
                axes[name] = weight.vocabulary_axis
    return axes


def differing_axes(expected: Shape, shape: Shape) -> Optional[List[int]]:
    """The axes along which two shapes differ; None when their ranks differ."""
    if len(expected) != len(shape):
        return None
    return [axis for axis, (a, b) in enumerate(zip(expected, shape)) if a != b]


def shape_advice(axes: Optional[List[int]], vocabulary_axis: Optional[int], aligned: bool) -> str:
    """Why a difference cannot merge, and what to do (empty when it can)."""
    if vocabulary_axis is not None and axes == [vocabulary_axis]:
        if aligned:
            return ""
        return "different vocabularies: add `tokenizer: {source: base}`"
    what = "its rank differs" if axes is None else "axis " + ", ".join(map(str, axes)) + " differs"
    if vocabulary_axis is None:
        where = "this is not a vocabulary tensor"
    else:
        where = f"only its vocabulary axis {vocabulary_axis} may differ"
    return (
        f"{what} and {where}: the model is not a fine-tune of this base (another size or "
        "architecture); task vectors need models of the base's shapes"
    )


def check_shapes(
    config: MergeConfiguration,
    tasks: List[ModelReference],
    *,
    arch_info: Any = None,
    truncate_embeddings: bool = False,
) -> None:
    """Raise RecipeError at the first tensor a task model shares with the base whose shape
    cannot merge; ``arch_info``: mergekit's, when the caller has it."""
    if config.base_model is None:
        return
    aligned = tokenizer_setting(config) or truncate_embeddings
    base = checkpoint_shapes(config.base_model)
    axes: Optional[Dict[str, int]] = None
    for task in tasks:
        for name, shape in checkpoint_shapes(task).items():
            expected = base.get(name)
            if expected is None or expected == shape:
                continue
            if axes is None:  # only when something differs: the happy path costs nothing
                axes = vocabulary_axes(config, arch_info)
            advice = shape_advice(differing_axes(expected, shape), axes.get(name), aligned)
            if advice:
                raise RecipeError(
                    f"{config.merge_method}: model {task}: tensor {name} has shape {shape}, "
                    f"the base model {expected} ({advice})"
                )

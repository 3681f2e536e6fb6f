"""Loading CLIP checkpoints and their vision towers; exporting towers for ``mergekit-yaml``.

Vision-tower state dicts use the keys of ``CLIPModel.vision_model`` (``embeddings.…``,
``encoder.layers.N.…``, ``post_layernorm.…``), whatever the file on disk calls them:
checkpoints saved by transformers 4 (the hub's ``tanganke/clip-vit-base-patch32_<task>``)
prefix every key with ``vision_model.``, transformers 5 does not.

mergekit 0.1.5 on transformers 5 plans ``CLIPVisionModel`` merges from the unprefixed
names and silently writes no weights at all for prefixed checkpoints; it cannot use a
full ``CLIPModel`` as base either. ``export_towers`` (``fedmerge clip prepare``) therefore
writes the base's vision tower and every fine-tuned tower as ``CLIPVisionModel``
checkpoints in the current layout, which the recipes in ``configs/clip/`` point at.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional

import torch

from fedmerge_plugins.errors import InputError, PathError
from fedmerge_plugins.files import path_error

StateDict = Dict[str, torch.Tensor]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars for the duration."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_clip(source: str, device: str = "cpu"):
    """The full base ``CLIPModel`` (text encoder, vision tower, projections), float32, eval mode."""
    from transformers import CLIPModel

    with quiet_transformers():
        try:
            model = CLIPModel.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise InputError(f"base CLIP model {source}: cannot load it as a CLIPModel: {error}") from None
    return model.to(device).eval()


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(source)


def load_image_processor(source: str):
    """CLIP's image processor on its PIL backend (no torchvision needed), from ``source``."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    with quiet_transformers():
        return Processor.from_pretrained(source)


def tower_state_dict(source: str, reference: Optional[Mapping[str, torch.Tensor]] = None, device: str = "cpu", label: str = "") -> StateDict:
    """A vision tower's weights (``CLIPVisionModel`` or full ``CLIPModel`` checkpoint), float32,
    checked against ``reference`` (the base tower): same keys, same shapes."""
    from transformers import CLIPVisionModel

    name = label or source
    with quiet_transformers():
        try:
            model, info = CLIPVisionModel.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
        except (OSError, ValueError) as error:
            raise InputError(f"vision tower {name} ({source}): cannot load it: {error}") from None
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise InputError(f"vision tower {name} ({source}): the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    tower = getattr(model, "vision_model", model)
    state = {key: tensor.detach().to(device) for key, tensor in tower.state_dict().items()}
    if reference is not None:
        check_compatible(state, reference, name)
    return state


def check_compatible(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], label: str) -> None:
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise InputError(f"vision tower {label}: tensors differ from the base tower's (missing {missing[:3]}, extra {extra[:3]})")
    for key, tensor in reference.items():
        if state[key].shape != tensor.shape:
            raise InputError(
                f"vision tower {label}: tensor {key} has shape {tuple(state[key].shape)}, the base {tuple(tensor.shape)}"
            )


def base_tower_state_dict(clip, device: Optional[str] = None) -> StateDict:
    """A detached copy of the base model's vision-tower weights."""
    return {k: v.detach().clone().to(device or v.device) for k, v in clip.vision_model.state_dict().items()}


def checkpoint_view(clip) -> torch.nn.Module:
    """``clip``'s vision tower as a module whose state-dict names are a ``CLIPVisionModel``
    checkpoint's (what ``mergekit-yaml`` writes), sharing its tensors: the tower itself on
    transformers 5; a module holding it as ``vision_model`` where ``CLIPVisionModel`` has one
    (transformers 4, whose checkpoints prefix every key with ``vision_model.``)."""
    from transformers import CLIPVisionModel

    with torch.device("meta"), quiet_transformers():
        layout = CLIPVisionModel(clip.config.vision_config)
    if not isinstance(getattr(layout, "vision_model", None), torch.nn.Module):
        return clip.vision_model
    holder = torch.nn.Module()
    holder.vision_model = clip.vision_model
    return holder


def save_tower(state: Mapping[str, torch.Tensor], vision_config, out: Path) -> None:
    """Write ``state`` as a ``CLIPVisionModel`` checkpoint (safetensors) in the current layout."""
    from transformers import CLIPVisionModel

    from safetensors import SafetensorError

    with quiet_transformers():
        model = CLIPVisionModel(vision_config)
        getattr(model, "vision_model", model).load_state_dict({k: v.cpu() for k, v in state.items()})
        try:
            model.save_pretrained(str(out))
        except OSError as error:  # a full or read-only --out
            raise path_error(out, error) from error
        except SafetensorError as error:  # the same, from the safetensors writer
            raise PathError(f"cannot write {out}: {error}") from error


def export_towers(base: str, finetuned: Mapping[str, str], out: Path) -> Dict[str, Path]:
    """Write ``out/base`` (the base CLIP's vision tower) and ``out/<task>`` for each
    fine-tuned tower, all as ``CLIPVisionModel`` checkpoints ``mergekit-yaml`` can merge."""
    from tqdm.auto import tqdm

    clip = load_clip(base)
    reference = base_tower_state_dict(clip)
    written = {"base": out / "base"}
    save_tower(reference, clip.config.vision_config, written["base"])
    for task, source in tqdm(finetuned.items(), desc="export vision towers", unit="model"):
        state = tower_state_dict(source, reference, label=task)
        written[task] = out / task
        save_tower(state, clip.config.vision_config, written[task])
    return written

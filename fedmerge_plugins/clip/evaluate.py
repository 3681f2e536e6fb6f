"""Accuracy and normalised accuracy of CLIP vision towers on the tasks' zero-shot heads.

A ``Session`` holds the base CLIP (its visual projection is shared by every tower: the
fine-tuned checkpoints change the vision tower only), the image processor, the data
folder and the cache. Any tower's weights are loaded into the base's vision tower in
place, so evaluating a merge costs one weight copy and the forward passes.

normalised accuracy on task t = accuracy of the evaluated tower on t / accuracy of the
model fine-tuned on t (paper section 6). The fine-tuned accuracies are computed once per
(checkpoint, data, split, head) and kept in ``<cache>/finetuned.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedmerge_plugins.clip import data as clip_data
from fedmerge_plugins.clip.cache import KEY_LENGTH, clip_cache_dir, finetuned_store, source_identity
from fedmerge_plugins.clip.heads import cached_head
from fedmerge_plugins.clip.models import (
    StateDict,
    base_tower_state_dict,
    load_clip,
    load_image_processor,
    load_tokenizer,
    tower_state_dict,
)
from fedmerge_plugins.search.normalized import normalized_accuracy
from fedmerge_plugins.store import digest

FINETUNED_VERSION = 1


class PixelNorm:
    """The processor's rescale and normalise steps, applied on the device to uint8 images."""

    def __init__(self, processor, device: torch.device) -> None:
        self.scale = float(processor.rescale_factor) if getattr(processor, "do_rescale", True) else 1.0
        normalize = getattr(processor, "do_normalize", True)
        mean = processor.image_mean if normalize else (0.0, 0.0, 0.0)
        std = processor.image_std if normalize else (1.0, 1.0, 1.0)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() * self.scale - self.mean) / self.std


@dataclass
class Session:
    """Everything evaluation needs, loaded once."""

    base: str
    data_dir: Path
    device: str = "cpu"
    batch_size: int = 128
    settings: clip_data.SplitSettings = field(default_factory=clip_data.SplitSettings)
    cache_root: Optional[Path] = None
    resident_splits: Sequence[str] = ("validation",)
    progress: bool = True

    def __post_init__(self) -> None:
        self.device = str(torch.device(self.device))
        self.data_dir = Path(self.data_dir)
        self.cache_root = clip_cache_dir(self.cache_root)
        self.clip = load_clip(self.base, self.device)
        self.processor = load_image_processor(self.base)
        self.norm = PixelNorm(self.processor, torch.device(self.device))
        self.base_state = base_tower_state_dict(self.clip)
        self._tokenizer = None
        self._tasks: Dict[str, clip_data.TaskData] = {}
        self.heads: Dict[str, torch.Tensor] = {}  # set an entry to evaluate against a head of your own
        self._pixels: Dict[tuple, clip_data.Pixels] = {}
        self.finetuned_store = finetuned_store(self.cache_root)

    def arguments(self) -> Dict[str, object]:
        """What makes an equal session elsewhere (a Ray worker): ``Session(**arguments)``;
        the heads and images it then reads from the cache this one filled."""
        return {
            "base": self.base, "data_dir": self.data_dir, "device": self.device, "batch_size": self.batch_size,
            "settings": self.settings, "cache_root": self.cache_root, "resident_splits": tuple(self.resident_splits),
        }

    # --- inputs -------------------------------------------------------------------------
    def task(self, task: str) -> clip_data.TaskData:
        if task not in self._tasks:
            self._tasks[task] = clip_data.open_task(self.data_dir, task)
        return self._tasks[task]

    def head(self, task: str) -> torch.Tensor:
        if task not in self.heads:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.base)
            self.heads[task] = cached_head(self.clip, self._tokenizer, self.base, self.task(task).text, self.cache_root)
        return self.heads[task]

    def pixels(self, task: str, split: str) -> clip_data.Pixels:
        if (task, split) not in self._pixels:
            self._pixels[(task, split)] = clip_data.pixels(
                self.task(task), split, self.processor, self.settings, self.cache_root, progress=self.progress
            )
        return self._pixels[(task, split)]

    def tower(self, source: str, label: str = "") -> StateDict:
        """A vision tower's weights on the session's device, checked against the base tower."""
        return tower_state_dict(source, self.base_state, self.device, label)

    # --- evaluation ---------------------------------------------------------------------
    def load_tower(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.clip.vision_model.load_state_dict(state, strict=True)

    def _batches(self, pixels: clip_data.Pixels, split: str):
        if split in self.resident_splits:
            if "images" not in pixels.resident:
                pixels.resident["images"] = torch.from_numpy(np.array(pixels.images)).to(self.device)
            images = pixels.resident["images"]
            for start in range(0, len(pixels), self.batch_size):
                yield images[start : start + self.batch_size]
            return
        for start in range(0, len(pixels), self.batch_size):
            chunk = np.array(pixels.images[start : start + self.batch_size])
            yield torch.from_numpy(chunk).to(self.device, non_blocking=True)

    @torch.inference_mode()
    def predict(self, task: str, split: str) -> torch.Tensor:
        """Predicted labels of the currently loaded tower on a task's split (on CPU)."""
        head = self.head(task)
        pixels = self.pixels(task, split)
        predictions = []
        for batch in self._batches(pixels, split):
            pooled = self.clip.vision_model(pixel_values=self.norm(batch)).pooler_output
            features = F.normalize(self.clip.visual_projection(pooled).float(), dim=-1)
            predictions.append((features @ head.T).argmax(dim=-1).cpu())
        return torch.cat(predictions)

    def accuracy(self, task: str, split: str) -> float:
        """Accuracy of the currently loaded tower."""
        labels = self.pixels(task, split).labels
        return float((self.predict(task, split) == labels).double().mean())

    def accuracy_of(self, state: Mapping[str, torch.Tensor], tasks: Sequence[str], split: str) -> Dict[str, float]:
        self.load_tower(state)
        return {task: self.accuracy(task, split) for task in tasks}

    def finetuned_accuracy(
        self, task: str, source: str, split: str, state: Optional[Mapping[str, torch.Tensor]] = None
    ) -> float:
        """The fine-tuned tower's own accuracy on its task (computed once, then cached);
        ``state``: its weights when already loaded from ``source``."""
        pixels = self.pixels(task, split)
        key = digest(
            "finetuned", FINETUNED_VERSION, source_identity(source), source_identity(self.base),
            pixels.key, self.task(task).text.classnames, self.task(task).text.templates, length=KEY_LENGTH,
        )
        cached = self.finetuned_store.get(key)
        if cached is not None:
            return float(cached["accuracy"])
        self.load_tower(state if state is not None else self.tower(source, task))
        accuracy = self.accuracy(task, split)
        self.finetuned_store.put(key, {"accuracy": accuracy, "task": task, "split": split, "model": source})
        return accuracy


def normalized(accuracies: Mapping[str, float], reference: Mapping[str, float], split: str) -> Dict[str, float]:
    """accuracy / fine-tuned accuracy per task; a fine-tuned accuracy of 0 is an error."""
    return normalized_accuracy(
        accuracies,
        reference,
        lambda task: f"task {task}: the fine-tuned model scores 0 on {split}; normalized accuracy is undefined",
    )


def references(session: Session, tasks: Sequence[str], finetuned: Mapping[str, str], split: str) -> Dict[str, float]:
    """The fine-tuned towers' own accuracies (cached). One not cached yet is loaded into the
    session's vision tower to be scored: compute them before loading the tower to evaluate."""
    return {task: session.finetuned_accuracy(task, finetuned[task], split) for task in tasks}


def score_loaded(
    session: Session, tasks: Sequence[str], split: str, reference: Optional[Mapping[str, float]]
) -> Dict[str, Dict[str, float]]:
    """Accuracy of the tower now in the session's vision tower on each task, and its
    normalised accuracy against ``reference`` (the fine-tuned accuracies) when given."""
    accuracy = {task: session.accuracy(task, split) for task in tasks}
    result = {task: {"accuracy": accuracy[task]} for task in tasks}
    if reference is not None:
        for task, value in normalized(accuracy, reference, split).items():
            result[task].update(finetuned_accuracy=reference[task], normalized_accuracy=value)
    return result


def load_merged(
    session: Session, merged: str, tasks: Sequence[str], finetuned: Optional[Mapping[str, str]], split: str
) -> Optional[Dict[str, float]]:
    """Tower ``merged`` loaded into the session's vision tower (checked first), the fine-tuned
    towers' accuracies (``references``, when given) computed before; returns those."""
    state = session.tower(merged, "merged")
    reference = None if finetuned is None else references(session, tasks, finetuned, split)
    session.load_tower(state)
    return reference


def evaluate_tower(
    session: Session, merged: str, tasks: Sequence[str], finetuned: Optional[Mapping[str, str]], split: str = "test"
) -> Dict[str, Dict[str, float]]:
    """``fedmerge clip eval``: accuracy (and normalised accuracy when fine-tuned towers are
    given) of one vision tower on each task."""
    reference = load_merged(session, merged, tasks, finetuned, split)
    return score_loaded(session, tasks, split, reference)

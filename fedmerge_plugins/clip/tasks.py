"""The eight tasks of the paper's CLIP experiment: names, class names, prompt templates.

``tasks.json`` holds, per task, the class names in the order of the datasets' integer
labels and the zero-shot templates of Ilharco et al.'s task-vector experiments (CLIP's
prompt lists; as shipped by FusionBench, MIT licence, whose Hugging Face datasets and
``tanganke/clip-vit-base-patch32_<task>`` towers use this label order).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Dict, Optional, Sequence, Tuple


from fedmerge_plugins.errors import DataError
PAPER_TASKS: Tuple[str, ...] = ("cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn")
DISPLAY_NAMES: Dict[str, str] = {
    "cars": "Cars", "dtd": "DTD", "eurosat": "EuroSAT", "gtsrb": "GTSRB",
    "mnist": "MNIST", "resisc45": "RESISC45", "sun397": "SUN397", "svhn": "SVHN",
}
ALIASES: Dict[str, str] = {"stanford_cars": "cars", "stanford-cars": "cars", "stanfordcars": "cars"}
# Folder names a task's data may also be found under (data root) besides its own name.
FOLDER_ALIASES: Dict[str, Tuple[str, ...]] = {"cars": ("stanford_cars", "stanford-cars")}

DEFAULT_BASE = "openai/clip-vit-base-patch32"
_HUB_NAMES = {"cars": "stanford-cars"}
DEFAULT_FINETUNED: Dict[str, str] = {
    task: f"tanganke/clip-vit-base-patch32_{_HUB_NAMES.get(task, task)}" for task in PAPER_TASKS
}
DEFAULT_TEMPLATES: Tuple[str, ...] = ("a photo of a {}.",)


@dataclass(frozen=True)
class TaskText:
    """Class names (label order) and templates (``{}`` stands for the class name)."""

    classnames: Tuple[str, ...]
    templates: Tuple[str, ...]

    def prompts(self, classname: str) -> Tuple[str, ...]:
        return tuple(template.replace("{}", classname) for template in self.templates)


def canonical(task: str) -> str:
    """The task's key: lower case, aliases (``stanford_cars``) resolved."""
    key = task.strip().lower()
    return ALIASES.get(key, key)


def display_name(task: str) -> str:
    return DISPLAY_NAMES.get(task, task)


@functools.lru_cache(maxsize=None)
def _shipped() -> Dict[str, TaskText]:
    raw = json.loads(resources.files(__package__).joinpath("tasks.json").read_text(encoding="utf-8"))
    return {task: TaskText(tuple(entry["classnames"]), tuple(entry["templates"])) for task, entry in raw.items()}


def shipped(task: str) -> Optional[TaskText]:
    """Shipped class names and templates of one of the paper's tasks, else None."""
    return _shipped().get(canonical(task))


def task_text(task: str, dataset_classnames: Optional[Sequence[str]] = None) -> TaskText:
    """Shipped text for the paper's tasks; for any other task, the dataset's own class
    names (folder names or ``ClassLabel`` names, ``_`` read as a space) with the
    template "a photo of a {}."."""
    text = shipped(task)
    if text is not None:
        return text
    if not dataset_classnames:
        raise DataError(
            f"task {task!r} is not one of the paper's tasks ({', '.join(PAPER_TASKS)}) and its "
            "dataset names no classes: cannot build a zero-shot head"
        )
    return TaskText(tuple(name.replace("_", " ") for name in dataset_classnames), DEFAULT_TEMPLATES)

"""Which fine-tuned vision tower each task uses (library side of ``--model``/``--models-dir``)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

from fedmerge_plugins.clip.tasks import DEFAULT_FINETUNED, canonical
from fedmerge_plugins.errors import FedmergeError


class SourceError(FedmergeError):
    """A fine-tuned model that cannot be found; ``field`` is ``models`` (a TASK=SRC item)
    or ``models_dir``, so each command can name its own option."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def finetuned_sources(tasks: Sequence[str], models: Sequence[str], models_dir: Optional[Path]) -> Dict[str, str]:
    """Fine-tuned tower per task: an explicit ``TASK=SRC`` item, else ``<models_dir>/<task>``,
    else the hub's ``tanganke/clip-vit-base-patch32_<task>`` for the paper's tasks."""
    explicit = {}
    for item in models:
        task, sep, source = item.partition("=")
        if not sep or not source:
            raise SourceError(f"{item!r}: write TASK=PATH_OR_HUB_ID", "models")
        explicit[canonical(task)] = source
    sources = {}
    for task in tasks:
        if task in explicit:
            sources[task] = explicit[task]
        elif models_dir is not None:
            if not (Path(models_dir) / task).is_dir():
                raise SourceError(f"no folder {Path(models_dir) / task} for task {task}", "models_dir")
            sources[task] = str(Path(models_dir) / task)
        elif task in DEFAULT_FINETUNED:
            sources[task] = DEFAULT_FINETUNED[task]
        else:
            raise SourceError(f"no fine-tuned model for task {task}: name one as {task}=PATH", "models")
    return sources

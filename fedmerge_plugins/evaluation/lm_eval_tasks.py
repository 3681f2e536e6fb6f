"""Task names to lm-eval tasks: fedmerge's five (``eval/``) and any other lm-eval task, stock
or from the user's ``--include-path``, for ``fedmerge eval`` and the sweep's lm-eval evaluator.

Only ``eval/`` and the include paths are indexed first (``TaskManager(include_defaults=False)``);
lm-eval's ~10k stock task files are indexed (10–40 s) only when a name is found in neither.
A task's score is its primary metric: the first of its ``metric_list`` (after its first filter,
if it has filters), with lm-eval's ``higher_is_better`` for it.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Tuple

from fedmerge_plugins.errors import DataError, PathError
from fedmerge_plugins.evaluation.tasks import ALL_TASKS, TASKS

TASKS_DIR_ENV = "FEDMERGE_EVAL_TASKS"
IncludePath = Sequence["str | Path"]


def tasks_dir() -> Path:
    """The directory of the task YAMLs: $FEDMERGE_EVAL_TASKS, else ``eval/`` of this checkout
    (or ``lm_eval_tasks/`` beside this module, where a wheel may carry them)."""
    candidates = [Path(os.environ[TASKS_DIR_ENV])] if os.environ.get(TASKS_DIR_ENV) else []
    here = Path(__file__).resolve().parent
    candidates += [here.parents[1] / "eval", here / "lm_eval_tasks"]
    for candidate in candidates:
        if (candidate / "fedmerge_gsm8k.yaml").is_file():
            return candidate
    raise PathError(
        f"fedmerge's lm-eval task configs were not found (looked in {', '.join(map(str, candidates))}); "
        f"set {TASKS_DIR_ENV} to the eval/ directory of a fedmerge checkout"
    )


def include_paths(include_path: IncludePath = ()) -> list:
    """``eval/`` and the user's folders, as lm-eval's ``include_path`` list."""
    missing = [str(p) for p in include_path if not Path(p).is_dir()]
    if missing:
        raise PathError(f"--include-path {', '.join(missing)}: not a folder")
    return [str(tasks_dir()), *(str(Path(p).resolve()) for p in include_path)]


_INDEXED: dict = {}  # (include paths, stock) -> its manager (with lm-eval's stock tasks: 10-40 s to index)


def task_manager(include_path: IncludePath = (), *, stock: bool = False, metadata: Optional[dict] = None):
    """lm-eval's ``TaskManager`` over ``eval/`` and ``include_path`` (``stock``: and lm-eval's
    own tasks), indexed once per process. ``metadata`` reaches fedmerge's tasks (data folder,
    split; a manager of its own); other tasks do not read it."""
    from lm_eval.tasks import TaskManager

    paths = include_paths(include_path)
    if metadata is not None:
        return TaskManager(include_path=paths, include_defaults=stock, metadata=metadata)
    key = (tuple(paths), stock)
    if key not in _INDEXED:
        _INDEXED[key] = TaskManager(include_path=paths, include_defaults=stock)
    return _INDEXED[key]


def lm_eval_name(name: str) -> str:
    """The lm-eval task name of a name the user gave (fedmerge's short names map to ``fedmerge_*``)."""
    return TASKS[name].lm_eval_name if name in TASKS else name


def parse_names(tasks: "str | Iterable[str]") -> Tuple[str, ...]:
    """``"gsm8k, arc_easy"`` or a sequence -> de-duplicated names in the given order
    (fedmerge's five in any case; other names as lm-eval spells them)."""
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [item.strip() for item in items if item.strip()]
    names = [name.lower() if name.lower() in TASKS else name for name in names]
    if not names:
        raise DataError("no evaluation task given")
    return tuple(dict.fromkeys(names))


def resolve_tasks(tasks: "str | Iterable[str]", include_path: IncludePath = ()) -> Tuple[Tuple[str, ...], bool]:
    """(names, whether lm-eval's stock tasks are needed): every name one of fedmerge's five
    or an lm-eval *task* (not a group or tag) in the include paths or lm-eval's stock tasks."""
    names = parse_names(tasks)
    others = [name for name in names if name not in TASKS]
    if not others:
        return names, False
    manager = task_manager(include_path)
    missing = [name for name in others if name not in manager.all_tasks]
    stock = bool(missing)
    if missing:
        manager = task_manager(include_path, stock=True)
    unknown = [name for name in others if name not in manager.all_tasks]
    if unknown:
        hints = [match for name in unknown for match in difflib.get_close_matches(name, manager.all_tasks, 3)]
        where = "fedmerge's (" + ", ".join(ALL_TASKS) + ")" + (", the --include-path folders'" if include_path else "") + " or lm-eval's"
        raise DataError(
            f"unknown evaluation task(s) {', '.join(unknown)}: not among {where}" + (f"; did you mean {', '.join(dict.fromkeys(hints))}?" if hints else "")
        )
    not_tasks = [name for name in others if name not in manager.all_subtasks]
    if not_tasks:
        raise DataError(f"{', '.join(not_tasks)}: an lm-eval group or tag, not one task; name its tasks (lm_eval --tasks list shows them)")
    return names, stock


@dataclass(frozen=True)
class PrimaryMetric:
    """The score of a task: ``metric`` after ``filter`` (lm-eval's ``results[task]["metric,filter"]``)."""

    metric: str
    filter: str
    higher_is_better: bool

    @property
    def result_key(self) -> str:
        return f"{self.metric},{self.filter}"


def primary_metric(name: str, task: Any) -> PrimaryMetric:
    """fedmerge's tasks: their declared metric; others: the first of the loaded task's
    ``metric_list`` (else of its default metrics) after its first filter ("none" without)."""
    if name in TASKS:
        return PrimaryMetric(TASKS[name].metric, "none", True)
    metrics = [entry["metric"] for entry in (task.config.metric_list or []) if isinstance(entry.get("metric"), str)]
    metric = metrics[0] if metrics else next(iter(task.higher_is_better()))
    filters = task.config.filter_list or []
    first = filters[0].get("name", "none") if filters and isinstance(filters[0], dict) else "none"
    return PrimaryMetric(metric, first, bool(task.higher_is_better().get(metric, True)))


def scored_split(task: Any) -> str:
    """The split lm-eval scores for a task: its test split, else its validation split."""
    if task.has_test_docs():
        return str(task.config.test_split)
    return str(task.config.validation_split)

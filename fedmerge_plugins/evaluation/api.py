"""Evaluate a local model on the paper's tasks through ``lm_eval.simple_evaluate``.

    result = evaluate_model("merged/", ("gsm8k", "humaneval"), data_dir="data/",
                            allow_code_execution=True)
    result.scores  # {"gsm8k": 0.61, "humaneval": 0.25}

Only the task configs in ``eval/`` are indexed (lm-eval's ~10k stock configs are skipped), the
data is read before the model is loaded, and nothing is downloaded when ``data_dir`` is given.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

from fedmerge_plugins.errors import DataError, PathError
from fedmerge_plugins.files import write_output
from fedmerge_plugins.evaluation.backends import Backend
from fedmerge_plugins.evaluation.loaders import check_split, local_path
from fedmerge_plugins.evaluation.sandbox import require_isolation
from fedmerge_plugins.evaluation.tasks import PAPER_TASKS, TASKS, get_spec, parse_task_list
from fedmerge_plugins.guards.model_folder import check_model_folder

TASKS_DIR_ENV = "FEDMERGE_EVAL_TASKS"
# lm-eval warnings that every run of these tasks would print, with nothing to act on
_EXPECTED_WARNINGS = ("Custom kwargs can be passed", "specified through cli, these settings will update")


class _DropExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED_WARNINGS)


def _prepare_lm_eval() -> None:
    """Drop the expected warnings, and collect lm-eval's environment report once per process:
    ``simple_evaluate`` runs torch's ``collect_env`` (pip and friends, ~1 s) on every call."""
    import lm_eval.evaluator as evaluator

    for name in ("lm_eval.api.task", "lm_eval.evaluator"):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropExpectedWarnings) for existing in logger.filters):
            logger.addFilter(_DropExpectedWarnings())
    if getattr(evaluator.add_env_info, "fedmerge_cached", False):
        return
    collect, cached = evaluator.add_env_info, {}

    def add_env_info(storage: Dict[str, Any]) -> None:
        if not cached:
            collect(cached)
        storage.update(copy.deepcopy(cached))

    add_env_info.fedmerge_cached = True  # type: ignore[attr-defined]
    evaluator.add_env_info = add_env_info


@dataclass
class EvalResult:
    """``scores``: short task name -> primary metric in [0, 1] (exact match for gsm8k, math and
    instruct; pass@1 for humaneval and mbpp). ``counts``: items scored per task. ``raw``:
    lm-eval's results dict (with "samples", the logged generations)."""

    scores: Dict[str, float]
    raw: Dict[str, Any] = field(repr=False)
    counts: Dict[str, int] = field(default_factory=dict)

    def generations(self, short: str) -> List[str]:
        """The model's generations for a task, in data order."""
        samples = sorted(self.raw["samples"][get_spec(short).lm_eval_name], key=lambda sample: sample["doc_id"])
        return [sample["resps"][0][0] for sample in samples]

    def item_scores(self, short: str) -> List[float]:
        """The primary metric of each item of a task (1.0 or 0.0 here), in data order."""
        spec = get_spec(short)
        samples = sorted(self.raw["samples"][spec.lm_eval_name], key=lambda sample: sample["doc_id"])
        return [float(sample[spec.metric]) for sample in samples]


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


def check_request(
    tasks: Sequence[str],
    *,
    data_dir: "str | Path | None",
    split: str,
    validation_fraction: Optional[float],
    allow_code_execution: bool,
    limit: Optional[int] = None,
    batch_size: int = 8,
    max_gen_toks: Optional[int] = 256,
) -> None:
    """Everything that can be checked before data or model are read; raises ``DataError``
    (``PathError`` for missing data files; ``SandboxUnavailable`` where code tasks cannot
    run sandboxed)."""
    check_split(split, validation_fraction)
    code_tasks = [short for short in tasks if TASKS[short].runs_code]
    if code_tasks and not allow_code_execution:
        raise DataError(
            f"{', '.join(code_tasks)} run model-written code; allow it explicitly "
            "(allow_code_execution=True, CLI --allow-code-execution)"
        )
    if code_tasks:
        require_isolation()  # one line: the sandbox in force; or refuse, naming what is missing
    if data_dir is None:
        local_only = [short for short in tasks if TASKS[short].hub is None]
        if local_only:
            raise DataError(f"{', '.join(local_only)} has no public dataset here: give a data directory")
    else:
        missing = [str(local_path(data_dir, short)) for short in tasks if not local_path(data_dir, short).is_file()]
        if missing:
            raise PathError(f"evaluation data file(s) not found: {', '.join(missing)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, not {limit}")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, not {batch_size}")
    if max_gen_toks is not None and max_gen_toks < 1:
        raise DataError(f"max_gen_toks must be at least 1, not {max_gen_toks}")


def load_tasks(
    tasks: Sequence[str],
    *,
    data_dir: "str | Path | None" = None,
    split: str = "test",
    validation_fraction: Optional[float] = None,
    seed: int = 1234,
) -> Dict[str, Any]:
    """lm-eval Task objects (short name -> Task) built from ``eval/``, their data loaded."""
    from lm_eval.tasks import TaskManager

    _prepare_lm_eval()
    metadata: Dict[str, Any] = {"split": split, "split_seed": seed}
    if data_dir is not None:
        metadata["data_dir"] = str(Path(data_dir).resolve())
    if validation_fraction is not None:
        metadata["validation_fraction"] = validation_fraction
    manager = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=metadata)
    loaded = manager.load([TASKS[short].lm_eval_name for short in tasks])["tasks"]
    return {short: loaded[TASKS[short].lm_eval_name] for short in tasks}


def load_model(
    model_dir: "str | Path",
    *,
    device: str = "cpu",
    batch_size: int = 8,
    dtype: Optional[str] = None,
    backend: Optional[Backend] = None,
):
    """lm-eval's ``hf`` model on a local directory (float32 on CPU, the checkpoint's dtype
    elsewhere), or the model ``backend`` describes (``Backend(name="vllm", ...)``)."""
    backend = backend or Backend(device=device, batch_size=batch_size, dtype=dtype)
    return backend.load(model_dir)


def evaluate_lm(
    lm: Any,
    task_objects: Mapping[str, Any],
    *,
    limit: Optional[int] = None,
    max_gen_toks: Optional[int] = 256,
    allow_code_execution: bool = False,
    output_dir: "str | Path | None" = None,
    model_name: str = "model",
) -> EvalResult:
    """Run loaded tasks (from ``load_tasks``) on an lm-eval model object."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    _prepare_lm_eval()
    for short, task in task_objects.items():
        wanted = max_gen_toks or task.config.generation_kwargs.get("max_gen_toks", 256)
        if wanted >= lm.max_length:
            raise DataError(
                f"{model_name}: {short} generates up to {wanted} tokens but the model's context is only "
                f"{lm.max_length}; lower max_gen_toks"
            )
    raw = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(task_objects.values()),
        limit=limit,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        log_samples=True,
        confirm_run_unsafe_code=allow_code_execution,
        # without a manager simple_evaluate indexes lm-eval's ~10k stock task files (~11 s)
        task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False),
    )
    raw["config"]["model"] = model_name
    scores, counts = {}, {}
    for short in task_objects:
        spec = get_spec(short)
        scores[short] = float(raw["results"][spec.lm_eval_name][spec.result_key])
        counts[short] = int(raw["n-samples"][spec.lm_eval_name]["effective"])
    result = EvalResult(scores=scores, raw=raw, counts=counts)
    if output_dir is not None:
        write_results(result, output_dir)
    return result


def write_results(result: EvalResult, output_dir: "str | Path") -> Path:
    """``results.json`` (lm-eval's results, without the samples) and ``samples_<task>.jsonl``."""
    from lm_eval.utils import handle_non_serializable

    output_dir = Path(output_dir)
    summary = {key: value for key, value in result.raw.items() if key != "samples"}
    summary["fedmerge_scores"] = result.scores
    path = output_dir / "results.json"
    write_output(path, json.dumps(summary, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    for task_name, samples in result.raw.get("samples", {}).items():
        lines = (json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n" for sample in samples)
        write_output(output_dir / f"samples_{task_name}.jsonl", "".join(lines))
    return path


def evaluate_model(
    model_dir: "str | Path",
    tasks: "Iterable[str] | str" = PAPER_TASKS,
    *,
    data_dir: "str | Path | None" = None,
    limit: Optional[int] = None,
    device: str = "cpu",
    batch_size: int = 8,
    max_gen_toks: Optional[int] = 256,
    split: str = "test",
    validation_fraction: Optional[float] = None,
    seed: int = 1234,
    allow_code_execution: bool = False,
    output_dir: "str | Path | None" = None,
    dtype: Optional[str] = None,
    backend: Optional[Backend] = None,
) -> EvalResult:
    """Evaluate the model in ``model_dir`` on ``tasks`` (short names).

    ``data_dir``: read ``DATA_DIR/<task>.jsonl`` instead of the public datasets. With a
    ``validation_fraction`` f, ``split="validation"`` scores a seeded f-part of each task's items
    and ``split="test"`` the rest; without one, ``split`` must be "test" and all items count.
    ``max_gen_toks=None`` keeps each task's own limit (the paper's: 1024 for GSM8K, 2048 for MATH
    and code; 1024 for instruct).
    ``allow_code_execution`` must be True for humaneval and mbpp, which run generated code.
    ``output_dir``: also write lm-eval's results JSON and the generations there.
    ``backend``: the lm-eval model to generate with (default: ``hf`` with ``device``,
    ``batch_size`` and ``dtype``); checked before any data or model is read.
    """
    names = parse_task_list(tasks)
    if Path(model_dir).is_dir():  # a local folder (not a hub id): finished, with a tokenizer
        check_model_folder(model_dir)
    backend = backend or Backend(device=device, batch_size=batch_size, dtype=dtype)
    backend.check()
    check_request(
        names,
        data_dir=data_dir,
        split=split,
        validation_fraction=validation_fraction,
        allow_code_execution=allow_code_execution,
        limit=limit,
        batch_size=batch_size,
        max_gen_toks=max_gen_toks,
    )
    task_objects = load_tasks(
        names, data_dir=data_dir, split=split, validation_fraction=validation_fraction, seed=seed
    )
    lm = load_model(model_dir, backend=backend)
    return evaluate_lm(
        lm,
        task_objects,
        limit=limit,
        max_gen_toks=max_gen_toks,
        allow_code_execution=allow_code_execution,
        output_dir=output_dir,
        model_name=Path(model_dir).name,
    )

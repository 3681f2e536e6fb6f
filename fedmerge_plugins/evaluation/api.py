"""Evaluate a local model on the paper's tasks, or any lm-eval task, through ``lm_eval.simple_evaluate``.

    result = evaluate_model("merged/", ("gsm8k", "humaneval"), data_dir="data/",
                            allow_code_execution=True)
    result.scores  # {"gsm8k": 0.61, "humaneval": 0.25}

Only the task configs in ``eval/`` (and ``include_path``) are indexed, lm-eval's ~10k stock
configs only for a name found nowhere else (``lm_eval_tasks``); the data is read before the model
is loaded, and nothing is downloaded when ``data_dir`` is given for fedmerge's own tasks.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from fedmerge_plugins.errors import DataError, PathError
from fedmerge_plugins.files import write_output
from fedmerge_plugins.evaluation.backends import Backend
from fedmerge_plugins.evaluation.lm_eval_tasks import IncludePath, PrimaryMetric, lm_eval_name, primary_metric, resolve_tasks, task_manager, tasks_dir
from fedmerge_plugins.evaluation.loaders import check_split, local_path
from fedmerge_plugins.evaluation.quiet import library_noise_off, quiet_git_describe
from fedmerge_plugins.evaluation.sandbox import require_isolation
from fedmerge_plugins.evaluation.tasks import PAPER_TASKS, TASKS
from fedmerge_plugins.guards.model_folder import check_model_folder

__all__ = ["EvalResult", "evaluate_lm", "evaluate_model", "load_model", "load_tasks", "tasks_dir", "write_results"]
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
    quiet_git_describe()
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
    """``scores``: task name -> its primary metric (exact match for gsm8k, math and instruct;
    pass@1 for humaneval and mbpp; another task's first metric: ``metrics``). ``counts``: items
    scored per task. ``raw``: lm-eval's results dict (with "samples", the logged generations)."""

    scores: Dict[str, float]
    raw: Dict[str, Any] = field(repr=False)
    counts: Dict[str, int] = field(default_factory=dict)
    metrics: Dict[str, PrimaryMetric] = field(default_factory=dict)

    def metric(self, name: str) -> PrimaryMetric:
        return self.metrics.get(name) or PrimaryMetric(TASKS[name].metric, "none", True)

    def _samples(self, name: str) -> List[Dict[str, Any]]:
        wanted = self.metric(name).filter
        samples = [s for s in self.raw["samples"][lm_eval_name(name)] if s.get("filter", wanted) == wanted]
        return sorted(samples, key=lambda sample: sample["doc_id"])

    def generations(self, name: str) -> List[str]:
        """The model's generations for a task, in data order."""
        return [sample["resps"][0][0] for sample in self._samples(name)]

    def item_scores(self, name: str) -> List[float]:
        """The primary metric of each item of a task (1.0 or 0.0 for fedmerge's tasks), in data order."""
        metric = self.metric(name).metric
        return [float(sample[metric]) for sample in self._samples(name)]


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
    run sandboxed). Data and split options concern fedmerge's own tasks; other lm-eval tasks
    read the data and split their YAML names."""
    check_split(split, validation_fraction, local=data_dir is not None)
    tasks = [short for short in tasks if short in TASKS]
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
    include_path: IncludePath = (),
    stock: Optional[bool] = None,
) -> Dict[str, Any]:
    """lm-eval Task objects (name -> Task), their data loaded: fedmerge's from ``eval/`` (with
    ``data_dir`` and the split), others from ``include_path`` or lm-eval's stock tasks
    (``stock``: index those; None: find out with ``resolve_tasks``)."""
    _prepare_lm_eval()
    if stock is None:
        tasks, stock = resolve_tasks(tasks, include_path)
    metadata: Dict[str, Any] = {"split": split, "split_seed": seed}
    if data_dir is not None:
        metadata["data_dir"] = str(Path(data_dir).resolve())
    if validation_fraction is not None:
        metadata["validation_fraction"] = validation_fraction
    ours, others = [n for n in tasks if n in TASKS], [n for n in tasks if n not in TASKS]
    loaded: Dict[str, Any] = {}
    with library_noise_off():
        if ours:  # with the metadata that picks their data and split
            loaded.update(task_manager(metadata=metadata).load([lm_eval_name(n) for n in ours])["tasks"])
        if others:
            loaded.update(task_manager(include_path, stock=stock).load(others)["tasks"])
    return {name: loaded[lm_eval_name(name)] for name in tasks}


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
    with library_noise_off():
        return backend.load(model_dir)


def simple_evaluate(lm: Any, task_objects: Mapping[str, Any], limit: Optional[int], max_gen_toks: Optional[int], allow_code_execution: bool) -> Dict[str, Any]:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(task_objects.values()),
        limit=limit,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        log_samples=True,
        confirm_run_unsafe_code=allow_code_execution,
        # without a manager simple_evaluate indexes lm-eval's ~10k stock task files (~11 s)
        task_manager=task_manager(),
    )


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
    _prepare_lm_eval()
    for short, task in task_objects.items():
        wanted = max_gen_toks or own_limit(task)
        if wanted is not None and wanted >= lm.max_length:
            raise DataError(
                f"{model_name}: {short} generates up to {wanted} tokens but the model's context is only "
                f"{lm.max_length}; lower --max-gen-toks (max_gen_toks)"
            )
    with library_noise_off():
        raw = simple_evaluate(lm, task_objects, limit, max_gen_toks, allow_code_execution)
    raw["config"]["model"] = model_name
    scores, counts, metrics = {}, {}, {}
    for name, task in task_objects.items():
        metrics[name] = primary_metric(name, task)
        scores[name] = float(raw["results"][lm_eval_name(name)][metrics[name].result_key])
        counts[name] = int(raw["n-samples"][lm_eval_name(name)]["effective"])
    result = EvalResult(scores=scores, raw=raw, counts=counts, metrics=metrics)
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


def own_limit(task: Any) -> Optional[int]:
    """A generating task's own ``max_gen_toks`` (lm-eval's default 256); None for other tasks."""
    if task.config.output_type != "generate_until":
        return None
    return int((task.config.generation_kwargs or {}).get("max_gen_toks", 256))


def context_length(model_dir: "str | Path") -> Optional[int]:
    """The model's context in tokens from its ``config.json`` (None where unknown)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = {**config, **config.get("text_config", {})}
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return int(config[key])
    return None


def longest_prompt(model_dir: "str | Path", task: Any, limit: Optional[int]) -> int:
    """Tokens of the task's longest (zero-shot) prompt, with the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    docs = list(task.eval_docs)[:limit] if limit else list(task.eval_docs)
    prompts = [str(task.doc_to_text(doc)) for doc in docs]
    return max((len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]), default=0)


def fit_generation(
    model_dir: "str | Path", task_objects: Mapping[str, Any], max_gen_toks: Optional[int], *, limit: Optional[int], context: Optional[int], note: Callable[[str], None]
) -> Optional[int]:
    """``max_gen_toks``, lowered (with a ``note``) to what the model's context leaves after the
    longest prompt of any generating task; an error when a prompt alone fills the context.
    Unchanged where the context is unknown (a hub id)."""
    context = context or context_length(model_dir)
    generating = {name: task for name, task in task_objects.items() if own_limit(task) is not None}
    if context is None or not generating:
        return max_gen_toks
    room = {}
    for name, task in generating.items():
        room[name] = context - longest_prompt(model_dir, task, limit)
        if room[name] < 1:
            raise DataError(f"{Path(model_dir).name}: the longest {name} prompt fills the model's whole context of {context} tokens")
    wanted = {name: max_gen_toks or own_limit(task) for name, task in generating.items()}
    tight = min(room, key=room.get)  # type: ignore[arg-type]
    if all(wanted[name] <= room[name] for name in generating):
        return max_gen_toks
    note(
        f"note: --max-gen-toks lowered from {max_gen_toks or wanted[tight]} to {room[tight]}: {Path(model_dir).name}'s context of "
        f"{context} tokens less the longest {tight} prompt"
    )
    return room[tight]


def _log_note(line: str) -> None:
    logging.getLogger("fedmerge_plugins.evaluation").warning(line)


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
    include_path: IncludePath = (),
    note: Optional[Callable[[str], None]] = None,
) -> EvalResult:
    """Evaluate the model in ``model_dir`` on ``tasks``: fedmerge's short names or any lm-eval
    task (stock, or from the folders in ``include_path``), each scored on its primary metric.

    ``data_dir``: read ``DATA_DIR/<task>.jsonl`` instead of the public datasets. With a
    ``validation_fraction`` f, ``split="validation"`` scores a seeded f-part of each task's items
    and ``split="test"`` the rest; without one every item of the data counts (a local file is
    the split: give a folder of validation files to score validation items). Other lm-eval
    tasks score the split their YAML names (test, else validation).
    ``max_gen_toks=None`` keeps each task's own limit (the paper's: 1024 for GSM8K, 2048 for MATH
    and code; 1024 for instruct). A limit longer than what the model's context leaves after the
    longest prompt is lowered to it, with a one-line ``note`` (default: a logged warning).
    ``allow_code_execution`` must be True for humaneval and mbpp, which run generated code.
    ``output_dir``: also write lm-eval's results JSON and the generations there.
    ``backend``: the lm-eval model to generate with (default: ``hf`` with ``device``,
    ``batch_size`` and ``dtype``); checked before any data or model is read.
    """
    names, stock = resolve_tasks(tasks, include_path)
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
        names, data_dir=data_dir, split=split, validation_fraction=validation_fraction, seed=seed, include_path=include_path, stock=stock
    )
    max_gen_toks = fit_generation(model_dir, task_objects, max_gen_toks, limit=limit, context=backend.max_model_len, note=note or _log_note)
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

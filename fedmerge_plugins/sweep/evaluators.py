"""Scoring a merged model: model directory or loaded model -> named scores -> one selection score.

An evaluator has a ``description`` (recorded with every result, so a resumed sweep cannot
mix evaluators) and ``evaluate(model_dir) -> {name: score}``. One that can score a model
loaded once for the whole sweep (``takes_model``) also has ``load(model_dir) -> Loaded``
(once per process; the sweep then copies each grid point's weights into ``Loaded.module``
in place) and ``evaluate_loaded(loaded) -> {name: score}``. Built-in:

- ``lm-eval``: ``fedmerge_plugins.evaluation.api`` on the tasks of ``eval/``; with the hf
  backend the lm-eval model (``HFLM``) and the task objects are made once per sweep;
- ``clip``: the CLIP evaluator of ``fedmerge_plugins.clip`` (normalized accuracy); the base
  CLIP and the images are loaded once per sweep, each point's weights go into its vision tower;
- ``python:MODULE:FUNCTION`` or ``python:FILE.py:FUNCTION``: a function returning a dict of
  scores or one number. ``FUNCTION(model_dir)`` gets a merged model's folder; a function
  with a parameter named ``model`` instead gets the loaded transformers model (the class
  its config names, in the merge's dtype, on the CPU), and the tokenizer too if it has a
  parameter named ``tokenizer``: ``def score(model, tokenizer): ...``.

The selection score is the mean of the scores; with reference scores (the fine-tuned
models' own, as the paper does) it is the mean normalized score, score / reference.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.sweep.errors import SweepError

Scores = Dict[str, float]


class Evaluator(Protocol):
    description: str

    def evaluate(self, model_dir: Path) -> Scores: ...


@dataclass
class Loaded:
    """A model an evaluator loaded once: ``module`` (a torch module) takes each point's
    weights; ``handle`` is what the evaluator scores (the module itself, lm-eval's model…)."""

    module: Any
    handle: Any
    tokenizer: Any = None


VLLM_CALLABLES = "VLLM_ALLOW_INSECURE_SERIALIZATION"
VLLM_CHUNK_BYTES = 1 << 30  # tensors sent to vLLM's workers per call


def _load_into_worker(worker: Any, weights: List[Tuple[str, Any]]) -> None:
    """Runs in each vLLM worker: its model's own loader (Hugging Face names; it fills the fused
    q/k/v and gate/up layers itself), as vLLM's RLHF example does."""
    worker.model_runner.model.load_weights(weights=weights)


class VllmWeights:
    """The load target of a vLLM engine (``vllm.LLM``): each point's tensors go to every worker
    through ``collective_rpc`` (in chunks of about ``VLLM_CHUNK_BYTES``), then the prefix cache
    is reset (cached prompt prefixes would otherwise be answered with the old weights)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def load_weights(self, tensors: Iterable[Tuple[str, Any]]) -> None:
        chunk: List[Tuple[str, Any]] = []
        size = 0
        for name, tensor in tensors:
            chunk.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= VLLM_CHUNK_BYTES:
                self.llm.collective_rpc(_load_into_worker, args=(chunk,))
                chunk, size = [], 0
        if chunk:
            self.llm.collective_rpc(_load_into_worker, args=(chunk,))
        self.llm.reset_prefix_cache()


def takes_model(evaluator: Evaluator) -> bool:
    """Whether ``evaluator`` scores a model loaded once (``load`` / ``evaluate_loaded``)."""
    return bool(getattr(evaluator, "takes_model", False))


def load_transformers_model(model_dir: Path) -> Any:
    """The model of a merged folder as its config's class (``architectures[0]``), stored dtype, eval mode."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    model = (model_class or transformers.AutoModel).from_pretrained(str(model_dir), dtype="auto")
    return model.eval().requires_grad_(False)


def _as_scores(value: Any, source: str) -> Scores:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"score": value}
    if not isinstance(value, Mapping) or not value:
        raise SweepError(f"{source} returned {value!r}; expected a number or a dict of numbers")
    scores = {}
    for name, score in value.items():
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise SweepError(f"{source}: score {name!r} is {score!r}, not a finite number")
        scores[str(name)] = float(score)
    return scores


class PythonEvaluator:
    """``python:MODULE:FUNCTION`` / ``python:FILE.py:FUNCTION``; FUNCTION(model_dir: str), or
    FUNCTION(model=…[, tokenizer=…]) when it has a parameter named ``model``."""

    def __init__(self, spec: str) -> None:
        self.description = spec
        target, _, name = spec.removeprefix("python:").rpartition(":")
        if not target or not name:
            raise SweepError(f"--eval {spec!r}: expected python:MODULE:FUNCTION or python:FILE.py:FUNCTION")
        self.target = str(Path(target).resolve()) if target.endswith(".py") else target
        self.name = name
        self.function = self._load(self.target, name, spec)

    def __getstate__(self) -> Dict[str, str]:  # to a Ray worker: loaded again there
        return {"description": self.description, "target": self.target, "name": self.name}

    def __setstate__(self, state: Dict[str, str]) -> None:
        self.__dict__.update(state)
        self.function = self._load(self.target, self.name, self.description)

    @staticmethod
    def _load(target: str, name: str, spec: str) -> Callable[[str], Any]:
        try:
            if target.endswith(".py"):
                module_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
                if module_spec is None or module_spec.loader is None:
                    raise ImportError(f"cannot load {target}")
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(target)
        except (ImportError, OSError) as error:
            raise SweepError(f"--eval {spec!r}: {error}") from None
        except Exception as error:  # the evaluator's own code failed on import: a syntax error, an exception
            raise SweepError(f"--eval {spec!r}: importing it raised {raised(error)}") from error
        function = getattr(module, name, None)
        if function is None:
            raise SweepError(f"--eval {spec!r}: module {target} has no attribute {name!r}")
        if not callable(function):
            raise SweepError(f"--eval {spec!r}: {name} is not callable")
        return function

    def _parameters(self) -> Sequence[str]:
        try:
            return list(inspect.signature(self.function).parameters)
        except (TypeError, ValueError):  # a builtin without a signature: the folder protocol
            return []

    @property
    def takes_model(self) -> bool:
        return "model" in self._parameters()

    def evaluate(self, model_dir: Path) -> Scores:
        if self.takes_model:
            return self.evaluate_loaded(self.load(model_dir))
        return self._call(str(model_dir))

    def load(self, model_dir: Path) -> Loaded:
        tokenizer = None
        if "tokenizer" in self._parameters():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        model = load_transformers_model(model_dir)
        return Loaded(model, model, tokenizer)

    def evaluate_loaded(self, loaded: Loaded) -> Scores:
        extra = {"tokenizer": loaded.tokenizer} if "tokenizer" in self._parameters() else {}
        return self._call(model=loaded.handle, **extra)

    def _call(self, *args: Any, **kwargs: Any) -> Scores:
        try:
            value = self.function(*args, **kwargs)
        except Exception as error:  # the evaluator's own failure: named, the traceback under -v
            raise SweepError(f"evaluator {self.description} raised {raised(error)}") from error
        return _as_scores(value, self.description)


def raised(error: BaseException) -> str:
    """``TYPE: message (FILE, line N)`` of an exception raised by a user's evaluator code:
    the innermost frame, or a syntax error's own place."""
    where = ""
    if isinstance(error, SyntaxError) and error.filename:
        where = f" ({error.filename}, line {error.lineno})"
    elif error.__traceback__ is not None:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = f" ({frame.filename}, line {frame.lineno})"
    message = error.msg if isinstance(error, SyntaxError) else str(error)
    return f"{type(error).__name__}: {message}{where}" if message else f"{type(error).__name__}{where}"


class LmEvalEvaluator:
    """The paper's LLM tasks, or any lm-eval task (stock, or from ``include_path``), through
    lm-eval (``fedmerge eval``'s engine); each task scores its primary metric."""

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        from fedmerge_plugins.evaluation.api import check_request
        from fedmerge_plugins.evaluation.lm_eval_tasks import resolve_tasks

        from fedmerge_plugins.evaluation.backends import Backend, BackendError

        self.options = options
        checked = {"data_dir": None, "split": "test", "validation_fraction": None, "allow_code_execution": False}
        checked.update({k: v for k, v in options.items() if k in (*checked, "limit", "batch_size", "max_gen_toks")})
        backend: Backend = options.get("backend") or Backend(
            device=options.get("device", "cpu"), batch_size=options.get("batch_size", 8), dtype=options.get("dtype"))
        try:
            backend.check()
            self.tasks, _ = resolve_tasks(tuple(tasks), options.get("include_path") or ())
            check_request(self.tasks, **checked)
        except BackendError as error:
            raise SweepError(f"--eval lm-eval: {error}") from None
        except FedmergeError as error:  # a task, split, data file or sandbox the request cannot have
            raise SweepError(f"--eval lm-eval: {error}") from None
        shown = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(options.items()) if k not in ("device", "backend")}
        # the backend generates differently (hf and vllm differ in numerics); its parallelism does not count
        suffix = "" if backend.name == "hf" else f" backend={backend.name}"
        self.description = f"lm-eval tasks={','.join(self.tasks)} {json.dumps(shown, sort_keys=True)}{suffix}"

        self.backend = backend
        self._task_objects: Optional[Dict[str, Any]] = None

    def __getstate__(self) -> Dict[str, Any]:  # to a Ray worker, which builds its own task objects
        return {**self.__dict__, "_task_objects": None}

    @property
    def takes_model(self) -> bool:
        # vLLM: one engine in this process (data parallelism starts engines of its own elsewhere)
        return self.backend.name == "hf" or (self.backend.name == "vllm" and self.backend.data_parallel_size == 1)

    def evaluate(self, model_dir: Path) -> Scores:
        from fedmerge_plugins.evaluation.api import evaluate_model

        return _lm_eval_scores(evaluate_model(model_dir, self.tasks, **self.options))

    def load(self, model_dir: Path) -> Loaded:
        """lm-eval's model on ``model_dir``, built as ``fedmerge eval`` builds it (so a point's
        scores are those of its merge evaluated alone); its transformers model takes the weights."""
        from fedmerge_plugins.evaluation.api import fit_generation, load_model

        if self.backend.name == "vllm":
            os.environ.setdefault(VLLM_CALLABLES, "1")  # collective_rpc of a function (VllmWeights) on vLLM's V1 engine
        lm = load_model(model_dir, backend=self.backend)
        # --max-gen-toks lowered to what the context leaves, as evaluate_model does (every point has this config and tokenizer)
        self._max_gen_toks = fit_generation(
            model_dir, self.task_objects(), self.options.get("max_gen_toks", 256), limit=self.options.get("limit"),
            context=self.backend.max_model_len, note=lambda line: logging.getLogger(__name__).warning(line))
        return Loaded(VllmWeights(lm.model) if self.backend.name == "vllm" else lm.model, lm)

    def task_objects(self) -> Dict[str, Any]:
        """lm-eval's task objects, built (data read) once per sweep and process."""
        from fedmerge_plugins.evaluation.api import load_tasks

        if self._task_objects is None:
            keys = ("data_dir", "split", "validation_fraction", "seed", "include_path")
            self._task_objects = load_tasks(self.tasks, **{k: v for k, v in self.options.items() if k in keys})
        return self._task_objects

    def evaluate_loaded(self, loaded: Loaded) -> Scores:
        from fedmerge_plugins.evaluation.api import evaluate_lm

        keys = ("limit", "allow_code_execution")
        options = {k: v for k, v in self.options.items() if k in keys}
        max_gen_toks = getattr(self, "_max_gen_toks", self.options.get("max_gen_toks", 256))
        return _lm_eval_scores(evaluate_lm(loaded.handle, self.task_objects(), max_gen_toks=max_gen_toks, **options))


def _lm_eval_scores(result: Any) -> Scores:
    """An ``EvalResult``'s scores, refused where a task's primary metric is better when lower
    (the selection takes the highest mean)."""
    lower = [f"{name} ({metric.metric})" for name, metric in result.metrics.items() if not metric.higher_is_better]
    if lower:
        raise SweepError(f"--eval lm-eval: the first metric of {', '.join(lower)} is better when lower; select on a task whose first metric is higher-is-better")
    return _as_scores(result.scores, "lm-eval")


class ClipEvaluator:
    """Normalized accuracy of a merged CLIP vision tower per task (``fedmerge clip eval``'s
    engine): accuracy / the fine-tuned tower's accuracy, on the chosen split. In memory, the
    base CLIP's vision tower (``Session``) takes each point's weights, as ``fedmerge clip
    experiment`` does; the fine-tuned accuracies are computed (or read from the cache)
    before the first point's tower goes in, since scoring a fine-tuned tower loads it there."""

    takes_model = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        data_dir: Optional[Path],
        base: Optional[str] = None,
        finetuned: Sequence[str] = (),
        models_dir: Optional[Path] = None,
        split: str = "validation",
        device: str = "cpu",
        batch_size: int = 128,
    ) -> None:
        from fedmerge_plugins.clip.sources import finetuned_sources
        from fedmerge_plugins.clip.tasks import DEFAULT_BASE, canonical

        if data_dir is None:
            raise SweepError("--eval clip needs --data-dir (one dataset folder per task)")
        if not tasks:
            raise SweepError("--eval clip needs --tasks (e.g. svhn,mnist)")
        self.tasks = tuple(canonical(t) for t in tasks)
        self.finetuned = finetuned_sources(self.tasks, finetuned, models_dir)
        self.split, self.base = split, base or DEFAULT_BASE
        self.session_options = {"base": self.base, "data_dir": Path(data_dir), "device": device, "batch_size": batch_size}
        self.description = (
            f"clip tasks={','.join(self.tasks)} base={self.base} split={split} data={Path(data_dir).resolve()} "
            f"finetuned={json.dumps(self.finetuned, sort_keys=True)}"
        )
        self._session: Any = None

    def __getstate__(self) -> Dict[str, Any]:  # to a Ray worker, which loads its own session
        return {**self.__dict__, "_session": None}

    def session(self) -> Any:
        """CLIP, heads and images, loaded once for the whole sweep (per process)."""
        from fedmerge_plugins.clip.evaluate import Session

        if self._session is None:
            self._session = Session(progress=False, **self.session_options)
        return self._session

    def evaluate(self, model_dir: Path) -> Scores:
        from fedmerge_plugins.clip.evaluate import evaluate_tower

        with _clip_errors(model_dir):
            return _clip_scores(evaluate_tower(self.session(), str(model_dir), self.tasks, self.finetuned, self.split))

    def load(self, model_dir: Path) -> Loaded:
        """The session's vision tower (``module``: names of a ``CLIPVisionModel`` checkpoint, the
        merge's) holding ``model_dir``'s tower; the fine-tuned accuracies computed before it."""
        from fedmerge_plugins.clip.evaluate import load_merged
        from fedmerge_plugins.clip.models import checkpoint_view

        session = self.session()
        with _clip_errors(model_dir):
            reference = load_merged(session, str(model_dir), self.tasks, self.finetuned, self.split)
        return Loaded(checkpoint_view(session.clip), ClipTower(session, reference))

    def evaluate_loaded(self, loaded: Loaded) -> Scores:
        from fedmerge_plugins.clip.evaluate import score_loaded

        tower: ClipTower = loaded.handle
        with _clip_errors("the loaded tower"):
            return _clip_scores(score_loaded(tower.session, self.tasks, self.split, tower.reference))


@contextlib.contextmanager
def _clip_errors(what: Any) -> Iterator[None]:
    try:
        yield
    except FedmergeError as error:
        raise SweepError(f"CLIP evaluation of {what}: {error}") from None


def _clip_scores(result: Mapping[str, Mapping[str, float]]) -> Scores:
    """``clip.evaluate``'s rows as the sweep's scores: the normalized accuracy per task."""
    return _as_scores({task: row["normalized_accuracy"] for task, row in result.items()}, "clip")


@dataclass
class ClipTower:
    """What ``ClipEvaluator`` scores in memory: the session whose vision tower takes each point's
    weights, and the fine-tuned accuracies (computed before any point's weights went in)."""

    session: Any
    reference: Optional[Dict[str, float]]


def make_evaluator(spec: str, *, tasks: Sequence[str] = (), **options: Any) -> Evaluator:
    if spec.startswith("python:"):
        return PythonEvaluator(spec)
    if spec == "lm-eval":
        if not tasks:
            raise SweepError("--eval lm-eval needs --tasks (e.g. gsm8k,mbpp)")
        return LmEvalEvaluator(tasks, **options)
    if spec == "clip":
        return ClipEvaluator(tasks, **options)
    raise SweepError(f"--eval {spec!r}: use lm-eval, clip or python:MODULE:FUNCTION")


def load_reference(path: Optional[Path]) -> Optional[Scores]:
    """Reference scores from JSON: ``{name: score}`` or ``{"scores": {name: score}}``
    (``fedmerge eval --reference`` reads the same files)."""
    from fedmerge_plugins.evaluation.intervals import read_reference

    if path is None:
        return None
    try:
        return read_reference(path)
    except FedmergeError as error:  # unreadable, not JSON, or a score that cannot normalize
        raise SweepError(f"--reference-scores {error}") from None


def selection_score(scores: Scores, reference: Optional[Scores] = None) -> float:
    """Mean score, or mean normalized score (score / reference) over the reference's names."""
    if reference is None:
        return sum(scores.values()) / len(scores)
    missing = [name for name in reference if name not in scores]
    if missing:
        raise SweepError(f"the evaluator gave no score for {', '.join(missing)} (named in the reference scores)")
    return sum(scores[name] / reference[name] for name in reference) / len(reference)

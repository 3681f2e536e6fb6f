"""The paper's CLIP experiment (section 6, appendix B): every subset of the tasks (T ≥ 2),
every method, a grid search selected on validation and scored on test.

For each subset and method the search engine (``fedmerge_plugins.search.engine``) merges each
grid point in memory with mergekit's kernel (``merge_state_dicts``, what ``mergekit-yaml``
runs) from task models loaded once, and scores it on validation by the mean normalised
accuracy over the subset's tasks; FedGMA's ρ values that give the same merge are merged
once. The best point (ties: the earlier one in grid order) is merged again and scored on
test. Grids (``fedmerge_plugins.search.grids``): λ for every method; FedGMA also ρ; CCLIP also
ρ from the subset's task-vector norms. FedNova needs each task model's steps and learning
rate (``Training``).

A subset and method's search is one unit of work (``SubsetUnit``, run by ``search_subset``):
here, one after another (``DriverSearch``: the experiment's session, each point logged as it
is scored), or on Ray workers (``Experiment.run(WorkerSettings(workers=N))``, ``WorkerSearch``:
each worker gets the towers through Ray's object store once, loads a session of its own and
returns its records for this process to write).

Everything lands in ``<out>/results.jsonl``, one JSON object a line, appended and flushed
as it is computed: ``kind: point`` (one grid point's validation scores, the search
engine's record, ``group`` naming subset and method) and ``kind: result`` (a subset and
method's selection and test scores). A restart reads the file and skips what is there;
``<out>/run.json`` records the configuration, and a restart with a different one is refused.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from fedmerge_plugins.search import grids
from fedmerge_plugins.catalogue import SEARCH_METHODS
from fedmerge_plugins.clip.cache import KEY_LENGTH, source_identity
from fedmerge_plugins.clip.evaluate import Session, normalized
from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.files import write_output
from fedmerge_plugins.search.engine import (
    Evaluation,
    Point,
    ResultLog,
    mean,
    merge_in_memory,
    method_grid,
    point_parameters,
    run_search,
)
from fedmerge_plugins.search.workers import WorkerSettings, call, run_units
from fedmerge_plugins.store import digest

METHODS: Tuple[str, ...] = SEARCH_METHODS
Params = Dict[str, float]
Subset = Tuple[str, ...]


class ExperimentError(FedmergeError):
    """A CLIP experiment request or run folder that cannot be used."""


class Training(NamedTuple):
    """What FedNova needs of a task model: optimizer steps and (mean) learning rate."""

    steps: int
    learning_rate: float


def _number(value: Any) -> Optional[float]:
    """``value`` as a float (YAML reads ``1e-4`` as text), None if it is not a number."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def read_training(path: Path) -> Dict[str, Training]:
    """``task: {steps: N, learning_rate: x}`` per task, from a YAML or JSON file."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise ExperimentError(f"{path}: cannot read it ({error})") from None
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping `task: {{steps: N, learning_rate: x}}`")
    result = {}
    for task, entry in raw.items():
        if not isinstance(entry, dict) or "steps" not in entry:
            raise ExperimentError(f"{path}: task {task}: give `steps` (and `learning_rate`, default 1.0)")
        unknown = set(entry) - {"steps", "learning_rate"}
        if unknown:
            raise ExperimentError(f"{path}: task {task}: unknown keys {sorted(unknown)}")
        steps, rate = entry["steps"], _number(entry.get("learning_rate", 1.0))
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0 or rate is None or not 0 < rate < math.inf:
            raise ExperimentError(f"{path}: task {task}: steps must be an integer > 0 and learning_rate > 0")
        result[str(task)] = Training(steps, rate)
    return result


@dataclass
class ExperimentSpec:
    """What to run: tasks (in order), methods, grids, subset sizes."""

    tasks: Tuple[str, ...]
    methods: Tuple[str, ...] = METHODS
    lambdas: Tuple[float, ...] = tuple(grids.lambda_grid())
    fedgma_rhos: Tuple[float, ...] = tuple(grids.fedgma_rho_grid())
    cclip_count: int = grids.CCLIP_RHO_COUNT
    training: Optional[Dict[str, Training]] = None
    min_size: int = 2

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ExperimentError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if len(set(self.tasks)) != len(self.tasks) or len(self.tasks) < self.min_size:
            raise ExperimentError(f"need at least {self.min_size} distinct tasks; got {list(self.tasks)}")
        if "fednova" in self.methods:
            missing = [t for t in self.tasks if t not in (self.training or {})]
            if missing:
                raise ExperimentError(
                    f"fednova needs each task model's steps and learning rate; none for {missing}: "
                    "pass a training file (e.g. configs/clip/training-tanganke.yml) or leave fednova out"
                )
        if any(not 0 <= rho <= 1 for rho in self.fedgma_rhos):
            raise ExperimentError(f"FedGMA ρ must lie in [0, 1]; got {list(self.fedgma_rhos)}")

    def subsets(self) -> List[Subset]:
        return subsets(self.tasks, self.min_size)

    def points(self, method: str, subset: Subset, norms: Mapping[str, float]) -> List[Point]:
        """The grid points of ``method`` on ``subset``, in grid order (λ outermost)."""
        return method_grid(method, self.lambdas, self.fedgma_rhos, [norms[t] for t in subset], self.cclip_count)

    def grid(self, method: str, subset: Subset, norms: Mapping[str, float]) -> List[Params]:
        """The shared parameters tried for ``method`` on ``subset``, in grid order."""
        return [point.parameters for point in self.points(method, subset, norms)]

    def describe(self) -> Dict[str, Any]:
        data = asdict(self)
        data["training"] = {t: v._asdict() for t, v in (self.training or {}).items() if t in self.tasks}
        return data


def subsets(tasks: Sequence[str], min_size: int = 2) -> List[Subset]:
    """Every subset of at least ``min_size`` tasks, by size, then in task order
    (247 for eight tasks and min_size 2)."""
    return [c for size in range(min_size, len(tasks) + 1) for c in itertools.combinations(tasks, size)]


def group_name(subset: Sequence[str], method: str) -> str:
    """The search's ``group`` of a subset and method in the log: ``mnist+svhn/fedgma``."""
    return f"{'+'.join(subset)}/{method}"


@dataclass
class ClipPoint:
    """One grid point's unit of work: merge the subset's towers in memory, score on ``split``."""

    session: Session
    base: Mapping[str, torch.Tensor]
    models: Mapping[str, Mapping[str, torch.Tensor]]  # the subset's towers
    method: str
    per_model: Mapping[str, Any]  # norms and training of the subset's models
    reference: Mapping[str, float]  # fine-tuned accuracy per task on ``split``
    split: str = "validation"

    def __call__(self, point: Point) -> Evaluation:
        parameters = point_parameters(self.method, point.parameters, list(self.models), **self.per_model)
        accuracy = self.session.accuracy_of(merge_in_memory(self.base, self.models, self.method, parameters), list(self.models), self.split)
        return Evaluation(normalized(accuracy, self.reference, self.split), {"accuracy": accuracy})


@dataclass
class Experiment:
    session: Session
    spec: ExperimentSpec
    finetuned: Dict[str, str]
    out_dir: Path
    progress: bool = True
    norms: Dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [t for t in self.spec.tasks if t not in self.finetuned]
        if missing:
            raise ExperimentError(f"no fine-tuned model for tasks {missing}")
        self.out_dir = Path(self.out_dir)
        self.log = ResultLog(self.out_dir / "results.jsonl")
        self.models: Dict[str, Dict[str, torch.Tensor]] = {}
        self.reference: Dict[str, Dict[str, float]] = {}

    # --- set-up -------------------------------------------------------------------------
    def configuration(self) -> Dict[str, Any]:
        return {
            "base": self.session.base,
            "finetuned": {t: self.finetuned[t] for t in self.spec.tasks},
            "models_identity": digest([source_identity(self.finetuned[t]) for t in self.spec.tasks], length=KEY_LENGTH),
            "data_dir": str(Path(self.session.data_dir).resolve()),
            "splits": asdict(self.session.settings),
            "spec": self.spec.describe(),
        }

    def check_run_file(self) -> None:
        """Refuse an out folder made by a different run; take its recorded norms."""
        path = self.out_dir / "run.json"
        if not path.exists():
            return
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ExperimentError(f"{path}: cannot read it ({error}); use another --out directory") from None
        if not isinstance(recorded, dict):
            raise ExperimentError(f"{path}: not a run file; use another --out directory")
        configuration = json.loads(json.dumps(self.configuration()))
        differing = [k for k in configuration if recorded.get(k) != configuration[k]]
        if differing:
            raise ExperimentError(
                f"{self.out_dir} holds a run with a different {', '.join(differing)}; "
                "use another --out directory to start a new run"
            )
        self.norms = {t: float(v) for t, v in recorded.get("norms", {}).items()}

    def write_run_file(self) -> None:
        write_output(self.out_dir / "run.json", json.dumps({**self.configuration(), "norms": self.norms}, indent=1))

    def prepare(self) -> None:
        from tqdm.auto import tqdm

        from fedmerge_plugins.norms.streaming import state_dict_norms

        self.check_run_file()
        self.write_run_file()
        tasks = self.spec.tasks
        for task in tqdm(tasks, desc="load fine-tuned towers", unit="model", disable=not self.progress):
            self.models[task] = self.session.tower(self.finetuned[task], task)
        if set(self.norms) != set(tasks):
            self.norms = {t: float(n) for t, n in state_dict_norms(self.session.base_state, self.models).items()}
            self.write_run_file()
        for task in tqdm(tasks, desc="heads, images, fine-tuned accuracy", unit="task", disable=not self.progress):
            self.session.head(task)
            self.reference[task] = {
                split: self.session.finetuned_accuracy(task, self.finetuned[task], split, self.models[task])
                for split in ("validation", "test")
            }

    # --- the search ---------------------------------------------------------------------
    def run(self, workers: Optional[WorkerSettings] = None) -> List[Dict[str, Any]]:
        """Every subset × method not yet in the log, here (one after another) or on Ray
        workers (``workers``: each worker takes whole subset searches; the towers go through
        the object store once; this process writes every record)."""
        from tqdm.auto import tqdm

        workers = workers or WorkerSettings()
        workers.check()
        self.prepare()
        done_results = {(tuple(r["subset"]), r["method"]): r for r in self.log.records if r.get("kind") == "result"}
        work = [(s, m) for s in self.spec.subsets() for m in self.spec.methods]
        units = [
            SubsetUnit(subset, method, self.spec.points(method, subset, self.norms), list(self.log.points(group_name(subset, method)).values()))
            for subset, method in work if (subset, method) not in done_results
        ]
        inputs = SearchInputs(self.models, self.norms, self.spec.training, self.reference)
        search: Union[DriverSearch, WorkerSearch] = (
            WorkerSearch(inputs, self.session.arguments())
            if workers.distributed
            else DriverSearch(inputs, self.session, self.log, self.progress)
        )
        bar = tqdm(total=len(work), initial=len(work) - len(units), desc="subsets × methods", unit="run", disable=not self.progress)
        with bar:
            for unit, outcome, _ in run_units(call, search, units, workers):
                for record in outcome.points:
                    self.log.append(record)
                done_results[(unit.subset, unit.method)] = self.log.append(outcome.result)
                bar.set_postfix_str(f"{unit.method} on {'+'.join(unit.subset)}")
                bar.update()
        return [done_results[key] for key in work]


@dataclass
class SubsetUnit:
    """A method's search on a subset; ``done``: its point records already in the log."""

    subset: Subset
    method: str
    points: List[Point]
    done: List[Dict[str, Any]]


@dataclass
class SubsetOutcome:
    points: List[Dict[str, Any]]  # point records the driver still has to write
    result: Dict[str, Any]  # the ``kind: result`` record


@dataclass
class SearchInputs:
    """What every subset search reads: the fine-tuned towers (on the scoring session's
    device), their norms and training, and the fine-tuned accuracies."""

    models: Dict[str, Dict[str, torch.Tensor]]  # every task's fine-tuned tower
    norms: Dict[str, float]
    training: Optional[Dict[str, Training]]
    reference: Dict[str, Dict[str, float]]  # task -> split -> fine-tuned accuracy

    def on(self, device: str) -> "SearchInputs":
        """These inputs with the towers moved to ``device``."""
        return replace(self, models={t: {k: v.to(device) for k, v in m.items()} for t, m in self.models.items()})

    def scorer(self, session: Session, method: str, subset: Subset, split: str) -> ClipPoint:
        """The unit of work scoring one grid point of ``method`` on ``subset``."""
        reference = {t: self.reference[t][split] for t in subset}
        per_model = {"norms": self.norms, "training": self.training}
        return ClipPoint(session, session.base_state, {t: self.models[t] for t in subset}, method, per_model, reference, split)


def search_subset(unit: SubsetUnit, inputs: SearchInputs, session: Session, log: ResultLog, progress: bool) -> Dict[str, Any]:
    """The grid search of one method on one subset on validation (each point appended to
    ``log``), then the best point scored on test: the ``kind: result`` record."""
    subset, method = unit.subset, unit.method
    outcome = run_search(unit.points, inputs.scorer(session, method, subset, "validation"), log, method=method,
                         task_count=len(subset), group=group_name(subset, method), progress=progress, desc=method)
    test = inputs.scorer(session, method, subset, "test")(outcome.best_point)
    return {
        "kind": "result", "subset": list(subset), "method": method, "params": outcome.best_point.parameters,
        "grid_size": len(unit.points), "val_score": outcome.best["selection"],
        "test_accuracy": test.details["accuracy"], "test_normalized": test.scores, "score": mean(test.scores),
    }


@dataclass
class DriverSearch:
    """Subset searches in this process: the experiment's session (its towers already on the
    session's device) and its log, each point written as soon as it is scored."""

    inputs: SearchInputs
    session: Session
    log: ResultLog
    progress: bool = True

    def __call__(self, unit: SubsetUnit) -> SubsetOutcome:
        return SubsetOutcome([], search_subset(unit, self.inputs, self.session, self.log, self.progress))


@dataclass
class WorkerSearch:
    """Subset searches on a Ray worker, which gets this object (the towers through the object
    store) once: it loads a session of its own from ``session_arguments`` (heads and images
    come from the cache the driver filled) and returns the point records for the driver to
    write."""

    inputs: SearchInputs
    session_arguments: Dict[str, Any]

    @functools.cached_property
    def loaded(self) -> Tuple[Session, SearchInputs]:
        """This worker's session and the inputs on its device, made on the first unit."""
        session = Session(**self.session_arguments, progress=False)
        return session, self.inputs.on(session.device)

    def __call__(self, unit: SubsetUnit) -> SubsetOutcome:
        session, inputs = self.loaded
        log = ResultLog(None)  # in memory: the points already done, then this unit's
        log.records.extend(unit.done)
        written = len(log.records)
        result = search_subset(unit, inputs, session, log, progress=False)
        return SubsetOutcome(log.records[written:], result)

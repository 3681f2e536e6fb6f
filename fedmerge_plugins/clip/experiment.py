"""The paper's CLIP experiment (section 6, appendix B): every subset of the tasks (T ≥ 2),
every method, a grid search selected on validation and scored on test.

For each subset and method, each grid point is merged in memory with mergekit's Python
API (``merge_state_dicts``, the same kernels ``mergekit-yaml`` runs) from task models
loaded once, and scored on validation by the mean normalised accuracy over the subset's
tasks; the best point (ties: the earlier one in grid order) is merged again and scored on
test. Grids (``fedmerge_plugins.grids``): λ for every method; FedGMA also ρ; CCLIP also
ρ from the subset's task-vector norms. FedNova needs each task model's steps and learning
rate (``Training``).

Everything lands in ``<out>/results.jsonl``, one JSON object a line, appended and flushed
as it is computed: ``kind: grid`` (one grid point's validation scores) and ``kind:
result`` (a subset and method's selection and test scores). A restart reads the file and
skips what is there; ``<out>/run.json`` records the configuration, and a restart with a
different one is refused.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from fedmerge_plugins import grids
from fedmerge_plugins.clip.cache import digest, source_identity
from fedmerge_plugins.clip.evaluate import Session, normalized

METHODS: Tuple[str, ...] = ("task_arithmetic", "fednova", "fedgma", "median", "cclip")
BASELINE = "task_arithmetic"
Params = Dict[str, float]
Subset = Tuple[str, ...]


@dataclass(frozen=True)
class Training:
    """What FedNova needs of a task model: optimizer steps and (mean) learning rate."""

    steps: int
    learning_rate: float


def read_training(path: Path) -> Dict[str, Training]:
    """``task: {steps: N, learning_rate: x}`` per task, from a YAML or JSON file."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping `task: {{steps: N, learning_rate: x}}`")
    result = {}
    for task, entry in raw.items():
        if not isinstance(entry, dict) or "steps" not in entry:
            raise ValueError(f"{path}: task {task}: give `steps` (and `learning_rate`, default 1.0)")
        unknown = set(entry) - {"steps", "learning_rate"}
        if unknown:
            raise ValueError(f"{path}: task {task}: unknown keys {sorted(unknown)}")
        steps, rate = entry["steps"], float(entry.get("learning_rate", 1.0))
        if not isinstance(steps, int) or steps <= 0 or not rate > 0:
            raise ValueError(f"{path}: task {task}: steps must be an integer > 0 and learning_rate > 0")
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
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if len(set(self.tasks)) != len(self.tasks) or len(self.tasks) < self.min_size:
            raise ValueError(f"need at least {self.min_size} distinct tasks; got {list(self.tasks)}")
        if "fednova" in self.methods:
            missing = [t for t in self.tasks if t not in (self.training or {})]
            if missing:
                raise ValueError(
                    f"fednova needs each task model's steps and learning rate; none for {missing}: "
                    "pass a training file (e.g. configs/clip/training-tanganke.yml) or leave fednova out"
                )
        if any(not 0 <= rho <= 1 for rho in self.fedgma_rhos):
            raise ValueError(f"FedGMA ρ must lie in [0, 1]; got {list(self.fedgma_rhos)}")

    def subsets(self) -> List[Subset]:
        return subsets(self.tasks, self.min_size)

    def grid(self, method: str, subset: Subset, norms: Mapping[str, float]) -> List[Params]:
        """The shared parameters tried for ``method`` on ``subset``, in grid order."""
        if method == "fedgma":
            return [{"lambda": lam, "rho": rho} for lam in self.lambdas for rho in self.fedgma_rhos]
        if method == "cclip":
            rhos = grids.clip_rho_grid([norms[t] for t in subset], self.cclip_count)
            return [{"lambda": lam, "rho": rho} for lam in self.lambdas for rho in rhos]
        return [{"lambda": lam} for lam in self.lambdas]

    def describe(self) -> Dict[str, Any]:
        data = asdict(self)
        data["training"] = {t: asdict(v) for t, v in (self.training or {}).items() if t in self.tasks}
        return data


def subsets(tasks: Sequence[str], min_size: int = 2) -> List[Subset]:
    """Every subset of at least ``min_size`` tasks, by size, then in task order
    (247 for eight tasks and min_size 2)."""
    return [c for size in range(min_size, len(tasks) + 1) for c in itertools.combinations(tasks, size)]


def merge_method(name: str):
    from mergekit import merge_methods

    from fedmerge_plugins.methods import METHODS as FEDMERGE_METHODS

    own = {method.spec.name: method for method in FEDMERGE_METHODS}
    return own.get(name) or merge_methods.get(name)


def merge_parameters(
    method: str, point: Params, subset: Subset, norms: Mapping[str, float], training: Optional[Mapping[str, Training]]
) -> Dict[str, Any]:
    """The mergekit parameters of one grid point (shared values plus per-model ones)."""
    parameters: Dict[str, Any] = dict(point)
    if method == "task_arithmetic":
        parameters["weight"] = {t: 1.0 for t in subset}
    elif method == "cclip":
        parameters["norm"] = {t: float(norms[t]) for t in subset}
    elif method == "fednova":
        assert training is not None
        parameters["steps"] = {t: training[t].steps for t in subset}
        parameters["learning_rate"] = {t: training[t].learning_rate for t in subset}
    return parameters


def merge_in_memory(
    base: Mapping[str, torch.Tensor],
    models: Mapping[str, Mapping[str, torch.Tensor]],
    method: str,
    parameters: Mapping[str, Any],
) -> Dict[str, torch.Tensor]:
    """θ merged from ``base`` and ``models`` (ids = task names) by mergekit's kernel."""
    from mergekit.merge_methods.api import merge_state_dicts

    if "base" in models:
        raise ValueError("a task may not be called `base`")
    with torch.no_grad():
        return merge_state_dicts({"base": base, **models}, merge_method(method), base="base", parameters=parameters)


class ResultLog:
    """Append-only JSONL of records; a line cut short by a kill is dropped on open."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: List[Dict[str, Any]] = []
        if path.exists():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                data = data[: data.rfind(b"\n") + 1]
                with open(path, "r+b") as handle:
                    handle.truncate(len(data))
            for number, line in enumerate(data.decode().splitlines(), 1):
                if line.strip():
                    try:
                        self.records.append(json.loads(line))
                    except ValueError:
                        raise ValueError(f"{path}, line {number}: not a JSON record; the file is damaged") from None

    def append(self, record: Dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records.append(record)


def point_key(subset: Iterable[str], method: str, params: Mapping[str, float]) -> Tuple:
    return tuple(subset), method, tuple(sorted(params.items()))


def select_best(points: Sequence[Params], scores: Sequence[float]) -> int:
    """Index of the highest score; ties go to the earliest point."""
    best = 0
    for index, score in enumerate(scores):
        if score > scores[best]:
            best = index
    return best


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
            raise ValueError(f"no fine-tuned model for tasks {missing}")
        self.out_dir = Path(self.out_dir)
        self.log = ResultLog(self.out_dir / "results.jsonl")
        self.models: Dict[str, Dict[str, torch.Tensor]] = {}
        self.reference: Dict[str, Dict[str, float]] = {}

    # --- set-up -------------------------------------------------------------------------
    def configuration(self) -> Dict[str, Any]:
        return {
            "base": self.session.base,
            "finetuned": {t: self.finetuned[t] for t in self.spec.tasks},
            "models_identity": digest([source_identity(self.finetuned[t]) for t in self.spec.tasks]),
            "data_dir": str(Path(self.session.data_dir).resolve()),
            "splits": asdict(self.session.settings),
            "spec": self.spec.describe(),
        }

    def check_run_file(self) -> None:
        """Refuse an out folder made by a different run; take its recorded norms."""
        path = self.out_dir / "run.json"
        if not path.exists():
            return
        recorded = json.loads(path.read_text())
        configuration = json.loads(json.dumps(self.configuration()))
        differing = [k for k in configuration if recorded.get(k) != configuration[k]]
        if differing:
            raise ValueError(
                f"{self.out_dir} holds a run with a different {', '.join(differing)}; "
                "use another --out directory to start a new run"
            )
        self.norms = {t: float(v) for t, v in recorded.get("norms", {}).items()}

    def write_run_file(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "run.json").write_text(json.dumps({**self.configuration(), "norms": self.norms}, indent=1))

    def prepare(self) -> None:
        from tqdm.auto import tqdm

        from fedmerge_plugins.norms import state_dict_norms

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
    def merge(self, method: str, point: Params, subset: Subset) -> Dict[str, torch.Tensor]:
        parameters = merge_parameters(method, point, subset, self.norms, self.spec.training)
        return merge_in_memory(self.session.base_state, {t: self.models[t] for t in subset}, method, parameters)

    def score(self, method: str, point: Params, subset: Subset, split: str) -> Dict[str, Any]:
        accuracy = self.session.accuracy_of(self.merge(method, point, subset), subset, split)
        reference = {t: self.reference[t][split] for t in subset}
        norm = normalized(accuracy, reference, split)
        return {"accuracy": accuracy, "normalized": norm, "score": sum(norm.values()) / len(norm)}

    def run(self) -> List[Dict[str, Any]]:
        from tqdm.auto import tqdm

        self.prepare()
        done_points = {
            point_key(r["subset"], r["method"], r["params"]): r for r in self.log.records if r.get("kind") == "grid"
        }
        done_results = {(tuple(r["subset"]), r["method"]): r for r in self.log.records if r.get("kind") == "result"}
        results = []
        work = [(s, m) for s in self.spec.subsets() for m in self.spec.methods]
        bar = tqdm(work, desc="subsets × methods", unit="run", disable=not self.progress)
        for subset, method in bar:
            bar.set_postfix_str(f"{method} on {'+'.join(subset)}")
            if (subset, method) in done_results:
                results.append(done_results[(subset, method)])
                continue
            points = self.spec.grid(method, subset, self.norms)
            scores = []
            for point in tqdm(points, desc=method, unit="point", leave=False, disable=not self.progress):
                key = point_key(subset, method, point)
                if key not in done_points:
                    record = {"kind": "grid", "subset": list(subset), "method": method, "params": point}
                    record.update(self.score(method, point, subset, "validation"))
                    self.log.append(record)
                    done_points[key] = record
                scores.append(done_points[key]["score"])
            best = select_best(points, scores)
            test = self.score(method, points[best], subset, "test")
            record = {
                "kind": "result", "subset": list(subset), "method": method, "params": points[best],
                "grid_size": len(points), "val_score": scores[best],
                "test_accuracy": test["accuracy"], "test_normalized": test["normalized"], "score": test["score"],
            }
            self.log.append(record)
            results.append(record)
        return results

"""The search engine behind ``fedmerge sweep``, ``fedmerge clip experiment`` and the demo.

The paper's protocol everywhere: a grid of λ (and ρ), a merge per point, a score on
validation data, the best point kept (ties go to the earlier point in grid order).

- ``expand`` / ``method_grid``: the grid, λ outermost. FedGMA's agreement A takes only the
  values k/T, so ρ acts only through the smallest k with k/T ≥ ρ
  (``methods.fedgma.full_agreement_count``): ``merge_groups`` puts the grid points that
  give the same merge together, the search merges and scores each group once, and every
  original point is still recorded (``merged_as`` names the point that was merged).
- ``point_parameters`` / ``merge_in_memory``: a point's mergekit parameters (shared values
  plus what each model needs: FedNova's steps and rates, CCLIP's norms) and its merge in
  memory through mergekit's own kernel (``merge_state_dicts``).
- ``ResultLog``: the resumable JSONL log, one record a line, flushed and fsynced as it is
  written; a torn last line (a kill mid-write) is dropped.
- ``run_search``: the driver. A grid point is an independent unit of work,
  ``evaluate(point) -> Evaluation``, run by ``workers.run_units`` (here, one after another,
  by default; or on Ray workers); only the driver writes the log and picks the winner.
- ``winner_recipe``: the recipe with the winning point's values.

A point record: ``{"kind": "point", "key", "index", "method", "parameters", "scores",
"selection", "seconds"}``, plus ``group`` (which search of a run, e.g. a CLIP subset and
method), ``merged_as`` (the key of the point whose merge it shares), ``details`` (what the
evaluator reported beside the scores) and ``fingerprint`` (what produced the log) where
they apply. Logs of ``fedmerge sweep`` written before ``kind`` existed read unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins.errors import FedmergeError, PathError
from fedmerge_plugins.errors import reason
from fedmerge_plugins.files import user_path

if TYPE_CHECKING:
    from fedmerge_plugins.search.workers import WorkerSettings

Scores = Dict[str, float]
SWEPT = ("lambda", "rho")  # the searched parameters, outermost first


class SearchError(FedmergeError):
    """A search that cannot go on: a damaged or foreign log, nothing scored."""


@dataclass(frozen=True)
class Point:
    index: int
    parameters: Dict[str, float]

    @property
    def key(self) -> str:
        """Identity of the point in the log (exact float repr, sorted keys)."""
        return json.dumps(self.parameters, sort_keys=True)

    def label(self) -> str:
        return ", ".join(f"{name}={value:.6g}" for name, value in self.parameters.items())


@dataclass
class Evaluation:
    """What scoring one point gives: the scores selection uses, and optional details."""

    scores: Scores
    details: Dict[str, Any] = field(default_factory=dict)


def expand(axes: Mapping[str, Optional[Sequence[float]]]) -> List[Point]:
    """The product of the given axes, the first outermost: λ, ρ, then any other in the
    order given (``fedmerge sweep --param``)."""
    points: List[Dict[str, float]] = [{}]
    for name in [*(n for n in SWEPT if n in axes), *(n for n in axes if n not in SWEPT)]:
        values = axes.get(name)
        if values:
            points = [{**p, name: float(v)} for p in points for v in values]
    return [Point(i, p) for i, p in enumerate(points)]


def method_grid(
    method: str,
    lambdas: Sequence[float],
    fedgma_rhos: Sequence[float] = (),
    norms: Sequence[float] = (),
    cclip_count: Optional[int] = None,
) -> List[Point]:
    """The paper's grid of ``method``: λ, times FedGMA's ρ grid or CCLIP's ρ from ``norms``
    (the merged models' task-vector norms, ``grids.clip_rho_grid``)."""
    from fedmerge_plugins.search import grids

    rhos: Optional[Sequence[float]] = None
    if method == "fedgma":
        rhos = fedgma_rhos
    elif method == "cclip":
        rhos = grids.clip_rho_grid(list(norms), cclip_count or grids.CCLIP_RHO_COUNT)
    return expand({"lambda": lambdas, "rho": rhos})


def merge_groups(method: str, points: Sequence[Point], task_count: int) -> List[List[Point]]:
    """Points that give the same merge, each group in grid order, groups by their first point.

    Only FedGMA has such points: its ρ matters through ``full_agreement_count(ρ, T)`` alone.
    """
    from fedmerge_plugins.methods.fedgma import full_agreement_count

    groups: Dict[str, List[Point]] = {}
    for point in points:
        merged = dict(point.parameters)
        if method == "fedgma" and "rho" in merged:
            merged["rho"] = full_agreement_count(merged["rho"], task_count)
        groups.setdefault(json.dumps(merged, sort_keys=True), []).append(point)
    return list(groups.values())


def point_parameters(
    method: str,
    values: Mapping[str, float],
    models: Sequence[str],
    *,
    norms: Optional[Mapping[str, float]] = None,
    training: Optional[Mapping[str, Tuple[int, float]]] = None,
) -> Dict[str, Any]:
    """mergekit parameters of a point: the shared ``values`` plus per-model ones, keyed by
    model id (task arithmetic: weight 1; FedNova: steps and learning rate from
    ``training``; CCLIP: each model's global norm from ``norms``)."""
    parameters: Dict[str, Any] = dict(values)
    if method == "task_arithmetic":
        parameters["weight"] = {m: 1.0 for m in models}
    elif method == "cclip" and norms is not None:
        parameters["norm"] = {m: float(norms[m]) for m in models}
    elif method == "fednova":
        if training is None:
            raise SearchError("fednova needs each task model's steps and learning rate")
        parameters["steps"] = {m: int(training[m][0]) for m in models}
        parameters["learning_rate"] = {m: float(training[m][1]) for m in models}
    return parameters


def merge_in_memory(base: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]], method: str, parameters: Mapping[str, Any]) -> Dict[str, Any]:
    """θ merged from the state dicts ``base`` and ``models`` (ids = their keys) by the
    mergekit method ``method``, the kernel ``mergekit-yaml`` runs."""
    import torch
    from mergekit.merge_methods.api import merge_state_dicts

    if "base" in models:
        raise SearchError("a task model may not be called `base`")
    with torch.no_grad():
        return merge_state_dicts({"base": base, **models}, method, base="base", parameters=dict(parameters))


def mean(scores: Mapping[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def best_index(selections: Sequence[float]) -> int:
    """Index of the highest selection score; ties go to the earliest."""
    best = 0
    for index, value in enumerate(selections):
        if value > selections[best] or (math.isnan(selections[best]) and not math.isnan(value)):
            best = index  # a NaN never wins
    return best


class ResultLog:
    """Append-only JSONL records; a torn last line is dropped on open. With a
    ``fingerprint``, every record must carry it (a log of another run is refused); with
    ``kinds``, every record must be of one of them. ``path=None`` keeps the records in
    memory only.

    The file is read strictly: a line that is not a JSON object, a point record of the wrong
    shape (no string ``key``, a ``selection`` that is not a finite number, scores that are
    not numbers) and the same point recorded twice with different scores are refused,
    named by file and line; nothing is guessed."""

    def __init__(self, path: Optional[Path], fingerprint: Optional[str] = None, *, hint: str = "use another output directory or delete the file",
                 kinds: Optional[Sequence[str]] = None) -> None:
        self.path = None if path is None else Path(path)
        self.fingerprint = fingerprint
        self.kinds = tuple(kinds) if kinds is not None else None
        self.records: List[Dict[str, Any]] = []
        if self.path is not None:
            with user_path(self.path, "read"):
                exists = self.path.exists()
            if exists:
                self._load(hint)

    def _load(self, hint: str) -> None:
        assert self.path is not None
        with user_path(self.path, "read"):
            data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a write cut short by a kill
            data = data[: data.rfind(b"\n") + 1]
            with user_path(self.path, "drop the torn last line of"):
                with open(self.path, "r+b") as handle:
                    handle.truncate(len(data))
        seen: Dict[Tuple[Optional[str], str], Tuple[int, Dict[str, Any]]] = {}
        for number, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            where = f"{self.path}, line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise SearchError(f"{where}: not UTF-8 text; the file is damaged: fix or remove it") from None
            except ValueError:
                raise SearchError(f"{where}: not a JSON record; the file is damaged: fix or remove it") from None
            if not isinstance(record, dict):
                raise SearchError(f"{where}: a JSON {type(record).__name__}, not a record (an object); fix or remove the line")
            kind = record.get("kind", "point")
            if self.kinds is not None and kind not in self.kinds:
                raise SearchError(f"{where}: a record of kind {kind!r}, not a {'/'.join(self.kinds)} record of this log; {hint}")
            if self.fingerprint is not None and record.get("fingerprint") != self.fingerprint:
                raise SearchError(f"{self.path} holds results of another recipe or evaluator (line {number}); {hint}")
            if kind == "point":
                problem = point_problem(record)
                if problem:
                    raise SearchError(f"{where}: {problem}; fix or remove the line")
                identity = (record.get("group"), record["key"])
                if identity in seen:
                    first, earlier = seen[identity]
                    if (earlier["scores"], earlier["selection"]) != (record["scores"], record["selection"]):
                        raise SearchError(f"{where}: point {record['key']} is already scored differently on line {first}; "
                                          "remove one of the lines")
                    continue  # the same result twice: keep one
                seen[identity] = (number, record)
            self.records.append(record)

    def append(self, record: Dict[str, Any]) -> Dict[str, Any]:
        """Add ``record``, on disk flushed and fsynced. A write that fails (a full or
        read-only disk) leaves the file as it was and raises a ``PathError`` naming it."""
        if self.fingerprint is not None:
            record = {**record, "fingerprint": self.fingerprint}
        if self.path is not None:
            line = (json.dumps(record) + "\n").encode("utf-8")
            size = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "ab") as handle:
                    size = handle.tell()
                    handle.write(line)
                    handle.flush()
                    os.fsync(handle.fileno())
            except OSError as error:
                if size is not None:
                    with contextlib.suppress(OSError):
                        os.truncate(self.path, size)  # no torn line left behind
                kept = sum(1 for r in self.records if r.get("kind", "point") == "point")
                raise PathError(f"cannot write {self.path}: {reason(error)} ({kept} result(s) recorded before are kept)") from error
        self.records.append(record)
        return record

    def points(self, group: Optional[str] = None) -> Dict[str, Dict[str, Any]]:
        """Point records of ``group`` (None: records without a group), by key."""
        return {
            r["key"]: r for r in self.records if r.get("kind", "point") == "point" and r.get("group") == group
        }


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def point_problem(record: Mapping[str, Any]) -> Optional[str]:
    """What is wrong with the shape of a point record, or None."""
    key, parameters, scores, selection = (record.get(name) for name in ("key", "parameters", "scores", "selection"))
    if not isinstance(key, str):
        return "a point record without a string `key`"
    if not isinstance(parameters, dict) or not all(_number(v) for v in parameters.values()):
        return f"point {key}: `parameters` is not a mapping of numbers"
    if json.dumps(parameters, sort_keys=True) != key:
        return f"point {key}: its `key` does not match its `parameters` {json.dumps(parameters, sort_keys=True)}"
    if not isinstance(scores, dict) or not all(_number(v) for v in scores.values()):
        return f"point {key}: `scores` is not a mapping of numbers"
    if not _number(selection) or not math.isfinite(selection):
        return f"point {key}: `selection` is {json.dumps(selection)}, not a finite number"
    return None


Evaluate = Callable[[Point], Evaluation]


@dataclass
class SearchOutcome:
    points: List[Point]
    records: Dict[str, Dict[str, Any]]  # by point key, every point of the grid
    best: Dict[str, Any]  # the winning record
    merges: int  # points merged and scored by this call

    @property
    def best_point(self) -> Point:
        return next(p for p in self.points if p.key == self.best["key"])


def run_search(
    points: Sequence[Point],
    evaluate: Evaluate,
    log: ResultLog,
    *,
    method: str,
    task_count: int,
    group: Optional[str] = None,
    selection: Callable[[Scores], float] = mean,
    workers: Optional["WorkerSettings"] = None,
    on_record: Optional[Callable[[Point, Dict[str, Any]], None]] = None,
    progress: bool = True,
    desc: str = "grid points",
    order: Optional[Callable[[Point], Any]] = None,
) -> SearchOutcome:
    """Score every point of ``points`` not yet in ``log`` (one merge per group of
    ``merge_groups``), record each, and return the records and the winner.

    ``workers``: where the points are scored (``workers.WorkerSettings``; default here,
    one after another). On Ray workers ``evaluate`` must be picklable; it is shipped once,
    its tensors through the object store, and the records are written here as results come.
    ``order``: a sort key for the points to score (default: grid order), e.g. the sweep's
    groups of points that share one D; records, their ``index`` and the winner (ties to the
    earlier point in grid order) do not depend on it, only the order of the log's lines."""
    from tqdm.auto import tqdm

    from fedmerge_plugins.search.workers import WorkerSettings, call, run_units

    done = log.points(group)
    pending: List[Point] = []
    members: Dict[str, List[Point]] = {}
    for same in merge_groups(method, points, task_count):
        missing = [p for p in same if p.key not in done]
        known = next((done[p.key] for p in same if p.key in done), None)
        if known is not None:  # scored before: record the rest of its group from it
            for point in missing:
                done[point.key] = _record(log, point, method, group, known["scores"], known.get("details"), known["selection"], 0.0, known["key"])
        elif missing:
            pending.append(same[0])
            members[same[0].key] = same
    if order is not None:
        pending.sort(key=order)
    scored = run_units(call, evaluate, pending, workers or WorkerSettings())  # ``evaluate`` is shipped once
    for point, evaluation, seconds in tqdm(scored, total=len(pending), desc=desc, unit="merge", disable=not progress, leave=False):
        value = selection(evaluation.scores)
        for member in members[point.key]:
            merged_as = None if member is point else point.key
            done[member.key] = _record(log, member, method, group, evaluation.scores, evaluation.details, value, seconds, merged_as)
            if on_record is not None:
                on_record(member, done[member.key])
    records = {p.key: done[p.key] for p in points if p.key in done}
    if not records:
        raise SearchError("no grid point has been scored")
    ordered = [p for p in points if p.key in records]
    best = records[ordered[best_index([records[p.key]["selection"] for p in ordered])].key]
    return SearchOutcome(list(points), records, best, len(pending))


def _record(log: ResultLog, point: Point, method: str, group: Optional[str], scores: Scores, details: Optional[Dict[str, Any]],
            selection: float, seconds: float, merged_as: Optional[str]) -> Dict[str, Any]:
    record: Dict[str, Any] = {"kind": "point", "key": point.key, "index": point.index, "method": method,
                              "parameters": point.parameters, "scores": scores, "selection": selection, "seconds": round(seconds, 3)}
    if group is not None:
        record["group"] = group
    if merged_as is not None:
        record["merged_as"] = merged_as
    if details:
        record["details"] = details
    return log.append(record)


PER_MODEL = "@"  # NAME@MODEL: the parameter NAME of the recipe's model MODEL


def winner_recipe(data: Mapping[str, Any], point: Point) -> Dict[str, Any]:
    """A deep copy of the recipe with the point's values in its top-level parameters, a
    ``NAME@MODEL`` value in the parameters of the ``models:`` entry whose ``model`` is MODEL."""
    recipe = copy.deepcopy(dict(data))
    shared = {k: v for k, v in point.parameters.items() if PER_MODEL not in k}
    recipe["parameters"] = {**(recipe.get("parameters") or {}), **shared}
    for key, value in point.parameters.items():
        if PER_MODEL in key:
            name, _, model = key.partition(PER_MODEL)
            for entry in recipe.get("models") or []:
                if str(entry.get("model")) == model:
                    entry["parameters"] = {**(entry.get("parameters") or {}), name: value}
    return recipe


def recipe_yaml(recipe: Mapping[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(dict(recipe), sort_keys=False)

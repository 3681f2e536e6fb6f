"""The sweep: a recipe's grid, searched by ``fedmerge_plugins.search.engine``, each point
merged (``point.SweepPoint``: into a model loaded once, or by ``run_merge`` into a folder)
and scored by an evaluator; the winning recipe.

``plan.plan_sweep`` checks everything that can be wrong with the request (grid values,
recipe, evaluator options) and ``open_log`` checks ``--out`` against its results file, all
before a checkpoint is opened or an output written; then every grid point's recipe is
checked, tensor shapes included.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from fedmerge_plugins.files import write_output
from fedmerge_plugins.search.engine import Point, ResultLog, SearchOutcome, recipe_yaml, run_search, winner_recipe
from fedmerge_plugins.search.workers import WorkerSettings
from fedmerge_plugins.sweep.errors import SweepError
from fedmerge_plugins.sweep.evaluators import Evaluator, selection_score, takes_model
from fedmerge_plugins.sweep.grid import point_config
from fedmerge_plugins.sweep.plan import SweepPlan, choose_mode, plan_sweep
from fedmerge_plugins.sweep.point import SweepPoint
from fedmerge_plugins.sweep.results import fingerprint, results_table

RESULTS = "results.jsonl"
WINNER = "winner.yml"
PICTURE = "sweep.png"
MODES = ("auto", "memory", "disk")
Echo = Callable[[str], None]


@dataclass
class SweepOutcome:
    points: List[Point]
    records: Dict[str, dict]  # by point key
    best: dict  # the winning record
    winner_recipe: Path
    mode: str  # "memory" or "disk"
    norms: Optional[List[float]]  # CCLIP's task-vector norms, when the method is cclip
    merges: int = 0  # merges this run made (FedGMA's equivalent ρ share one)


@dataclass
class SweepOptions:
    """How the points are merged and scored (everything but the recipe, grid and evaluator)."""

    reference: Optional[Dict[str, float]] = None
    mode: str = "auto"
    max_memory: Optional[int] = None
    device: str = "cpu"
    keep_merges: bool = False
    workers: Optional[WorkerSettings] = None
    max_points: Optional[int] = None  # None: grids.MAX_POINTS


def open_log(out: Path, plan: SweepPlan, evaluator: Evaluator, reference: Optional[Dict[str, float]]) -> ResultLog:
    """``out/results.jsonl``, refused if another recipe or evaluator wrote it."""
    return ResultLog(Path(out) / RESULTS, fingerprint(plan.data, plan.swept, evaluator.description, reference),
                     hint="use another --out directory or delete the file", kinds=("point",))


def run_sweep(recipe: Path, out: Path, evaluator: Evaluator, *, lambdas: Optional[str] = None, rhos: Optional[str] = None,
              params: Sequence[str] = (), echo: Echo = print, **options: Any) -> SweepOutcome:
    """Merge and score every grid point of ``recipe`` (resuming ``out/results.jsonl``), then
    write ``out/winner.yml`` and ``out/sweep.png``. ``lambdas``/``rhos``: grid option text
    (``rhos="paper"`` for the paper's grid of cclip or fedgma); ``params``: ``NAME=GRID`` or
    ``NAME@MODEL=GRID`` for any other numeric parameter, shared or of one model. ``options``: ``SweepOptions``'
    fields; ``workers``: score the points on Ray workers (``WorkerSettings(workers=N)`` or
    ``ray_address=...``); the inputs are read and CCLIP's norms computed here, once, and only
    this process writes the log."""
    settings = SweepOptions(**options)
    if settings.mode not in MODES:
        raise SweepError(f"--mode {settings.mode!r}: use one of {', '.join(MODES)}")
    workers = settings.workers or WorkerSettings()
    workers.check()
    plan = plan_sweep(recipe, lambdas, rhos, params, settings.max_points)
    log = open_log(out, plan, evaluator, settings.reference)
    for point in plan.points():
        point_config(plan.data, point)  # each point checked, shapes included
    with _Sweep(plan, Path(out), evaluator, settings, workers, echo) as sweep:
        outcome = sweep.search(log)
    return finish(outcome, plan, Path(out), sweep.mode, sweep.norms, echo)


class _Sweep:
    """One run's state: the models, the memory decision, the inputs held, CCLIP's norms."""

    def __init__(self, plan: SweepPlan, out: Path, evaluator: Evaluator, settings: SweepOptions, workers: WorkerSettings, echo: Echo) -> None:
        from fedmerge_plugins.guards.recipe import recipe_models
        from fedmerge_plugins.norms.streaming import model_index
        from fedmerge_plugins.sweep.memory import plan_memory
        from fedmerge_plugins.sweep.merger import merge_options

        self.plan, self.out, self.evaluator, self.settings, self.workers, self.echo = plan, out, evaluator, settings, workers, echo
        self.base, self.tasks = recipe_models(plan.config)
        factored = takes_model(evaluator) and not settings.keep_merges
        models = [self.base, *self.tasks]
        self.memory = plan_memory([model_index(m) for m in models], model_index(self.base), settings.max_memory, factored=factored)
        self.mode = choose_mode(settings.mode, self.memory, echo)
        self.options = merge_options(self.base, settings.device)
        self.loaders: Dict[Any, Any] = {}
        self.norms: Optional[List[float]] = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Sweep":
        self._stack.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.__exit__(*exc)

    def hold_inputs(self) -> None:
        from fedmerge_plugins.sweep.merger import inputs_in_memory

        if self.mode == "memory" and not self.loaders:
            self.loaders.update(self._stack.enter_context(inputs_in_memory([self.base, *self.tasks], self.options)))

    def clip_norms(self) -> Dict[str, float]:
        """CCLIP's global norms by norm-cache key (computed once, into the cache where its kernel looks)."""
        from fedmerge_plugins.norms.cache import cached_norms
        from fedmerge_plugins.norms.streaming import model_index
        from fedmerge_plugins.sweep.merger import disk_norms, memory_norms

        indices = (model_index(self.base), [model_index(task) for task in self.tasks])
        found = cached_norms(*indices)
        if found is None and self.mode == "memory":
            self.hold_inputs()
            memory_norms(self.base, self.tasks, self.loaders)
        elif found is None:
            disk_norms(self.base, self.tasks, self.settings.device)
        found = found or cached_norms(*indices)
        if found is None:
            raise SweepError("CCLIP's task-vector norms were computed but the norm cache does not hold them")
        return found

    def scratch_root(self) -> Optional[Path]:
        """Where point folders are staged (a cluster's workers stage on their own machines' OUT/merges)."""
        from fedmerge_plugins.sweep import scratch

        root = None
        if self.workers.ray_address is None:
            held = self.memory.needed if self.mode == "memory" else self.memory.disk_needed
            root = scratch.choose_scratch(self.out, self.memory.merged, max(1, self.workers.workers), held, self.echo,
                                          available=self.memory.available)
        for folder in {self.out / "merges", root or self.out / "merges"}:
            scratch.remove_abandoned(folder)
        return root

    def _release(self, unit: SweepPoint) -> None:
        """The last group's factors: this process's, and on disk every worker's folder of this sweep."""
        from fedmerge_plugins.sweep import scratch

        unit.release()
        if unit.factors_on_disk:
            scratch.remove_factors(Path(unit.out) / "merges", unit.sweep_id)

    def search(self, log: ResultLog) -> SearchOutcome:
        from fedmerge_plugins.sweep.factored import delta_key

        scratch_root = self.scratch_root()
        keyed = self.clip_norms() if self.plan.method == "cclip" else {}
        self.norms = list(keyed.values()) if keyed else None
        points = self.plan.points(self.norms)
        if self.plan.paper_clip:
            for point in points:
                point_config(self.plan.data, point)
        done = sum(point.key in log.points() for point in points)
        self.echo(f"fedmerge sweep: {self.plan.method}, {len(points)} grid points, {done} already in {log.path}, "
                  f"scored {self.workers.describe()}")
        if done < len(points):
            self.hold_inputs()
        unit = SweepPoint(self.plan.data, self.out.resolve(), self.options, self.evaluator, self.settings.keep_merges,
                          dict(self.loaders), keyed, scratch=scratch_root.resolve() if scratch_root is not None else None,
                          factors_on_disk=self.mode == "disk")
        if unit.in_memory:
            stored = f"; θ₀ and D written to {self.out / 'merges'} once per group, read back per point" if unit.factors_on_disk else ""
            self.echo(f"fedmerge sweep: each point merged into one loaded model (λ applied to a D computed once per group{stored})")
        groups = {key: i for i, key in enumerate(dict.fromkeys(delta_key(p) for p in points))}
        self._stack.callback(self._release, unit)
        return run_search(
            points,
            unit,
            log,
            method=self.plan.method,
            task_count=len(self.tasks),
            selection=lambda scores: selection_score(scores, self.settings.reference),
            on_record=lambda point, record: self.echo(f"  {point.label()}: selection score {record['selection']:.6g}"),
            workers=self.workers,
            order=(lambda point: (groups[delta_key(point)], point.index)) if unit.in_memory else None,
        )


def finish(outcome: SearchOutcome, plan: SweepPlan, out: Path, mode: str, norms: Optional[List[float]], echo: Echo) -> SweepOutcome:
    """Write ``out/winner.yml`` and ``out/sweep.png`` and print the table."""
    from fedmerge_plugins.sweep.picture import write_picture

    best_point = outcome.best_point
    winner_path = out / WINNER
    write_output(winner_path, recipe_yaml(winner_recipe(plan.data, best_point)))  # whole or not at all
    write_picture(out / PICTURE, outcome.points, outcome.records, outcome.best["key"])
    echo(results_table(outcome.points, outcome.records, outcome.best["key"]))
    echo(f"winner: {best_point.label()} (selection score {outcome.best['selection']:.6g}); recipe written to {winner_path}")
    return SweepOutcome(outcome.points, outcome.records, outcome.best, winner_path, mode, norms, outcome.merges)

"""The sweep: a recipe's grid, searched by ``fedmerge_plugins.search.engine`` with each point
merged by mergekit's ``run_merge`` and scored by an evaluator; the winning recipe.

``plan_sweep`` checks everything that can be wrong with the request (grid values, recipe,
evaluator options) and ``open_log`` checks ``--out`` against its results file, all before
a checkpoint is opened or an output written; then every grid point's recipe is checked,
tensor shapes included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import click

from fedmerge_plugins.errors import FedmergeError
from fedmerge_plugins.errors import reason
from fedmerge_plugins.files import user_path, write_output, write_refused
from fedmerge_plugins.search.engine import Evaluation, Point, ResultLog, SearchOutcome, expand, recipe_yaml, run_search, winner_recipe
from fedmerge_plugins.sweep.errors import SweepError
from fedmerge_plugins.sweep.evaluators import Evaluator, selection_score
from fedmerge_plugins.sweep.grid import check_sweepable, parse_values, point_config
from fedmerge_plugins.sweep.memory import MemoryPlan
from fedmerge_plugins.sweep.results import fingerprint, results_table
from fedmerge_plugins.search.workers import WorkerSettings

RESULTS = "results.jsonl"
WINNER = "winner.yml"
MODES = ("auto", "memory", "disk")


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
class SweepPlan:
    """A checked request: the recipe, what is swept, the grid axes (CCLIP's paper ρ grid
    waits for the norms)."""

    data: Dict[str, Any]
    config: Any
    swept: List[str]
    axes: Dict[str, Optional[List[float]]]
    paper_clip: bool

    @property
    def method(self) -> str:
        return self.config.merge_method

    def points(self, norms: Optional[List[float]] = None) -> List[Point]:
        from fedmerge_plugins.search.grids import clip_rho_grid

        axes = dict(self.axes)
        if self.paper_clip and norms is not None:
            axes["rho"] = list(clip_rho_grid(norms))
        return expand(axes)


def plan_sweep(recipe: Path, lambdas: Optional[str], rhos: Optional[str], max_points: Optional[int] = None) -> SweepPlan:
    """The request checked from the recipe text alone (no checkpoint is opened); a grid of
    more than ``max_points`` points (None: ``grids.MAX_POINTS``) is refused."""
    from fedmerge_plugins.search.grids import MAX_POINTS, GridError, check_size, fedgma_rho_grid
    from fedmerge_plugins.guards.recipe import load_recipe

    data, config = load_recipe(recipe, shapes=False)  # shapes: per point, once --out is checked
    method = config.merge_method
    swept = [name for name, text in (("lambda", lambdas), ("rho", rhos)) if text is not None]
    if not swept:
        raise SweepError("nothing to sweep: give --lambda and/or --rho")
    check_sweepable(config, swept)
    if rhos == "paper" and method not in ("cclip", "fedgma"):
        raise SweepError(f"--rho paper: the paper's ρ grid is defined for cclip and fedgma, not {method}")
    paper_clip = rhos == "paper" and method == "cclip"  # ρ from the norms, known later
    limit = MAX_POINTS if max_points is None else max_points
    axes: Dict[str, Optional[List[float]]] = {"lambda": parse_values(lambdas, "--lambda", limit) if lambdas is not None else None}
    if rhos == "paper":
        axes["rho"] = [1.0] if paper_clip else fedgma_rho_grid()  # 1.0: a stand-in for the checks
    elif rhos is not None:
        axes["rho"] = parse_values(rhos, "--rho", limit)
    try:
        check_size(len(axes["lambda"] or [1]) * len(axes.get("rho") or [1]), limit, "the λ × ρ grid")
    except GridError as error:
        raise SweepError(str(error)) from None
    return SweepPlan(data, config, swept, axes, paper_clip)


def open_log(out: Path, plan: SweepPlan, evaluator: Evaluator, reference: Optional[Dict[str, float]]) -> ResultLog:
    """``out/results.jsonl``, refused if another recipe or evaluator wrote it."""
    return ResultLog(Path(out) / RESULTS, fingerprint(plan.data, plan.swept, evaluator.description, reference),
                     hint="use another --out directory or delete the file", kinds=("point",))


def _norm_keys(base, tasks) -> List[str]:
    """The norm-cache key of each task model's norm against ``base``."""
    from fedmerge_plugins.norms.cache import cache_keys
    from fedmerge_plugins.norms.streaming import model_index

    return cache_keys(model_index(base), [model_index(task) for task in tasks])


def _cached_norms(base, tasks) -> Optional[List[float]]:
    from fedmerge_plugins.norms.cache import CACHE

    keys = _norm_keys(base, tasks)
    found = CACHE.lookup(keys)
    return [found[key] for key in keys] if all(key in found for key in keys) else None


def choose_mode(mode: str, plan: MemoryPlan, echo: Callable[[str], None]) -> str:
    """"memory" or "disk", saying why before anything is read."""
    from fedmerge_plugins.sweep.memory import HEADROOM

    if mode == "disk":
        echo("fedmerge sweep: merging each grid point from disk (--mode disk)")
        return "disk"
    if plan.fits:
        echo(f"fedmerge sweep: inputs held in memory, read once ({plan.describe()})")
        return "memory"
    if mode == "memory":
        echo(f"fedmerge sweep: WARNING: {plan.describe()}, over {HEADROOM:.0%}; holding them in memory anyway (--mode memory)")
        return "memory"
    echo(
        f"fedmerge sweep: the models are too large to hold in memory: {plan.describe()} "
        f"(at most {HEADROOM:.0%} is used). Falling back to merging each grid point from disk, "
        "which reads every checkpoint once per point."
    )
    return "disk"


@dataclass
class SweepPoint:
    """One grid point's unit of work: merge its recipe with ``run_merge`` into a folder of
    its own under ``scratch`` (``scratch.choose_scratch``: /dev/shm or ``out/merges``), score
    it, and remove it or, with ``keep_merges``, move it to ``out/merges/point-NNNN``.

    In memory mode ``inputs`` holds the input checkpoints that mergekit's loader cache
    serves; ``norms`` holds CCLIP's norms by norm-cache key. Both are computed once by the
    driver; on a Ray worker (which gets this object once, tensors through the object
    store) the first point puts them in place, in the driver's working directory, so that
    recipe paths resolve as they do for ``mergekit-yaml``."""

    data: Dict[str, Any]
    out: Path
    options: Any  # mergekit MergeOptions
    evaluator: Evaluator
    keep_merges: bool = False
    inputs: Dict[Any, Any] = field(default_factory=dict)  # ModelReference -> merger.MemoryLoader
    norms: Dict[str, float] = field(default_factory=dict)
    workdir: str = field(default_factory=os.getcwd)
    scratch: Optional[Path] = None  # None: out/merges

    def __call__(self, point: Point) -> Evaluation:
        from safetensors import SafetensorError

        from fedmerge_plugins.norms.cache import CACHE
        from fedmerge_plugins.sweep import scratch
        from fedmerge_plugins.sweep.merger import install, merge_point

        if os.getcwd() != self.workdir:
            os.chdir(self.workdir)
        install(self.inputs)
        for key, norm in self.norms.items():
            CACHE.remember(key, norm)
        name = f"point-{point.index:04d}"
        merges = Path(self.out) / "merges"
        root = self.scratch if self.scratch is not None and self.scratch.is_dir() else merges
        with user_path(root, f"write the merge of grid point {point.label()} in"):
            staging = scratch.point_folder(root, name)
        try:
            try:
                merged = merge_point(point_config(self.data, point), staging / name, self.options)
            except (OSError, SafetensorError) as error:
                if not write_refused(error):
                    raise
                cause = reason(error) if isinstance(error, OSError) else str(error)  # a full or read-only scratch folder
                raise SweepError(f"grid point {point.label()}: cannot write its merge in {root}: {cause}") from error
            try:
                scores = self.evaluator.evaluate(merged)
            except FedmergeError as error:
                raise SweepError(f"grid point {point.label()}: {error}") from error
            if self.keep_merges:
                with user_path(merges, f"keep the merge of grid point {point.label()} in"):
                    merges.mkdir(parents=True, exist_ok=True)
                    scratch.keep(merged, merges / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Evaluation(scores)


def run_sweep(
    recipe: Path,
    out: Path,
    evaluator: Evaluator,
    *,
    lambdas: Optional[str] = None,
    rhos: Optional[str] = None,
    reference: Optional[Dict[str, float]] = None,
    mode: str = "auto",
    max_memory: Optional[int] = None,
    device: str = "cpu",
    keep_merges: bool = False,
    workers: Optional[WorkerSettings] = None,
    echo: Callable[[str], None] = click.echo,
    max_points: Optional[int] = None,
) -> SweepOutcome:
    """Merge and score every grid point of ``recipe`` (resuming ``out/results.jsonl``), then
    write ``out/winner.yml``. ``lambdas``/``rhos``: grid option text (``rhos="paper"`` for
    the paper's grid of cclip or fedgma; at most ``max_points`` points, default
    ``grids.MAX_POINTS``). ``workers``: score the points on Ray workers
    (``WorkerSettings(workers=N)`` or ``ray_address=...``); the inputs are read and CCLIP's
    norms computed here, once, and only this process writes the log."""
    from fedmerge_plugins.norms.streaming import model_index
    from fedmerge_plugins.guards.recipe import recipe_models
    from fedmerge_plugins.sweep import scratch
    from fedmerge_plugins.sweep.memory import plan_memory
    from fedmerge_plugins.sweep.merger import disk_norms, inputs_in_memory, memory_norms, merge_options

    if mode not in MODES:
        raise SweepError(f"--mode {mode!r}: use one of {', '.join(MODES)}")
    workers = workers or WorkerSettings()
    workers.check()
    plan = plan_sweep(recipe, lambdas, rhos, max_points)
    log = open_log(out, plan, evaluator, reference)
    for point in plan.points():
        point_config(plan.data, point)  # each point checked, shapes included
    base, tasks = recipe_models(plan.config)
    models = [base, *tasks]
    memory_plan = plan_memory([model_index(m) for m in models], model_index(base), max_memory)
    run_mode = choose_mode(mode, memory_plan, echo)
    options = merge_options(base, device)
    scratch_root = None  # a cluster's workers stage on their own machines' OUT/merges
    if workers.ray_address is None:
        held = memory_plan.needed if run_mode == "memory" else memory_plan.merged
        scratch_root = scratch.choose_scratch(Path(out), memory_plan.merged, max(1, workers.workers), held, echo,
                                              available=memory_plan.available)
    for root in {Path(out) / "merges", scratch_root or Path(out) / "merges"}:
        scratch.remove_abandoned(root)

    with contextlib.ExitStack() as stack:
        loaders: Dict = {}

        def hold_inputs() -> None:
            if run_mode == "memory" and not loaders:
                loaders.update(stack.enter_context(inputs_in_memory(models, options)))

        norms: Optional[List[float]] = None
        if plan.method == "cclip":  # CCLIP's global norms, into the cache where its kernel looks
            norms = _cached_norms(base, tasks)
            if norms is None and run_mode == "memory":
                hold_inputs()
                norms = memory_norms(base, tasks, loaders)
            elif norms is None:
                norms = disk_norms(base, tasks, device)
        points = plan.points(norms)
        if plan.paper_clip:
            for point in points:
                point_config(plan.data, point)
        done = sum(point.key in log.points() for point in points)
        echo(f"fedmerge sweep: {plan.method}, {len(points)} grid points, {done} already in {log.path}, scored {workers.describe()}")
        if done < len(points):
            hold_inputs()
        norm_keys = dict(zip(_norm_keys(base, tasks), norms)) if norms is not None else {}
        outcome = run_search(
            points,
            SweepPoint(plan.data, Path(out).resolve(), options, evaluator, keep_merges, dict(loaders), norm_keys,
                       scratch=scratch_root.resolve() if scratch_root is not None else None),
            log,
            method=plan.method,
            task_count=len(tasks),
            selection=lambda scores: selection_score(scores, reference),
            on_record=lambda point, record: echo(f"  {point.label()}: selection score {record['selection']:.6g}"),
            workers=workers,
        )
    return finish(outcome, plan, Path(out), run_mode, norms, echo)


def finish(outcome: SearchOutcome, plan: SweepPlan, out: Path, mode: str, norms: Optional[List[float]],
           echo: Callable[[str], None]) -> SweepOutcome:
    """Write ``out/winner.yml`` and print the table."""
    best_point = outcome.best_point
    winner_path = out / WINNER
    write_output(winner_path, recipe_yaml(winner_recipe(plan.data, best_point)))  # whole or not at all
    echo(results_table(outcome.points, outcome.records, outcome.best["key"]))
    echo(f"winner: {best_point.label()} (selection score {outcome.best['selection']:.6g}); recipe written to {winner_path}")
    return SweepOutcome(outcome.points, outcome.records, outcome.best, winner_path, mode, norms, outcome.merges)

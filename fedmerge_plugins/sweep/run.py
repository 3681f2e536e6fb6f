"""The sweep: grid -> merge each point -> score -> results file -> winning recipe.

Everything that can be wrong with the request (grid values, recipe, evaluator options)
is checked before a checkpoint is read or an output written.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import click

from fedmerge_plugins.sweep.evaluators import Evaluator, selection_score
from fedmerge_plugins.sweep.grid import GridPoint, check_sweepable, expand, parse_values, point_config, point_recipe, recipe_yaml
from fedmerge_plugins.sweep.results import ResultLog, fingerprint, results_table, winner

RESULTS = "results.jsonl"
WINNER = "winner.yml"
MODES = ("auto", "memory", "disk")


@dataclass
class SweepOutcome:
    points: List[GridPoint]
    records: Dict[str, dict]  # by point key
    best: dict  # the winning record
    winner_recipe: Path
    mode: str  # "memory" or "disk"
    norms: Optional[List[float]]  # CCLIP's task-vector norms, when the method is cclip


def _cached_norms(base, tasks) -> Optional[List[float]]:
    from fedmerge_plugins.norms import CACHE, cache_key, model_index

    found = [CACHE.get(cache_key(model_index(base), model_index(task))) for task in tasks]
    return None if any(n is None for n in found) else [float(n) for n in found]


def choose_mode(mode: str, models: List, max_memory: Optional[int], echo: Callable[[str], None]) -> str:
    """"memory" or "disk", saying why before anything is read; ``models[0]`` is the base."""
    from fedmerge_plugins.norms import model_index
    from fedmerge_plugins.sweep.memory import HEADROOM, plan_memory

    if mode == "disk":
        echo("fedmerge sweep: merging each grid point from disk (--mode disk)")
        return "disk"
    plan = plan_memory([model_index(m) for m in models], model_index(models[0]), max_memory)
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
    echo: Callable[[str], None] = click.echo,
) -> SweepOutcome:
    """Merge and score every grid point of ``recipe`` (resuming ``out/results.jsonl``), then
    write ``out/winner.yml``. ``lambdas``/``rhos``: grid option text (``rhos="paper"`` for
    the paper's grid of cclip or fedgma)."""
    from tqdm.auto import tqdm

    from fedmerge_plugins.diagnostics.report import load_recipe, recipe_models
    from fedmerge_plugins.grids import clip_rho_grid, fedgma_rho_grid
    from fedmerge_plugins.sweep.merger import disk_norms, inputs_in_memory, memory_norms, merge_options, merge_point

    if mode not in MODES:
        raise click.BadParameter(f"{mode!r}: use one of {', '.join(MODES)}", param_hint="--mode")
    data, config = load_recipe(recipe)
    method = config.merge_method
    swept = [name for name, text in (("lambda", lambdas), ("rho", rhos)) if text is not None]
    if not swept:
        raise click.UsageError("nothing to sweep: give --lambda and/or --rho")
    check_sweepable(config, swept)
    if rhos == "paper" and method not in ("cclip", "fedgma"):
        raise click.BadParameter(f"the paper's ρ grid is defined for cclip and fedgma, not {method}", param_hint="--rho")
    paper_clip = rhos == "paper" and method == "cclip"  # ρ from the norms, known later
    axes = {"lambda": parse_values(lambdas, "--lambda") if lambdas else None}
    if rhos == "paper":
        axes["rho"] = [1.0] if paper_clip else fedgma_rho_grid()  # 1.0: a stand-in for the checks
    elif rhos:
        axes["rho"] = parse_values(rhos, "--rho")

    def grid() -> Tuple[List[GridPoint], Dict[str, Any]]:
        points = expand(axes)
        return points, {point.key: point_config(data, point) for point in points}  # each point checked

    points, configs = grid()
    base, tasks = recipe_models(config)
    models = [base, *tasks]
    run_mode = choose_mode(mode, models, max_memory, echo)
    options = merge_options(base, device)

    with contextlib.ExitStack() as stack:
        loaders: Dict = {}

        def hold_inputs() -> None:
            if run_mode == "memory" and not loaders:
                loaders.update(stack.enter_context(inputs_in_memory(models, options)))

        norms: Optional[List[float]] = None
        if method == "cclip":  # CCLIP's global norms, into the cache where its kernel looks
            norms = _cached_norms(base, tasks)
            if norms is None and run_mode == "memory":
                hold_inputs()
                norms = memory_norms(base, tasks, loaders)
            elif norms is None:
                norms = disk_norms(base, tasks, device)
        if paper_clip:
            axes["rho"] = list(clip_rho_grid(norms))
            points, configs = grid()

        log = ResultLog(Path(out) / RESULTS, fingerprint(data, swept, evaluator.description, reference))
        done = log.load()
        pending = [point for point in points if point.key not in done]
        echo(f"fedmerge sweep: {method}, {len(points)} grid points, {len(points) - len(pending)} already in {log.path}")
        if pending:
            hold_inputs()
        progress = tqdm(pending, desc="grid points", unit="point")
        for point in progress:
            started = time.perf_counter()
            merged = merge_point(configs[point.key], Path(out) / "merges" / f"point-{point.index:04d}", options)
            scores = evaluator.evaluate(merged)
            selection = selection_score(scores, reference)
            log.append(point, method, scores, selection, time.perf_counter() - started)
            progress.write(f"  {point.label()}: selection score {selection:.6g}")
            if not keep_merges:
                shutil.rmtree(merged)

    best = winner(points, log.records)
    best_point = next(p for p in points if p.key == best["key"])
    winner_path = Path(out) / WINNER
    winner_path.write_text(recipe_yaml(point_recipe(data, best_point)), encoding="utf-8")
    echo(results_table(points, log.records, best["key"]))
    echo(f"winner: {best_point.label()} (selection score {best['selection']:.6g}); recipe written to {winner_path}")
    return SweepOutcome(points, dict(log.records), best, winner_path, run_mode, norms)

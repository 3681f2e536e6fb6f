"""A sweep request checked from the recipe text alone (no checkpoint is opened), and the
choice between holding the inputs in memory and merging each point from disk."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

from fedmerge_plugins.search.engine import Point, expand, method_grid
from fedmerge_plugins.sweep.errors import SweepError
from fedmerge_plugins.sweep.grid import check_sweepable, parse_values
from fedmerge_plugins.sweep.memory import MemoryPlan


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
        if self.paper_clip and norms is not None:
            grid = method_grid("cclip", self.axes.get("lambda") or (), norms=norms)
            others = {name: values for name, values in self.axes.items() if name not in ("lambda", "rho")}
            if not others:
                return grid
            return expand({"lambda": self.axes.get("lambda"), "rho": sorted({p.parameters["rho"] for p in grid}), **others})
        return expand(self.axes)


def parse_params(params: Sequence[str]) -> Dict[str, str]:
    """``--param NAME=GRID`` options: {NAME: GRID text}, in the order given."""
    parsed: Dict[str, str] = {}
    for text in params:
        name, equals, grid = text.partition("=")
        name = name.strip()
        if not equals or not name or not grid.strip():
            raise SweepError(f"--param {text!r}: expected NAME=GRID or NAME@MODEL=GRID (e.g. weight@./models/math=0.5:1.5:0.5)")
        if name in parsed:
            raise SweepError(f"--param {name} is given twice")
        parsed[name] = grid
    return parsed


def plan_sweep(recipe: Any, lambdas: Optional[str], rhos: Optional[str], params: Sequence[str] = (),
               max_points: Optional[int] = None) -> SweepPlan:
    """The request checked from the recipe text alone (no checkpoint is opened); a grid of
    more than ``max_points`` points (None: ``grids.MAX_POINTS``) is refused."""
    from fedmerge_plugins.guards.recipe import load_recipe
    from fedmerge_plugins.search.grids import MAX_POINTS, GridError, check_size, fedgma_rho_grid

    data, config = load_recipe(recipe, shapes=False)  # shapes: per point, once --out is checked
    method = config.merge_method
    grids = {name: text for name, text in (("lambda", lambdas), ("rho", rhos)) if text is not None}
    for name, text in parse_params(params).items():
        if name in grids:
            raise SweepError(f"--param {name}: {name} is swept by --{name} already")
        grids[name] = text
    swept = list(grids)
    if not swept:
        raise SweepError("nothing to sweep: give --lambda, --rho or --param NAME=GRID")
    check_sweepable(config, swept, [str(entry.get("model")) for entry in data.get("models") or []])
    rhos = grids.get("rho")
    if rhos == "paper" and method not in ("cclip", "fedgma"):
        raise SweepError(f"--rho paper: the paper's ρ grid is defined for cclip and fedgma, not {method}")
    paper_clip = rhos == "paper" and method == "cclip"  # ρ from the norms, known later
    limit = MAX_POINTS if max_points is None else max_points
    axes: Dict[str, Optional[List[float]]] = {}
    for name, text in grids.items():
        if name == "rho" and text == "paper":
            axes["rho"] = [1.0] if paper_clip else fedgma_rho_grid()  # 1.0: a stand-in for the checks
        else:
            axes[name] = parse_values(text, f"--{name}" if name in ("lambda", "rho") else f"--param {name}", limit)
    try:
        check_size(math.prod(len(values or [1]) for values in axes.values()), limit, "the grid")
    except GridError as error:
        raise SweepError(str(error)) from None
    return SweepPlan(data, config, swept, axes, paper_clip)


def choose_mode(mode: str, plan: MemoryPlan, echo: Callable[[str], None]) -> str:
    """"memory" or "disk", saying why before anything is read."""
    from fedmerge_plugins.sweep.memory import HEADROOM, human

    if mode == "disk":
        echo("fedmerge sweep: merging each grid point from disk (--mode disk)")
        return "disk"
    if plan.fits:
        echo(f"fedmerge sweep: inputs held in memory, read once ({plan.describe()})")
        return "memory"
    if mode == "memory":
        echo(f"fedmerge sweep: WARNING: {plan.describe()}, over {HEADROOM:.0%}; holding them in memory anyway (--mode memory)")
        return "memory"
    reads = ("which reads every checkpoint once per group of points differing only in λ, writes that group's "
             "θ₀ and D to disk and reads those two for each point (the loaded model plus one tensor's factors "
             f"in memory: {human(plan.disk_needed)})") if plan.tensor else "which reads every checkpoint once per point"
    echo(
        f"fedmerge sweep: the models are too large to hold in memory: {plan.describe()} "
        f"(at most {HEADROOM:.0%} is used). Falling back to merging each grid point from disk, {reads}."
    )
    return "disk"

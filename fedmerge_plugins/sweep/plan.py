"""A sweep request checked from the recipe text alone (no checkpoint is opened), and the
choice between holding the inputs in memory and merging each point from disk."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

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
            return method_grid("cclip", self.axes.get("lambda") or (), norms=norms)
        return expand(self.axes)


def plan_sweep(recipe: Any, lambdas: Optional[str], rhos: Optional[str]) -> SweepPlan:
    """The request checked from the recipe text alone (no checkpoint is opened)."""
    from fedmerge_plugins.guards.recipe import load_recipe
    from fedmerge_plugins.search.grids import fedgma_rho_grid

    data, config = load_recipe(recipe, shapes=False)  # shapes: per point, once --out is checked
    method = config.merge_method
    swept = [name for name, text in (("lambda", lambdas), ("rho", rhos)) if text is not None]
    if not swept:
        raise SweepError("nothing to sweep: give --lambda and/or --rho")
    check_sweepable(config, swept)
    if rhos == "paper" and method not in ("cclip", "fedgma"):
        raise SweepError(f"--rho paper: the paper's ρ grid is defined for cclip and fedgma, not {method}")
    paper_clip = rhos == "paper" and method == "cclip"  # ρ from the norms, known later
    axes: Dict[str, Optional[List[float]]] = {"lambda": parse_values(lambdas, "--lambda") if lambdas else None}
    if rhos == "paper":
        axes["rho"] = [1.0] if paper_clip else fedgma_rho_grid()  # 1.0: a stand-in for the checks
    elif rhos:
        axes["rho"] = parse_values(rhos, "--rho")
    return SweepPlan(data, config, swept, axes, paper_clip)


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

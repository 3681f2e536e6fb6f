"""Grid syntax, grid points and the recipe of each point.

``--lambda 0.2:1.0:0.2`` is START:STOP:STEP with STOP included (``grids.parse_grid``),
``--lambda 0.3,0.5,1`` a list. A point's recipe is the original recipe with the swept
values set in its top-level ``parameters:``; it is dumped to YAML text and parsed back,
so a point merges exactly what ``mergekit-yaml`` reads from the winning recipe file.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import click

SWEPT = ("lambda", "rho")  # the sweep's parameters, outermost first


def parse_values(text: str, option: str) -> List[float]:
    """Values of a grid option: ``START:STOP:STEP`` (stop included) or a comma list."""
    from fedmerge_plugins.grids import parse_grid

    try:
        values = parse_grid(text)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint=option) from None
    if len(set(values)) != len(values):
        raise click.BadParameter(f"{text!r} repeats a value", param_hint=option)
    return values


@dataclass(frozen=True)
class GridPoint:
    index: int
    parameters: Dict[str, float]

    @property
    def key(self) -> str:
        """Identity of the point in the results file (exact float repr, sorted keys)."""
        return json.dumps(self.parameters, sort_keys=True)

    def label(self) -> str:
        return ", ".join(f"{name}={value:.6g}" for name, value in self.parameters.items())


def expand(axes: Dict[str, Optional[Sequence[float]]]) -> List[GridPoint]:
    """The product of the given axes in ``SWEPT`` order, the first axis outermost."""
    points: List[Dict[str, float]] = [{}]
    for name in SWEPT:
        values = axes.get(name)
        if values:
            points = [{**p, name: float(v)} for p in points for v in values]
    return [GridPoint(i, p) for i, p in enumerate(points)]


def check_sweepable(config: Any, names: Sequence[str]) -> None:
    """Each swept name is a shared parameter of the recipe's method, set nowhere but in
    the top-level ``parameters:`` (where the sweep sets it)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    from fedmerge_plugins.recipe import RecipeError, _blocks

    method = config.merge_method
    spec = {p.name: p for p in registry.get(method).spec.parameters}
    for name in names:
        parameter = spec.get(name)
        if parameter is None or parameter.scope != ParameterScope.SHARED:
            shared = [n for n, p in spec.items() if p.scope == ParameterScope.SHARED]
            raise RecipeError(
                f"{method} has no shared parameter `{name}` to sweep; its shared parameters: "
                + (", ".join(f"`{n}`" for n in shared) or "none")
            )
        elsewhere = [where for where, _, block in _blocks(config) if name in block and where != "top-level parameters"]
        if elsewhere:
            raise RecipeError(
                f"the recipe sets `{name}` in {elsewhere[0]}; the sweep sets it in the top-level "
                "`parameters:`, remove it there"
            )


def point_recipe(data: Dict[str, Any], point: GridPoint) -> Dict[str, Any]:
    """A deep copy of the recipe with the point's values in the top-level parameters."""
    recipe = copy.deepcopy(data)
    recipe["parameters"] = {**(recipe.get("parameters") or {}), **point.parameters}
    return recipe


def recipe_yaml(recipe: Dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(recipe, sort_keys=False)


def point_config(data: Dict[str, Any], point: GridPoint) -> Any:
    """The checked ``MergeConfiguration`` mergekit-yaml would read for this point."""
    import yaml
    from mergekit.config import MergeConfiguration

    from fedmerge_plugins.recipe import check_recipe

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_yaml(point_recipe(data, point))))
    try:
        check_recipe(config)
    except click.ClickException as error:
        error.message = f"grid point {point.label()}: {error.message}"
        raise
    return config

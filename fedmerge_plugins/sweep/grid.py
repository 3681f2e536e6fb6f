"""Grid syntax and the checked recipe of each grid point.

``--lambda 0.2:1.0:0.2`` is START:STOP:STEP with STOP included (``grids.parse_grid``),
``--lambda 0.3,0.5,1`` a list; ``search.expand`` makes the points. A point's recipe is the
original recipe with the swept values set in its top-level ``parameters:``
(``search.winner_recipe``); it is dumped to YAML text and parsed back, so a point merges
exactly what ``mergekit-yaml`` reads from the winning recipe file.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from fedmerge_plugins.search.engine import PER_MODEL, Point, expand, recipe_yaml, winner_recipe
from fedmerge_plugins.sweep.errors import SweepError

__all__ = ["check_sweepable", "expand", "parse_values", "point_config"]


def parse_values(text: str, option: str, limit: Optional[int] = None) -> List[float]:
    """Values of a grid option: ``START:STOP:STEP`` (stop included) or a comma list; at
    most ``limit`` of them (None: ``grids.MAX_POINTS``)."""
    from fedmerge_plugins.search.grids import MAX_POINTS, GridError, parse_grid

    try:
        values = parse_grid(text, MAX_POINTS if limit is None else limit)
    except GridError as error:
        raise SweepError(f"{option}: {error}") from None
    if len(set(values)) != len(values):
        raise SweepError(f"{option}: {text!r} repeats a value")
    return values


def check_sweepable(config: Any, names: Sequence[str], models: Sequence[str] = ()) -> None:
    """Each swept name is a shared parameter of the recipe's method, set nowhere but in the
    top-level ``parameters:`` (where the sweep sets it), or ``NAME@MODEL``: a per-model
    parameter of the method and a model of the recipe's ``models:`` (``models``: their
    names as written), set there by the sweep."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import ParameterScope

    from fedmerge_plugins.guards.recipe import parameter_blocks

    method = config.merge_method
    spec = {p.name: p for p in registry.get(method).spec.parameters}
    for name in names:
        if PER_MODEL in name:
            parameter_name, _, model = name.partition(PER_MODEL)
            parameter = spec.get(parameter_name)
            if parameter is None or parameter.scope == ParameterScope.SHARED:
                per_model = [n for n, p in spec.items() if p.scope != ParameterScope.SHARED]
                raise SweepError(f"{method} has no per-model parameter `{parameter_name}` to sweep; its per-model parameters: "
                                 + (", ".join(f"`{n}`" for n in per_model) or "none"))
            if model not in models:
                raise SweepError(f"--param {name}: {model!r} is not a model of the recipe's `models:` ({', '.join(models)})")
            continue
        parameter = spec.get(name)
        if parameter is None or parameter.scope != ParameterScope.SHARED:
            shared = [n for n, p in spec.items() if p.scope == ParameterScope.SHARED]
            raise SweepError(
                f"{method} has no shared parameter `{name}` to sweep; its shared parameters: "
                + (", ".join(f"`{n}`" for n in shared) or "none")
            )
        elsewhere = [where for where, _, block in parameter_blocks(config) if name in block and where != "top-level parameters"]
        if elsewhere:
            raise SweepError(
                f"the recipe sets `{name}` in {elsewhere[0]}; the sweep sets it in the top-level "
                "`parameters:`, remove it there"
            )


def point_config(data: Dict[str, Any], point: Point) -> Any:
    """The checked ``MergeConfiguration`` mergekit-yaml would read for this point."""
    import yaml
    from mergekit.config import MergeConfiguration

    from fedmerge_plugins.guards.recipe import RecipeError, check_recipe

    config = MergeConfiguration.model_validate(yaml.safe_load(recipe_yaml(winner_recipe(data, point))))
    try:
        check_recipe(config)
    except RecipeError as error:
        raise SweepError(f"grid point {point.label()}: {error}") from None
    return config

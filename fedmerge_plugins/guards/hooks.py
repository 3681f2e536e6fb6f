"""fedmerge's checks inside mergekit's own merge entry points.

``fedmerge_autoload`` calls these when ``mergekit.merge`` and ``mergekit.plan`` are imported.
Each merge is checked once: ``run_merge`` checks the recipe (its YAML text's keys too, when
mergekit-yaml passes it), the models' existence and their weight files' headers before
any model is resolved or downloaded, and the ``MergePlanner`` it starts adds only the
tensor shapes (before any output exists); a planner started outside ``run_merge`` runs
every check. The merge itself is written to a staging folder that becomes the output
only when complete. Arguments are bound by name against the wrapped function's signature.

Inside ``mergekit-yaml`` (a click context is active) a ``FedmergeError`` becomes a one-line
click error (``boundary``); called from Python, the error itself (``RecipeError``,
``InputError``, ``NonFiniteError``…) propagates.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
from typing import Any, Optional

from mergekit.config import MergeConfiguration

from fedmerge_plugins.boundary import one_line_under_click

# the configuration whose run_merge call is in progress (checked already)
_CHECKED: contextvars.ContextVar[Optional[MergeConfiguration]] = contextvars.ContextVar("fedmerge_checked", default=None)


def _verbose(options: Any) -> bool:
    return (getattr(options, "verbosity", 0) or 0) >= 2


def install_run_merge_check() -> None:
    """Wrap ``mergekit.merge.run_merge`` (idempotent): check the recipe, that every model
    exists and that local weight files can be read, before it resolves (and downloads)
    any model; then merge into a staging folder that becomes the output only when the
    merge is complete (``staging``). Under ``mergekit-yaml`` a ``FedmergeError`` raised
    anywhere in the merge (a NaN found mid-merge) is one line; ``-vv`` shows the traceback."""
    from fedmerge_plugins.guards.recipe import check_recipe, check_recipe_text
    from fedmerge_plugins.guards.shapes import check_readable
    from fedmerge_plugins.guards.sources import check_sources
    from fedmerge_plugins.guards.staging import staged_output

    # Called while mergekit.merge finishes loading: take it from sys.modules, not the package.
    merge = importlib.import_module("mergekit.merge")
    original = merge.run_merge
    if getattr(original, "fedmerge_checked", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def run_merge(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        config, options = bound.arguments["merge_config"], bound.arguments.get("options")
        with one_line_under_click(_verbose(options)):
            from_file = check_recipe_text(bound.arguments.get("config_source"))
            check_recipe(config, shapes=False, from_file=from_file)
            check_sources(config, cache_dir=getattr(options, "transformers_cache", None))
            check_readable(config)
            token = _CHECKED.set(config)
            try:
                with staged_output(bound.arguments["out_path"]) as stage:
                    bound.arguments["out_path"] = stage
                    return original(*bound.args, **bound.kwargs)
            finally:
                _CHECKED.reset(token)

    run_merge.fedmerge_checked = True  # type: ignore[attr-defined]
    merge.run_merge = run_merge


def install_planner_check() -> None:
    """Check the recipe when a ``MergePlanner`` starts (idempotent): its shapes only,
    inside a ``run_merge`` that checked the rest; everything otherwise."""
    from mergekit.plan import MergePlanner

    from fedmerge_plugins.guards.recipe import check_recipe, check_recipe_shapes

    original = MergePlanner.__init__
    if getattr(original, "fedmerge_checked", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self: MergePlanner, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        config = bound.arguments["config"]
        context = {"arch_info": bound.arguments.get("arch_info"), "options": bound.arguments.get("options")}
        with one_line_under_click(_verbose(context["options"])):
            if _CHECKED.get() is config:
                check_recipe_shapes(config, **context)
            else:
                check_recipe(config, **context)
        original(*bound.args, **bound.kwargs)

    __init__.fedmerge_checked = True  # type: ignore[attr-defined]
    MergePlanner.__init__ = __init__  # type: ignore[method-assign]

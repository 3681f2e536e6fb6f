"""fedmerge's checks inside mergekit's own merge entry points.

``fedmerge_autoload`` calls these when ``mergekit.merge`` and ``mergekit.plan`` are imported:
the recipe-only checks, the models' existence and their weight files' headers at the start
of ``run_merge`` (before any model is resolved or downloaded), all of them, shapes
included, when ``MergePlanner`` starts (before any output exists); the merge itself is
written to a staging folder that becomes the output only when complete.

This module is the boundary to mergekit's click command: inside ``mergekit-yaml`` (a click
context is active) a ``FedmergeError`` becomes a one-line click error; called from Python,
the error itself (``RecipeError``, ``InputError``, ``NonFiniteError``…) propagates.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Iterator

from mergekit.config import MergeConfiguration


@contextlib.contextmanager
def _one_line_under_click(verbose: bool = False) -> Iterator[None]:
    import click

    if click.get_current_context(silent=True) is None:
        yield
        return
    from fedmerge_plugins.cli import one_line_errors

    with one_line_errors(verbose):
        yield


def install_run_merge_check() -> None:
    """Wrap ``mergekit.merge.run_merge`` (idempotent): check the recipe's parameters, that
    every model exists and that local weight files can be read, before it resolves (and
    downloads) any model; then merge into a staging folder that becomes the output only
    when the merge is complete (``staging``). Under ``mergekit-yaml`` a ``FedmergeError``
    raised anywhere in the merge (a NaN found mid-merge) is one line; ``-vv`` shows the
    traceback."""
    from fedmerge_plugins.guards.sources import check_sources
    from fedmerge_plugins.guards.recipe import check_recipe
    from fedmerge_plugins.guards.shapes import check_readable
    from fedmerge_plugins.guards.staging import staged_output

    # Called while mergekit.merge finishes loading: take it from sys.modules, not the package.
    merge = importlib.import_module("mergekit.merge")
    original = merge.run_merge
    if getattr(original, "fedmerge_checked", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config: MergeConfiguration, out_path: str, *args: Any, **kwargs: Any) -> Any:
        options = kwargs.get("options", args[0] if args else None)
        with _one_line_under_click(getattr(options, "verbosity", 0) >= 2):
            check_recipe(merge_config, shapes=False)
            check_sources(merge_config, cache_dir=getattr(options, "transformers_cache", None))
            check_readable(merge_config)
            with staged_output(out_path) as stage:
                return original(merge_config, stage, *args, **kwargs)

    run_merge.fedmerge_checked = True  # type: ignore[attr-defined]
    merge.run_merge = run_merge


def install_planner_check() -> None:
    """Run ``check_recipe`` at the start of every ``MergePlanner`` (idempotent)."""
    from mergekit.plan import MergePlanner

    from fedmerge_plugins.guards.recipe import check_recipe

    original = MergePlanner.__init__
    if getattr(original, "fedmerge_checked", False):
        return

    @functools.wraps(original)
    def __init__(self: MergePlanner, config: MergeConfiguration, *args: Any, **kwargs: Any) -> None:
        arch_info = kwargs.get("arch_info", args[0] if args else None)
        options = kwargs.get("options", args[1] if len(args) > 1 else None)
        with _one_line_under_click(getattr(options, "verbosity", 0) >= 2):
            check_recipe(config, arch_info=arch_info, options=options)
        original(self, config, *args, **kwargs)

    __init__.fedmerge_checked = True  # type: ignore[attr-defined]
    MergePlanner.__init__ = __init__  # type: ignore[method-assign]

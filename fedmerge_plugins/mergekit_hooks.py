"""fedmerge's checks inside mergekit's own merge entry points.

``fedmerge_autoload`` calls these when ``mergekit.merge`` and ``mergekit.plan`` are imported:
the recipe-only checks run at the start of ``run_merge`` (before any model is resolved or
downloaded), all of them, shapes included, when ``MergePlanner`` starts (before any output
exists). This module is the boundary to mergekit's click command: inside ``mergekit-yaml``
(a click context is active) a ``FedmergeError`` becomes a one-line click error; called from
Python, the ``RecipeError`` itself propagates.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Iterator

from mergekit.config import MergeConfiguration


@contextlib.contextmanager
def _one_line_under_click() -> Iterator[None]:
    import click

    if click.get_current_context(silent=True) is None:
        yield
        return
    from fedmerge_plugins.cli import one_line_errors

    with one_line_errors():
        yield


def install_run_merge_check() -> None:
    """Check the recipe's parameters at the start of ``mergekit.merge.run_merge``, before
    it resolves (and downloads) any model; idempotent."""
    from fedmerge_plugins.recipe import check_recipe

    # Called while mergekit.merge finishes loading: take it from sys.modules, not the package.
    merge = importlib.import_module("mergekit.merge")
    original = merge.run_merge
    if getattr(original, "fedmerge_checked", False):
        return

    @functools.wraps(original)
    def run_merge(merge_config: MergeConfiguration, *args: Any, **kwargs: Any) -> Any:
        with _one_line_under_click():
            check_recipe(merge_config, shapes=False)
        return original(merge_config, *args, **kwargs)

    run_merge.fedmerge_checked = True  # type: ignore[attr-defined]
    merge.run_merge = run_merge


def install_planner_check() -> None:
    """Run ``check_recipe`` at the start of every ``MergePlanner`` (idempotent)."""
    from mergekit.plan import MergePlanner

    from fedmerge_plugins.recipe import check_recipe

    original = MergePlanner.__init__
    if getattr(original, "fedmerge_checked", False):
        return

    @functools.wraps(original)
    def __init__(self: MergePlanner, config: MergeConfiguration, *args: Any, **kwargs: Any) -> None:
        with _one_line_under_click():
            check_recipe(config)
        original(self, config, *args, **kwargs)

    __init__.fedmerge_checked = True  # type: ignore[attr-defined]
    MergePlanner.__init__ = __init__  # type: ignore[method-assign]

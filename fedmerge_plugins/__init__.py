"""fedmerge: federated-learning merge rules as mergekit merge methods.

Importing this package is cheap; mergekit and torch are imported by the hooks below,
which ``fedmerge_autoload`` runs when mergekit's own modules are imported.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fedmerge_plugins.catalogue import METHOD_NAMES  # noqa: E402  (pure data, no imports)


def register() -> None:
    """Register the four methods in mergekit's registry; calling it again is harmless.

    The method objects are imported from their own modules (``catalogue.CATALOGUE``), not
    from ``fedmerge_plugins.methods``, so registering works while that package is still
    being imported (its first line imports mergekit's registry, whose import hook calls
    this). A method whose module (or a module it needs, e.g. ``params``) is itself still
    being imported at that moment is skipped; the hooks on ``mergekit.merge`` and
    ``mergekit.plan`` call this again, so a merge always finds all four.
    """
    import importlib

    from mergekit.merge_methods import registry

    from fedmerge_plugins.catalogue import CATALOGUE

    present = {method.spec.name for method in registry.registered_methods()}
    for info in CATALOGUE:
        if not info.own or info.name in present:
            continue
        module, attribute = info.target.split(":")
        try:
            method = getattr(importlib.import_module(module), attribute, None)
        except ImportError as error:
            if "partially initialized" not in str(error):
                raise
            continue
        if method is not None:
            registry.register(method)


def install_planner_check() -> None:
    """Check fedmerge recipes, shapes included, when mergekit plans a merge."""
    from fedmerge_plugins.guards.hooks import install_planner_check

    register()
    install_planner_check()


def install_run_merge_check() -> None:
    """Check fedmerge recipes' parameters when ``run_merge`` starts, before any download."""
    from fedmerge_plugins.guards.hooks import install_run_merge_check

    register()
    install_run_merge_check()

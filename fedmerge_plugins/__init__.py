"""fedmerge: federated-learning merge rules as mergekit merge methods.

Importing this package is cheap; mergekit and torch are imported by the hooks below,
which ``fedmerge_autoload`` runs when mergekit's own modules are imported.
"""

from __future__ import annotations

__version__ = "0.1.0"

METHOD_NAMES = ("fednova", "fedgma", "median", "cclip")


def register() -> None:
    """Register the four methods in mergekit's registry; calling it again is harmless.

    When importing ``fedmerge_plugins.methods`` is what brought mergekit's registry in,
    the methods do not exist yet: that package registers them on its last line instead.
    """
    import sys

    methods = sys.modules.get("fedmerge_plugins.methods")
    if methods is not None and not hasattr(methods, "METHODS"):
        return
    from mergekit.merge_methods import registry

    from fedmerge_plugins.methods import METHODS

    from fedmerge_plugins.methods.cclip import cclip_merge
    from fedmerge_plugins.norms import reference_norm

    if cclip_merge.norm_provider is None:
        cclip_merge.norm_provider = reference_norm
    present = {method.spec.name for method in registry.registered_methods()}
    for method in METHODS:
        if method.spec.name not in present:
            registry.register(method)


def install_planner_check() -> None:
    """Check fedmerge recipes, shapes included, when mergekit plans a merge."""
    from fedmerge_plugins.recipe import install_planner_check

    install_planner_check()


def install_run_merge_check() -> None:
    """Check fedmerge recipes' parameters when ``run_merge`` starts, before any download."""
    from fedmerge_plugins.recipe import install_run_merge_check

    install_run_merge_check()

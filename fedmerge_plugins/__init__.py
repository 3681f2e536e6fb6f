"""fedmerge: federated-learning merge rules as mergekit merge methods.

Importing this package is cheap; mergekit and torch are imported by the hooks below,
which ``fedmerge_autoload`` runs when mergekit's own modules are imported.
"""

from __future__ import annotations

__version__ = "0.1.0"

from fedmerge_plugins.catalogue import METHOD_NAMES  # noqa: E402  (pure data, no imports)


def register() -> None:
    """Register the four methods in mergekit's registry; calling it again is harmless.

    A method is taken from its module once that module's import has completed; while a
    module of ``fedmerge_plugins.methods`` is itself being imported (its first line imports
    mergekit's registry, whose import hook calls this), nothing is imported from here:
    ``fedmerge_plugins.methods`` calls this again at the end of its own import, and the
    hooks on ``mergekit.merge`` and ``mergekit.plan`` do too, so a merge finds all four.
    """
    from mergekit.merge_methods import registry

    from fedmerge_plugins.catalogue import CATALOGUE

    for info in CATALOGUE:
        if not info.own or any(m.spec.name == info.name for m in registry.registered_methods()):
            continue
        method = _completed(info.target)
        if method is not None and not any(m.spec.name == info.name for m in registry.registered_methods()):
            registry.register(method)  # (importing the module may have registered it)


def _initializing(module: object) -> bool:
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _completed(target: str) -> object:
    """The object ``module:attribute`` names, importing its module unless that would run
    into a method module still being imported (then None: registered later)."""
    import importlib
    import sys

    name, attribute = target.split(":")
    module = sys.modules.get(name)
    if module is None or _initializing(module):
        importing = any(key.startswith("fedmerge_plugins.methods") and _initializing(m) for key, m in list(sys.modules.items()))
        if module is not None or importing:
            return None
        module = importlib.import_module(name)
    return getattr(module, attribute, None)


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

"""Make fedmerge's merge methods available to every program that imports mergekit.

mergekit 0.1.5 has no plugin discovery, so ``fedmerge_autoload.pth`` (installed at the
root of site-packages next to this module) imports this module at interpreter start-up.
It only puts a small finder at the front of ``sys.meta_path``; neither torch nor mergekit
is imported here. When a watched mergekit module is imported, the finder lets the normal
machinery find and execute it, then calls the fedmerge hook for it:

- ``mergekit.merge_methods.registry``: register fednova, fedgma, median and cclip;
- ``mergekit.merge``: check recipes and input models before any model is resolved or
  downloaded, and write the merge to a staging folder published only when complete;
- ``mergekit.plan``: the same checks plus tensor shapes, before anything is planned.
"""

from __future__ import annotations  # annotations stay strings: `typing` is not imported

import sys

_HOOKS: dict[str, str] = {
    "mergekit.merge_methods.registry": "register",
    "mergekit.plan": "install_planner_check",
    "mergekit.merge": "install_run_merge_check",
}


def _run_hook(fullname: str) -> None:
    import fedmerge_plugins

    getattr(fedmerge_plugins, _HOOKS[fullname])()


class FedmergePostImportFinder:
    """A meta-path finder that only decorates the loaders of the watched modules.

    A plain class (not ``importlib.abc.MetaPathFinder``) keeps start-up cost near zero.
    """

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> object:
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is cls or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None:
            return spec

        def exec_then_hook(module: object) -> None:
            exec_module(module)
            _run_hook(fullname)

        # File loaders are created per lookup, so decorating this instance is local to it.
        loader.exec_module = exec_then_hook  # type: ignore[union-attr]
        return spec


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), or run hooks already due."""
    if FedmergePostImportFinder not in sys.meta_path:
        sys.meta_path.insert(0, FedmergePostImportFinder)  # type: ignore[arg-type]
    for fullname in _HOOKS:
        if fullname in sys.modules:
            _run_hook(fullname)


install()

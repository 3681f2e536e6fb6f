"""The paper's four merge rules as mergekit merge methods (section 5.2, eqs. 11–14).

``fedmerge_plugins.register()`` puts them in mergekit's registry: ``fedmerge_autoload`` calls
it when mergekit's registry is imported, and this package at the end of its own import
(while a method module is being imported, ``register`` imports none and leaves it to
this call). The registry's import comes first here, so it exists before any method.
"""

import mergekit.merge_methods.registry  # noqa: F401  (see the docstring)

from fedmerge_plugins.methods.cclip import cclip_merge
from fedmerge_plugins.methods.fedgma import fedgma_merge
from fedmerge_plugins.methods.fednova import fednova_merge
from fedmerge_plugins.methods.median import median_merge

METHODS = (fednova_merge, fedgma_merge, median_merge, cclip_merge)

import fedmerge_plugins  # noqa: E402

fedmerge_plugins.register()

__all__ = ["METHODS", "cclip_merge", "fedgma_merge", "fednova_merge", "median_merge"]

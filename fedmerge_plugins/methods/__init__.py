"""The paper's four merge rules as mergekit merge methods (section 5.2, eqs. 11–14).

Importing this package registers nothing by itself: ``fedmerge_plugins.register()`` does,
and ``fedmerge_autoload`` calls it when mergekit's registry is imported. That import comes
first here, so the registry (and its hook) exist before any method module is defined.
"""

import mergekit.merge_methods.registry  # noqa: F401  (see the docstring)

from fedmerge_plugins.methods.cclip import cclip_merge
from fedmerge_plugins.methods.fedgma import fedgma_merge
from fedmerge_plugins.methods.fednova import fednova_merge
from fedmerge_plugins.methods.median import median_merge

METHODS = (fednova_merge, fedgma_merge, median_merge, cclip_merge)

__all__ = ["METHODS", "cclip_merge", "fedgma_merge", "fednova_merge", "median_merge"]

"""The paper's four merge rules as mergekit merge methods (section 5.2, eqs. 11–14)."""

from fedmerge_plugins import register
from fedmerge_plugins.methods.cclip import cclip_merge
from fedmerge_plugins.methods.fedgma import fedgma_merge
from fedmerge_plugins.methods.fednova import fednova_merge
from fedmerge_plugins.methods.median import median_merge

METHODS = (fednova_merge, fedgma_merge, median_merge, cclip_merge)

register()  # a no-op when mergekit's registry already has them

__all__ = ["METHODS", "cclip_merge", "fedgma_merge", "fednova_merge", "median_merge"]

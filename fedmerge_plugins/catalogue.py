"""The method catalogue: every method fedmerge searches, its label and its search axes.

Pure data, no imports: every package (recipe checks, the search engine, the CLIP
experiment, the demo, reports) reads method names and labels from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class MethodInfo:
    name: str  # mergekit's ``merge_method:``
    label: str  # as the paper's tables print it
    takes_rho: bool  # ρ is a shared parameter searched beside λ
    own: bool  # implemented by fedmerge (False: mergekit's own)
    target: str = ""  # "module:attribute" of fedmerge's method object


CATALOGUE: Tuple[MethodInfo, ...] = (
    MethodInfo("task_arithmetic", "Task Arithmetic", False, False),
    MethodInfo("fednova", "FedNova", False, True, "fedmerge_plugins.methods.fednova:fednova_merge"),
    MethodInfo("fedgma", "FedGMA", True, True, "fedmerge_plugins.methods.fedgma:fedgma_merge"),
    MethodInfo("median", "Median", False, True, "fedmerge_plugins.methods.median:median_merge"),
    MethodInfo("cclip", "CCLIP", True, True, "fedmerge_plugins.methods.cclip:cclip_merge"),
)
BY_NAME: Dict[str, MethodInfo] = {info.name: info for info in CATALOGUE}
BASELINE = "task_arithmetic"
SEARCH_METHODS: Tuple[str, ...] = tuple(info.name for info in CATALOGUE)  # the paper's five, table order of the demo
METHOD_NAMES: Tuple[str, ...] = tuple(info.name for info in CATALOGUE if info.own)  # fedmerge's four
LABELS: Dict[str, str] = {info.name: info.label for info in CATALOGUE}

"""What a demo run measures, as plain data: the two training settings, a ``Variant`` (one seed
in one setting) and the ``DemoResult`` that ``compare`` and ``report`` read (as a dict, or
from ``results.json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from fedmerge_plugins.catalogue import BASELINE
from fedmerge_plugins.demo.recipes import METHODS

HOMOGENEOUS, HETEROGENEOUS = "homogeneous", "heterogeneous"
SETTINGS = (HOMOGENEOUS, HETEROGENEOUS)
SETTING_METHODS: Dict[str, Tuple[str, ...]] = {HOMOGENEOUS: (BASELINE,), HETEROGENEOUS: METHODS}


@dataclass
class Variant:
    """One fine-tuning seed in one setting: its three task models and what was measured with them."""

    seed: int
    setting: str
    models: Dict[str, dict]  # task model name -> manifest entry (path, task, training, task_vector_norm)
    validation_references: Dict[str, float] = field(default_factory=dict)  # own task, validation items
    test_references: Dict[str, float] = field(default_factory=dict)  # own task, test items
    reference_items: Dict[str, List[float]] = field(default_factory=dict)  # own task's test item scores
    candidates: List[dict] = field(default_factory=list)  # heterogeneous: each candidate's validation accuracy
    sweep: Dict[str, Dict[str, List[dict]]] = field(default_factory=dict)
    merges: Dict[str, Dict[str, dict]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.setting}"

    @property
    def methods(self) -> Tuple[str, ...]:
        return SETTING_METHODS[self.setting]

    @property
    def norms(self) -> Dict[str, float]:
        """Each task model's task-vector norm (CCLIP's ‖τ‖)."""
        return {name: float(entry["task_vector_norm"]) for name, entry in self.models.items()}

    @property
    def training(self) -> Dict[str, Tuple[int, float]]:
        """Each task model's (steps, learning rate) (FedNova's ‖a‖₁ = steps × rate)."""
        return {name: (int(e["training"]["steps"]), float(e["training"]["learning_rate"])) for name, e in self.models.items()}


@dataclass
class DemoResult:
    """Everything a demo run measured; ``report`` turns it into tables and files."""

    out: str
    size: str
    settings: dict
    manifest: dict
    base: Dict[str, float]  # the base's test accuracy per task
    variants: List[Variant] = field(default_factory=list)
    comparisons: dict = field(default_factory=dict)  # stats, filled by compare()
    timings: Dict[str, float] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)  # environment.describe(): CPU, threads, versions, build key

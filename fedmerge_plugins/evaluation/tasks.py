"""fedmerge's five evaluation tasks: short names, lm-eval task names, metrics and data sources
(any other lm-eval task is named as lm-eval names it: ``lm_eval_tasks``).

``gsm8k``, ``math``, ``humaneval`` and ``mbpp`` reproduce the paper's LLM evaluation (section 7,
appendix C, following the DARE paper's code); ``instruct`` is a local-only stand-in for AlpacaEval,
which needs a paid judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from fedmerge_plugins.errors import DataError


@dataclass(frozen=True)
class HubSource:
    """Where real runs read a task's data: ``datasets.load_dataset(path, name, split=split)`` for
    every ``name`` in ``names`` (MATH is split into one config per subject), concatenated."""

    path: str
    names: Tuple[Optional[str], ...]
    split: str = "test"


@dataclass(frozen=True)
class TaskSpec:
    short: str  # name used by fedmerge (CLI --tasks, local file <short>.jsonl)
    lm_eval_name: str  # task name in eval/*.yaml
    metric: str  # lm-eval metric name (process_results key)
    title: str  # column title in the results table
    hub: Optional[HubSource]  # None: local data only
    runs_code: bool = False

    @property
    def result_key(self) -> str:
        """Key of the primary metric in lm-eval's ``results[task]`` (no filter list: "none")."""
        return f"{self.metric},none"


MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)

TASKS: Dict[str, TaskSpec] = {
    spec.short: spec
    for spec in (
        TaskSpec("gsm8k", "fedmerge_gsm8k", "exact_match", "GSM8K", HubSource("openai/gsm8k", ("main",))),
        TaskSpec("math", "fedmerge_math", "exact_match", "MATH", HubSource("EleutherAI/hendrycks_math", MATH_SUBJECTS)),
        TaskSpec(
            "humaneval",
            "fedmerge_humaneval",
            "pass@1",
            "HumanEval",
            HubSource("openai/openai_humaneval", (None,)),
            runs_code=True,
        ),
        TaskSpec(
            "mbpp",
            "fedmerge_mbpp",
            "pass@1",
            "MBPP",
            HubSource("google-research-datasets/mbpp", ("full",)),
            runs_code=True,
        ),
        TaskSpec("instruct", "fedmerge_instruct", "exact_match", "Instruct", None),
    )
}

PAPER_TASKS: Tuple[str, ...] = ("gsm8k", "math", "humaneval", "mbpp")
ALL_TASKS: Tuple[str, ...] = tuple(TASKS)


def get_spec(short: str) -> TaskSpec:
    try:
        return TASKS[short]
    except KeyError:
        raise DataError(f"unknown evaluation task {short!r}; known: {', '.join(ALL_TASKS)}") from None

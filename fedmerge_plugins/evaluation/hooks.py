"""The functions the task YAMLs in ``eval/`` name with ``!function``: data loaders
(``custom_dataset``) and per-document scoring (``process_results``).

lm-eval imports ``!function`` targets from a file beside the YAML, so ``eval/fedmerge_hooks.py``
re-exports this module.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from fedmerge_plugins.evaluation.answers import gsm8k_correct, instruct_correct, math_correct
from fedmerge_plugins.evaluation.code_runner import run_program
from fedmerge_plugins.evaluation.code_tasks import humaneval_program, mbpp_program
from fedmerge_plugins.evaluation.loaders import load_task_dataset
from fedmerge_plugins.evaluation.prompts import (  # noqa: F401  (named by the YAMLs)
    gsm8k_prompt,
    humaneval_prompt,
    instruct_prompt,
    math_prompt,
    mbpp_prompt,
)

Doc = Mapping[str, Any]


def load_gsm8k(**options: Any):
    return load_task_dataset("gsm8k", **options)


def load_math(**options: Any):
    return load_task_dataset("math", **options)


def load_humaneval(**options: Any):
    return load_task_dataset("humaneval", **options)


def load_mbpp(**options: Any):
    return load_task_dataset("mbpp", **options)


def load_instruct(**options: Any):
    return load_task_dataset("instruct", **options)


def gsm8k_results(doc: Doc, results: List[str]) -> Dict[str, float]:
    return {"exact_match": float(gsm8k_correct(results[0], doc["reference"]))}


def math_results(doc: Doc, results: List[str]) -> Dict[str, float]:
    return {"exact_match": float(math_correct(results[0], doc["reference"]))}


def instruct_results(doc: Doc, results: List[str]) -> Dict[str, float]:
    return {"exact_match": float(instruct_correct(results[0], doc["output"]))}


def humaneval_results(doc: Doc, results: List[str]) -> Dict[str, float]:
    return {"pass@1": float(run_program(humaneval_program(doc, results[0])).passed)}


def mbpp_results(doc: Doc, results: List[str]) -> Dict[str, float]:
    return {"pass@1": float(run_program(mbpp_program(doc, results[0])).passed)}

"""The paper's zero-shot prompts (those of the DARE paper's evaluation code).

Docs are the normalized records of ``loaders`` (fields per task listed there).
"""

from __future__ import annotations

from typing import Any, Mapping

ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
# GSM8K and MATH
MATH_TEMPLATE = ALPACA_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
# HumanEval and MBPP (WizardCoder's template, with its extra blank line)
CODE_TEMPLATE = ALPACA_HEADER + "\n\n\n### Instruction:\nCreate a Python script for this problem:\n{problem}\n\n### Response:"
# instruct (the local stand-in for AlpacaEval)
INSTRUCT_TEMPLATE = ALPACA_HEADER + "\n\n### Instruction:\n{instruction}\n\n### Response:"

# MBPP task 493's test examples are pages long; DARE shows only the call instead.
_MBPP_LONG_TESTS = {"493": "calculate_polygons(startx, starty, endx, endy, radius)"}


def gsm8k_prompt(doc: Mapping[str, Any]) -> str:
    return MATH_TEMPLATE.format(instruction=doc["question"])


def math_prompt(doc: Mapping[str, Any]) -> str:
    return MATH_TEMPLATE.format(instruction=doc["problem"])


def code_prompt(problem: str) -> str:
    """Four-space indents become tabs in the prompt, as in DARE (and WizardCoder)."""
    return CODE_TEMPLATE.format(problem=problem.replace("    ", "\t"))


def humaneval_prompt(doc: Mapping[str, Any]) -> str:
    return code_prompt(doc["prompt"])


def mbpp_problem(doc: Mapping[str, Any]) -> str:
    """The task text followed by its test asserts: ``\\n{text}\\nTest examples:\\n{assert}...``."""
    long_tests = _MBPP_LONG_TESTS.get(str(doc["task_id"]))
    if long_tests is not None and long_tests.split("(")[0] in doc["test_list"][0]:
        examples = [long_tests]
    else:
        examples = list(doc["test_list"])
    return "\n" + doc["text"] + "\nTest examples:" + "".join("\n" + example for example in examples)


def mbpp_prompt(doc: Mapping[str, Any]) -> str:
    return code_prompt(mbpp_problem(doc))


def instruct_prompt(doc: Mapping[str, Any]) -> str:
    return INSTRUCT_TEMPLATE.format(instruction=doc["instruction"])

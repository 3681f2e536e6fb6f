"""Results in the layout of the paper's Table 5, and model outputs for AlpacaEval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins.evaluation.tasks import TASKS
from fedmerge_plugins.files import write_output

# Table 5's column groups, in its order; "instruct" stands where AlpacaEval is in the paper.
TABLE_GROUPS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("Mathematical Reasoning", ("gsm8k", "math")),
    ("Code Generation", ("humaneval", "mbpp")),
    ("Instruction Following", ("instruct",)),
)
MISSING = "/"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], above: Sequence[Sequence[str]] = ()) -> str:
    """A Markdown table with padded columns; ``above`` are extra header lines over ``headers``."""
    heads = [*above, headers]
    widths = [max(len(str(row[index])) for row in [*heads, *rows]) for index in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([*(line(head) for head in heads), rule, *(line(row) for row in rows)])


def format_table(
    rows: Sequence[Tuple[Sequence[str], Mapping[str, float]]],
    label_headers: Sequence[str] = ("Model",),
) -> str:
    """A Markdown table like the paper's Table 5: one row per (labels, scores), scores (short task
    name -> value in [0, 1]) shown in percent with two decimals, "/" where a task was not run;
    other lm-eval tasks in columns of their own after the paper's.

    ``format_table([(("Math+Code", "FedGMA"), {"gsm8k": 0.655})], ("Tasks", "Methods"))``
    """
    others = tuple(dict.fromkeys(name for _, scores in rows for name in scores if name not in TASKS))
    groups = (*TABLE_GROUPS, ("Other lm-eval tasks", others)) if others else TABLE_GROUPS
    columns = [short for _, shorts in groups for short in shorts]
    group_row = [""] * len(label_headers) + [
        group if index == 0 else "" for group, shorts in groups for index in range(len(shorts))
    ]
    header = list(label_headers) + [TASKS[short].title if short in TASKS else short for short in columns]
    body: List[List[str]] = []
    for labels, scores in rows:
        if len(labels) != len(label_headers):
            raise ValueError(f"row labels {tuple(labels)} do not match headers {tuple(label_headers)}")
        cells = [f"{100 * scores[short]:.2f}" if short in scores else MISSING for short in columns]
        body.append(list(labels) + cells)
    return markdown_table(header, body, above=[group_row])


def alpaca_eval_records(samples: Sequence[Mapping[str, Any]], generator: str) -> List[Dict[str, str]]:
    """lm-eval's logged samples of the instruct task -> alpaca_eval model outputs
    (``instruction``, ``output``, ``generator``)."""
    records = []
    for sample in sorted(samples, key=lambda item: item["doc_id"]):
        response = sample["resps"][0][0] if sample["resps"] and sample["resps"][0] else ""
        records.append({"instruction": sample["doc"]["instruction"], "output": response.strip(), "generator": generator})
    return records


def write_alpaca_eval_outputs(
    raw: Mapping[str, Any], path: "str | Path", generator: str, task_name: Optional[str] = None
) -> Path:
    """Write the instruct task's generations as an alpaca_eval ``model_outputs`` JSON file, to be
    judged with ``alpaca_eval --model_outputs PATH`` elsewhere (the judge is a paid API)."""
    task_name = task_name or TASKS["instruct"].lm_eval_name
    samples = raw.get("samples", {}).get(task_name)
    if samples is None:
        raise ValueError("no generations of the instruct task to write (was it evaluated?)")
    write_output(path, json.dumps(alpaca_eval_records(samples, generator), indent=2, ensure_ascii=False) + "\n")
    return Path(path)

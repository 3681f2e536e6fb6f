"""End to end through real lm-eval (``simple_evaluate``), offline, on a tiny local Llama with a
locally trained tokenizer, for gsm8k, math, humaneval, mbpp and instruct.

Two kinds of generations:
- scripted: lm-eval's HFLM whose generation step returns a chosen answer per prompt; the test
  knows what lm-eval then sees (after its stop sequences) and whether each answer is right;
- real: the model's own greedy decoding, which is built to emit one known text per prompt kind
  (``eval_fixtures.write_chain_model``), run through the ``fedmerge eval`` command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from click.testing import CliRunner

from fedmerge_plugins.evaluation import prompts
from fedmerge_plugins.evaluation.loaders import split_indices
from tests.eval_fixtures import scripted_hflm, write_chain_model, write_jsonl

HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
TASKS = ("gsm8k", "math", "humaneval", "mbpp", "instruct")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _he(tag: str, name: str, body_doc: str, test: str) -> dict:
    return {
        "task_id": f"HumanEval/{tag}",
        "prompt": f'def {name}(a, b):\n    """{body_doc} [{tag}]"""\n',
        "test": f"def check(candidate):\n    {test}\n",
        "entry_point": name,
    }


# ---------------------------------------------------------------------------------------------
# Scripted generations: (record, scripted answer, text lm-eval keeps after its stop sequences,
# whether that answer is right). The record's tag (e.g. "[g1]") selects the scripted answer.
Case = Tuple[dict, str, str, int]
ADD_DOC = "Return the sum of a and b."
SCRIPTED: Dict[str, List[Case]] = {
    "gsm8k": [
        ({"question": "[g1] Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
         "Tom has 3 + 4 = 7 apples.\nThe answer is: 7.", "Tom has 3 + 4 = 7 apples.\nThe answer is: 7.", 1),
        ({"question": "[g2] Pens?", "answer": "#### 1,007"}, "The answer is: $1,007.", "The answer is: $1,007.", 1),
        ({"question": "[g3] Half of 25?", "answer": "#### 12"}, "The answer is: 12.5", "The answer is: 12.5", 0),
        ({"question": "[g4] Five?", "answer": "5"}, "So the result is 5.", "So the result is 5.", 0),
        # the continuation after a stop sequence is cut: the later "41" is never seen
        ({"question": "[g5] Forty?", "answer": "#### 40"},
         "The answer is 40\n\n### Instruction:\nThe answer is: 41", "The answer is 40\n\n### ", 1),
        ({"question": "[g6] Minus three?", "answer": "#### -3"}, "The answer is: 7 and then -3", "The answer is: 7 and then -3", 0),
    ],
    "math": [
        ({"problem": "[m1] Compute $\\sin 30^\\circ$.", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
         "From the unit circle.\nThe answer is: \\frac12.", "From the unit circle.\nThe answer is: \\frac12.", 1),
        ({"problem": "[m2] Half?", "solution": "$\\boxed{\\dfrac{1}{2}}$"}, "The answer is: 1/2", "The answer is: 1/2", 1),
        ({"problem": "[m3] Length?", "answer": "10"}, "The answer is: 10 \\text{ cm}.\nDone.", "The answer is: 10 \\text{ cm}.\nDone.", 1),
        ({"problem": "[m4] Root?", "solution": "\\boxed{\\sqrt{3}}"}, "The answer is: $\\sqrt3$.", "The answer is: $\\sqrt3$.", 1),
        ({"problem": "[m5] Five?", "solution": "\\boxed{5}"}, "The answer is: 6.", "The answer is: 6.", 0),
        ({"problem": "[m6] Square?", "solution": "\\boxed{x^2}"}, "I do not know.", "I do not know.", 0),
    ],
    "humaneval": [
        (_he("h1", "add", ADD_DOC, "assert candidate(2, 3) == 5"),
         "```python\ndef add(a, b):\n    return a + b\n```\n\n### Instruction:\nmore",
         "```python\ndef add(a, b):\n    return a + b\n```\n\n", 1),
        (_he("h2", "mul", "Return a times b.", "assert candidate(2, 3) == 6"), "\treturn a * b\n", "\treturn a * b\n", 1),
        (_he("h3", "sub", "Return a minus b.", "assert candidate(3, 2) == 1"),
         "def sub(a, b):\n    return a + b\n", "def sub(a, b):\n    return a + b\n", 0),
        (_he("h4", "div", "Return a over b.", "assert candidate(6, 3) == 2"),
         "def div(a, b) return a / b", "def div(a, b) return a / b", 0),
        (_he("h5", "mx", "Return the larger.", "assert candidate(6, 3) == 6"),
         'def mx(a, b):\n    return max(a, b)\n\nif __name__ == "__main__":\n    raise SystemExit(1)\n',
         'def mx(a, b):\n    return max(a, b)\n\nif __name__ == "__main__":\n    raise SystemExit(1)\n', 1),
    ],
    "mbpp": [
        ({"task_id": 1, "text": "[p1] Write a function to find the maximum of two numbers.",
          "test_list": ["assert maximum(1, 2) == 2", "assert maximum(5, 3) == 5"]},
         "```python\ndef maximum(a, b):\n    return max(a, b)\n```", "```python\ndef maximum(a, b):\n    return max(a, b)\n```", 1),
        ({"task_id": 2, "text": "[p2] Write a function to find the minimum of two numbers.",
          "test_list": ["assert minimum(1, 2) == 1"]},
         "def minimum(a, b):\n    return a\n", "def minimum(a, b):\n    return a\n", 1),
        ({"task_id": 3, "text": "[p3] Write a function to negate a number.", "test_list": ["assert negate(2) == -2"]},
         "def negate(x):\n    return x\n", "def negate(x):\n    return x\n", 0),
        ({"task_id": 4, "text": "[p4] Write a function for the area of a circle.",
          "test_list": ["assert area(1) == math.pi"], "test_setup_code": "import math"},
         "The solution is:\ndef area(r):\n    import math\n    return math.pi * r * r\n\nThe answer is: area",
         "The solution is:\ndef area(r):\n    import math\n    return math.pi * r * r\n\nThe answer is: area", 1),
    ],
    "instruct": [
        ({"instruction": "[i1] Name the capital of France.", "output": "Paris"}, "  paris\nIt is a city.", "  paris\nIt is a city.", 1),
        ({"instruction": "[i2] What color is the sky?", "output": "blue"}, "The sky is blue.", "The sky is blue.", 0),
        ({"instruction": "[i3] Say hi.", "output": "Hi!"}, "", "", 0),
    ],
}

# ---------------------------------------------------------------------------------------------
# The chain model's own generations: one text after the math prompt, one after the others.
MATH_ANSWER = " So 3 + 4 = 7. The answer is: 7."
SCRIPT_ANSWER = "Here is the script:\n```python\ndef add(a, b):\n    return a + b\n```"
CHAINS = {
    "### Response: Let's think step by step.": MATH_ANSWER,
    "### Response:": SCRIPT_ANSWER,
}
# records and whether the fixed generation above answers them correctly
CHAIN_DATA: Dict[str, List[Tuple[dict, int]]] = {
    "gsm8k": [
        ({"question": "What is 3 plus 4?", "answer": "3 + 4 = 7\n#### 7"}, 1),
        ({"question": "What is 3 plus 5?", "answer": "#### 8"}, 0),
        ({"question": "Seven?", "answer": "7"}, 1),
        ({"question": "A thousand and seven?", "answer": "#### 1,007"}, 0),
    ],
    "math": [
        ({"problem": "Compute $3+4$.", "solution": "$3+4=\\boxed{7}$"}, 1),
        ({"problem": "Half?", "solution": "$\\boxed{\\frac{1}{2}}$"}, 0),
        ({"problem": "Seven point oh?", "answer": "7.0"}, 0),
    ],
    "humaneval": [
        (_he("0", "add", ADD_DOC, "assert candidate(1, 2) == 3"), 1),
        (_he("1", "sub", "Return a minus b.", "assert candidate(3, 2) == 1"), 0),
    ],
    "mbpp": [
        ({"task_id": 1, "text": "Write a function to add two numbers.", "test_list": ["assert add(1, 2) == 3"]}, 1),
        ({"task_id": 2, "text": "Write a function to add.", "test_list": ["assert add(2, 2) == 5"]}, 0),
        ({"task_id": 3, "text": "Concatenate.", "test_list": ["assert add('a', 'b') == 'ab'"]}, 1),
    ],
    "instruct": [
        ({"instruction": "Introduce your script.", "output": "HERE IS THE SCRIPT:"}, 1),
        ({"instruction": "Same, without colon.", "output": "Here is the script"}, 0),
        ({"instruction": "Give the code.", "output": "def add(a, b):"}, 0),
    ],
}


def _mean(labels) -> float:
    labels = list(labels)
    return sum(labels) / len(labels)


@pytest.fixture(scope="session")
def chain_model(tmp_path_factory) -> Path:
    corpus = [prompts.MATH_TEMPLATE, prompts.CODE_TEMPLATE, prompts.INSTRUCT_TEMPLATE] * 4
    for cases in SCRIPTED.values():
        corpus += [json.dumps(record) + answer for record, answer, _, _ in cases]
    return write_chain_model(tmp_path_factory.mktemp("chain-model"), CHAINS, corpus)


@pytest.fixture(scope="session")
def scripted_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("scripted-data")
    for short, cases in SCRIPTED.items():
        write_jsonl(directory / f"{short}.jsonl", [record for record, _, _, _ in cases])
    return directory


@pytest.fixture(scope="session")
def chain_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("chain-data")
    for short, cases in CHAIN_DATA.items():
        write_jsonl(directory / f"{short}.jsonl", [record for record, _ in cases])
    return directory


def _script() -> Dict[str, str]:
    """Tag ("[g1]", ...) -> scripted answer."""
    return {
        re.search(r"\[[a-z]\d\]", json.dumps(record)).group(): answer
        for cases in SCRIPTED.values()
        for record, answer, _, _ in cases
    }


@pytest.mark.slow
def test_scripted_generations_are_scored_by_lm_eval(chain_model, scripted_data, tmp_path):
    from fedmerge_plugins.evaluation.api import evaluate_lm, load_tasks

    lm = scripted_hflm(chain_model, _script(), batch_size=4)
    tasks = load_tasks(TASKS, data_dir=scripted_data)
    result = evaluate_lm(lm, tasks, allow_code_execution=True, output_dir=tmp_path / "out", model_name="scripted")

    for short, cases in SCRIPTED.items():
        seen = result.generations(short)
        assert seen == [kept for _, _, kept, _ in cases], short
        expected = _mean(label for _, _, _, label in cases)
        assert result.scores[short] == pytest.approx(expected), short
        assert result.counts[short] == len(cases)
        per_item = sorted(result.raw["samples"][f"fedmerge_{short}"], key=lambda sample: sample["doc_id"])
        metric = "pass@1" if short in ("humaneval", "mbpp") else "exact_match"
        assert [sample[metric] for sample in per_item] == [float(label) for _, _, _, label in cases], short

    # the prompts lm-eval built, as the model received them
    gsm8k_prompt = HEADER + "\n\n### Instruction:\n[g1] Tom has 3 apples and buys 4. How many?\n\n### Response: Let's think step by step."
    instruct_prompt = HEADER + "\n\n### Instruction:\n[i2] What color is the sky?\n\n### Response:"
    mbpp_prompt = (
        HEADER + "\n\n\n### Instruction:\nCreate a Python script for this problem:\n\n"
        "[p3] Write a function to negate a number.\nTest examples:\nassert negate(2) == -2\n\n### Response:"
    )
    humaneval_prompt = (
        HEADER + "\n\n\n### Instruction:\nCreate a Python script for this problem:\n"
        'def add(a, b):\n\t"""Return the sum of a and b. [h1]"""\n\n\n### Response:'
    )
    for prompt in (gsm8k_prompt, instruct_prompt, mbpp_prompt, humaneval_prompt):
        assert prompt in lm.contexts
    assert len(lm.contexts) == sum(len(cases) for cases in SCRIPTED.values())
    first = min(result.raw["samples"]["fedmerge_gsm8k"], key=lambda sample: sample["doc_id"])
    assert first["arguments"][0][0] == gsm8k_prompt
    assert first["arguments"][0][1]["do_sample"] is False and first["arguments"][0][1]["max_gen_toks"] == 256

    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["results"]["fedmerge_math"]["exact_match,none"] == pytest.approx(4 / 6)
    assert written["results"]["fedmerge_humaneval"]["pass@1,none"] == pytest.approx(3 / 5)
    assert written["fedmerge_scores"] == pytest.approx(result.scores)
    lines = (tmp_path / "out" / "samples_fedmerge_mbpp.jsonl").read_text().splitlines()
    assert len(lines) == len(SCRIPTED["mbpp"])


@pytest.mark.slow
def test_fedmerge_eval_command_on_the_models_own_generations(chain_model, chain_data, tmp_path):
    out, alpaca = tmp_path / "out", tmp_path / "alpaca.json"
    command = [
        str(Path(sys.executable).parent / "fedmerge"), "eval", str(chain_model),
        "--tasks", ",".join(TASKS), "--data-dir", str(chain_data), "--batch-size", "2",
        "--max-gen-toks", "64", "--allow-code-execution", "--output", str(out), "--alpaca-eval-outputs", str(alpaca),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]

    expected = {short: _mean(label for _, label in cases) for short, cases in CHAIN_DATA.items()}
    results = json.loads((out / "results.json").read_text())
    for short, value in expected.items():
        metric = "pass@1" if short in ("humaneval", "mbpp") else "exact_match"
        assert results["results"][f"fedmerge_{short}"][f"{metric},none"] == pytest.approx(value), short
        samples = [json.loads(line) for line in (out / f"samples_fedmerge_{short}.jsonl").read_text().splitlines()]
        generated = MATH_ANSWER if short in ("gsm8k", "math") else SCRIPT_ANSWER
        assert [sample["resps"][0][0] for sample in samples] == [generated] * len(CHAIN_DATA[short])

    row = next(line for line in completed.stdout.splitlines() if line.startswith(f"| {chain_model.name}"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:] == [f"{100 * expected[short]:.2f}" for short in ("gsm8k", "math", "humaneval", "mbpp", "instruct")]
    assert json.loads(alpaca.read_text()) == [
        {"instruction": record["instruction"], "output": SCRIPT_ANSWER, "generator": chain_model.name}
        for record, _ in CHAIN_DATA["instruct"]
    ]


@pytest.mark.slow
def test_validation_and_test_splits(chain_model, chain_data, monkeypatch):
    from fedmerge_plugins.evaluation.api import evaluate_model

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    labels = [label for _, label in CHAIN_DATA["gsm8k"]]
    for split in ("validation", "test"):
        result = evaluate_model(
            chain_model, ["gsm8k"], data_dir=chain_data, split=split, validation_fraction=0.5, seed=3, max_gen_toks=32
        )
        chosen = split_indices(len(labels), split, 0.5, seed=3)
        assert result.counts == {"gsm8k": len(chosen)} == {"gsm8k": 2}
        assert result.scores["gsm8k"] == pytest.approx(_mean(labels[index] for index in chosen))
        assert [sample["doc"]["question"] for sample in sorted(result.raw["samples"]["fedmerge_gsm8k"], key=lambda s: s["doc_id"])] == [
            CHAIN_DATA["gsm8k"][index][0]["question"] for index in chosen
        ]
    limited = evaluate_model(chain_model, ["math"], data_dir=chain_data, limit=1, max_gen_toks=32)
    assert limited.counts == {"math": 1} and limited.scores == {"math": 1.0}


def test_code_execution_needs_opt_in(chain_model, chain_data):
    from fedmerge_plugins.evaluation.api import evaluate_lm, load_tasks
    from fedmerge_plugins.evaluation.cli import eval_command

    runner = CliRunner()
    refused = runner.invoke(eval_command, [str(chain_model), "--tasks", "gsm8k,mbpp", "--data-dir", str(chain_data)])
    assert refused.exit_code != 0 and "mbpp run model-written code" in refused.output
    assert "--allow-code-execution" in refused.output
    # lm-eval's own gate holds too, for callers that skip fedmerge's check
    lm = scripted_hflm(chain_model, {})
    with pytest.raises(ValueError, match="unsafe"):
        evaluate_lm(lm, load_tasks(["humaneval"], data_dir=chain_data), allow_code_execution=False)


def test_command_line_errors(chain_model, chain_data, tmp_path):
    from fedmerge_plugins.evaluation.cli import eval_command

    runner = CliRunner()

    def run(*args):
        return runner.invoke(eval_command, [str(chain_model), *args])

    unknown = run("--tasks", "gsm8k,alpaca_eval", "--data-dir", str(chain_data))
    assert unknown.exit_code == 2 and "alpaca_eval" in unknown.output
    no_instruct = run("--tasks", "gsm8k", "--data-dir", str(chain_data), "--alpaca-eval-outputs", str(tmp_path / "a.json"))
    assert no_instruct.exit_code == 2 and "add instruct" in no_instruct.output
    (tmp_path / "gsm8k.jsonl").write_text((chain_data / "gsm8k.jsonl").read_text())
    missing = run("--tasks", "gsm8k,math", "--data-dir", str(tmp_path))
    assert missing.exit_code == 1 and "math.jsonl" in missing.output
    no_local = run("--tasks", "instruct")
    assert no_local.exit_code == 1 and "give a data directory" in no_local.output
    split = run("--tasks", "gsm8k", "--data-dir", str(chain_data), "--split", "validation")
    assert split.exit_code == 1 and "validation fraction" in split.output
    too_long = run("--tasks", "gsm8k", "--data-dir", str(chain_data), "--max-gen-toks", "4096")
    assert too_long.exit_code == 1 and "lower max_gen_toks" in too_long.output
    assert not (tmp_path / "out").exists()

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

from fedmerge_plugins.errors import DataError
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
    assert unknown.exit_code == 1 and "unknown evaluation task(s) alpaca_eval" in unknown.output
    no_instruct = run("--tasks", "gsm8k", "--data-dir", str(chain_data), "--alpaca-eval-outputs", str(tmp_path / "a.json"))
    assert no_instruct.exit_code == 2 and "add instruct" in no_instruct.output
    (tmp_path / "gsm8k.jsonl").write_text((chain_data / "gsm8k.jsonl").read_text())
    missing = run("--tasks", "gsm8k,math", "--data-dir", str(tmp_path))
    assert missing.exit_code == 1 and "math.jsonl" in missing.output
    no_local = run("--tasks", "instruct")
    assert no_local.exit_code == 1 and "give a data directory" in no_local.output
    hub_split = run("--tasks", "gsm8k", "--split", "validation")  # the public test set is no validation split
    assert hub_split.exit_code == 1 and "needs a validation fraction (--validation-fraction 0.05), or give --data-dir" in hub_split.output
    assert not (tmp_path / "out").exists()
    # a folder of validation files is the validation split: every item scored, no --split test needed
    local = run("--tasks", "gsm8k", "--data-dir", str(chain_data), "--split", "validation", "--max-gen-toks", "4096")
    assert local.exit_code == 0, local.output
    assert f"items: gsm8k {len(CHAIN_DATA['gsm8k'])}" in local.output
    assert re.search(r"note: --max-gen-toks lowered from 4096 to \d+: .*'s context of 2048 tokens less the longest gsm8k prompt", local.output)


# ---- any lm-eval task: from --include-path on local data, stock names through lm-eval's index ----------

USER_TASK = """task: my_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}\\n\\n### Response: Let's think step by step."
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  do_sample: false
filter_list:
  - name: get-answer
    filter:
      - function: regex
        regex_pattern: "The answer is: (\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
# the chain model answers MATH_ANSWER ("... The answer is: 7.") after that prompt
USER_RECORDS = [({"question": "What is 3 plus 4?", "answer": "7"}, 1), ({"question": "What is 3 plus 5?", "answer": "8"}, 0),
                ({"question": "Seven?", "answer": "7"}, 1), ({"question": "Six?", "answer": "6"}, 0), ({"question": "Also 7?", "answer": "7"}, 1)]


def _user_task(tmp_path: Path) -> Path:
    tasks = tmp_path / "my-tasks"
    data = write_jsonl(tmp_path / "my-data" / "qa.jsonl", [record for record, _ in USER_RECORDS])
    tasks.mkdir()
    (tasks / "my_qa.yaml").write_text(USER_TASK.format(data=data))
    return tasks


def _wilson(k: int, n: int) -> Tuple[float, float]:
    z = 1.959963984540054
    p = k / n
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


@pytest.mark.slow
def test_a_task_from_include_path_through_fedmerge_eval(chain_model, chain_data, tmp_path):
    tasks, out, reference = _user_task(tmp_path), tmp_path / "out", tmp_path / "reference.json"
    reference.write_text(json.dumps({"my_qa": 0.8, "gsm8k": 0.5}))
    command = [
        str(Path(sys.executable).parent / "fedmerge"), "eval", str(chain_model), "--tasks", "gsm8k,my_qa", "--include-path", str(tasks),
        "--data-dir", str(chain_data), "--batch-size", "2", "--max-gen-toks", "64", "--output", str(out), "--reference", str(reference),
    ]
    # run outside any git checkout (lm-eval's `git describe` would print "fatal: not a git repository")
    assert subprocess.run(["git", "rev-parse"], cwd=tmp_path, capture_output=True).returncode != 0
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    # other libraries' noise stays out; lm-eval's generation bar is the one bar
    for noise in ("fatal: not a git repository", "Generating test split", "Loading weights", "WARNING", "it/s]\n  0%"):
        assert noise not in completed.stderr, noise
    assert "Running generate_until requests" in completed.stderr
    right = sum(label for _, label in USER_RECORDS)
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["my_qa"]["exact_match,get-answer"] == pytest.approx(right / len(USER_RECORDS))
    header = next(line for line in completed.stdout.splitlines() if line.startswith("| Model"))
    row = next(line for line in completed.stdout.splitlines() if line.startswith(f"| {chain_model.name}"))
    assert [c.strip() for c in header.strip("|").split("|")][-1] == "my_qa"
    assert [c.strip() for c in row.strip("|").split("|")][-1] == f"{100 * right / len(USER_RECORDS):.2f}"
    low, high = _wilson(right, len(USER_RECORDS))
    line = next(line for line in completed.stdout.splitlines() if line.startswith("my_qa:"))
    assert line == (
        f"my_qa: {100 * right / 5:.2f} [{100 * low:.2f}, {100 * high:.2f}] (95 % Wilson interval, 5 items); "
        f"normalized {right / 5 / 0.8:.3f} [{low / 0.8:.3f}, {high / 0.8:.3f}] (reference 80.00)"
    )
    gsm8k = _mean(label for _, label in CHAIN_DATA["gsm8k"])
    assert f"average normalized accuracy over gsm8k, my_qa: {(gsm8k / 0.5 + right / 5 / 0.8) / 2:.3f}" in completed.stdout


@pytest.mark.slow
def test_a_task_from_include_path_in_the_sweep(tmp_path):
    """The sweep's lm-eval evaluator on the same user task: base answers 8, the task model 7."""
    import yaml

    from fedmerge_plugins.sweep.evaluators import LmEvalEvaluator
    from fedmerge_plugins.sweep.run import run_sweep
    from tests.eval_fixtures import write_answer_pair

    base, task = write_answer_pair(tmp_path)
    recipe = tmp_path / "median.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "median", "base_model": str(base), "models": [{"model": str(task)}], "parameters": {"lambda": 1.0}}))
    evaluator = LmEvalEvaluator(["my_qa"], include_path=[str(_user_task(tmp_path))], batch_size=1, max_gen_toks=16, device="cpu")
    outcome = run_sweep(recipe, tmp_path / "out", evaluator, lambdas="0.2:1.0:0.4", echo=lambda line: None)
    share = lambda answer: sum(record["answer"] == answer for record, _ in USER_RECORDS) / len(USER_RECORDS)  # noqa: E731
    assert [(r["parameters"]["lambda"], r["scores"]) for r in outcome.records.values()] == [
        (0.2, {"my_qa": pytest.approx(share("8"))}), (0.6, {"my_qa": pytest.approx(share("7"))}), (1.0, {"my_qa": pytest.approx(share("7"))})
    ]
    assert outcome.best["parameters"] == {"lambda": 0.6}


@pytest.mark.slow
def test_stock_task_names_resolve_through_lm_evals_index():
    from fedmerge_plugins.evaluation.lm_eval_tasks import resolve_tasks

    assert resolve_tasks("gsm8k, arc_easy") == (("gsm8k", "arc_easy"), True)
    with pytest.raises(DataError, match="unknown evaluation task.*arc_eazy.*did you mean arc_easy"):
        resolve_tasks("arc_eazy")
    with pytest.raises(DataError, match="mmlu: an lm-eval group or tag"):
        resolve_tasks("mmlu")


def test_wilson_interval_and_reference_reading(tmp_path):
    from fedmerge_plugins.evaluation.intervals import read_reference, score_interval, wilson

    assert wilson(7, 10) == pytest.approx((0.3967781474611, 0.8922087325937), abs=1e-12)  # scipy binomtest(7, 10).proportion_ci("wilson")
    interval = score_interval([1.0] * 7 + [0.0] * 3)
    assert (interval.method, interval.items) == ("Wilson", 10) and (interval.low, interval.high) == pytest.approx(_wilson(7, 10))
    assert score_interval([0.5, 0.25, 1.0]).method == "bootstrap"
    (tmp_path / "r.json").write_text(json.dumps({"fedmerge_scores": {"gsm8k": 0.5}}))
    assert read_reference(tmp_path / "r.json") == {"gsm8k": 0.5}
    (tmp_path / "z.json").write_text(json.dumps({"gsm8k": 0}))
    with pytest.raises(DataError, match="reference score of gsm8k is 0"):
        read_reference(tmp_path / "z.json")


@pytest.mark.slow
def test_max_gen_toks_is_lowered_to_what_the_context_leaves(chain_model, chain_data, tmp_path, monkeypatch):
    import shutil

    from transformers import AutoTokenizer

    from fedmerge_plugins.evaluation.api import evaluate_model

    short = tmp_path / "short-context"
    shutil.copytree(chain_model, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 96}))
    tokenizer = AutoTokenizer.from_pretrained(str(short))
    records = [json.loads(line) for line in (chain_data / "gsm8k.jsonl").read_text().splitlines()]
    longest = max(len(tokenizer(prompts.gsm8k_prompt(record))["input_ids"]) for record in records)
    notes = []
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    result = evaluate_model(short, ("gsm8k",), data_dir=chain_data, max_gen_toks=256, batch_size=2, note=notes.append)
    assert notes == [f"note: --max-gen-toks lowered from 256 to {96 - longest}: short-context's context of 96 tokens less the longest gsm8k prompt"]
    first = min(result.raw["samples"]["fedmerge_gsm8k"], key=lambda sample: sample["doc_id"])
    assert first["arguments"][0][1]["max_gen_toks"] == 96 - longest
    assert result.scores["gsm8k"] == pytest.approx(_mean(label for _, label in CHAIN_DATA["gsm8k"]))


def test_the_sweep_refuses_to_select_on_a_lower_is_better_metric(monkeypatch, tmp_path):
    from fedmerge_plugins.errors import FedmergeError
    from fedmerge_plugins.evaluation import api
    from fedmerge_plugins.evaluation.lm_eval_tasks import PrimaryMetric
    from fedmerge_plugins.sweep.evaluators import LmEvalEvaluator

    metrics = {"gsm8k": PrimaryMetric("exact_match", "none", True)}
    monkeypatch.setattr(api, "evaluate_model", lambda model_dir, tasks, **options: api.EvalResult({"gsm8k": 0.5}, {}, metrics=dict(metrics)))
    (tmp_path / "gsm8k.jsonl").write_text("{}\n")
    evaluator = LmEvalEvaluator(["gsm8k"], data_dir=tmp_path)
    assert evaluator.evaluate(tmp_path) == {"gsm8k": 0.5}
    metrics["gsm8k"] = PrimaryMetric("perplexity", "none", False)
    with pytest.raises(FedmergeError, match=r"first metric of gsm8k \(perplexity\) is better when lower"):
        evaluator.evaluate(tmp_path)

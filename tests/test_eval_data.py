"""Task data (local JSONL, normalization, validation split), prompts, the results table and the
alpaca_eval output format. No model or lm-eval run here."""

from __future__ import annotations

import json

import pytest

from fedmerge_plugins.errors import DataError, FedmergeError, PathError
from fedmerge_plugins.evaluation import prompts
from fedmerge_plugins.evaluation.loaders import load_task_dataset, load_task_records, read_jsonl, split_indices
from fedmerge_plugins.evaluation.report import alpaca_eval_records, format_table, write_alpaca_eval_outputs
from fedmerge_plugins.evaluation.lm_eval_tasks import parse_names, resolve_tasks
from tests.eval_fixtures import write_jsonl

HEADER = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_prompts_are_the_papers():
    assert prompts.gsm8k_prompt({"question": "What is 2+2?"}) == (
        HEADER + "\n\n### Instruction:\nWhat is 2+2?\n\n### Response: Let's think step by step."
    )
    assert prompts.math_prompt({"problem": "Find $x$."}).endswith("### Instruction:\nFind $x$.\n\n### Response: Let's think step by step.")
    humaneval = prompts.humaneval_prompt({"prompt": "def f(x):\n    '''Double x.'''\n"})
    assert humaneval == (
        HEADER + "\n\n\n### Instruction:\nCreate a Python script for this problem:\ndef f(x):\n\t'''Double x.'''\n\n\n### Response:"
    )
    mbpp = prompts.mbpp_prompt({"task_id": "11", "text": "Write a function f.", "test_list": ["assert f(1) == 2", "assert f(2) == 4"]})
    assert mbpp == (
        HEADER + "\n\n\n### Instruction:\nCreate a Python script for this problem:\n\nWrite a function f.\n"
        "Test examples:\nassert f(1) == 2\nassert f(2) == 4\n\n### Response:"
    )
    long_tests = {"task_id": 493, "text": "Write a function.", "test_list": ["assert calculate_polygons(1,1, 4, 4, 3)==[[(-5.0, ...)]]"]}
    assert prompts.mbpp_problem(long_tests).endswith("Test examples:\ncalculate_polygons(startx, starty, endx, endy, radius)")
    assert prompts.instruct_prompt({"instruction": "Name a color."}) == (
        HEADER + "\n\n### Instruction:\nName a color.\n\n### Response:"
    )


def test_local_records_are_normalized(tmp_path):
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q1", "answer": "2 + 2 = 4\n#### 4"}, {"question": "q2", "answer": "1,200"}])
    write_jsonl(
        tmp_path / "math.jsonl",
        [{"problem": "p1", "solution": "so $\\boxed{\\frac{1}{2}}$."}, {"problem": "p2", "answer": "3"}],
    )
    write_jsonl(tmp_path / "mbpp.jsonl", [{"task_id": 11, "text": "t", "test_list": ["assert True"]}])
    write_jsonl(tmp_path / "humaneval.jsonl", [{"task_id": "HumanEval/0", "prompt": "p", "test": "t", "entry_point": "f"}])
    write_jsonl(tmp_path / "instruct.jsonl", [{"instruction": "i", "output": 5}])
    assert [r["reference"] for r in load_task_records("gsm8k", data_dir=tmp_path)] == ["4", "1200"]
    assert [r["reference"] for r in load_task_records("math", data_dir=tmp_path)] == ["\\frac{1}{2}", "3"]
    assert load_task_records("mbpp", data_dir=tmp_path) == [
        {"task_id": "11", "text": "t", "test_list": ["assert True"], "test_setup_code": ""}
    ]
    assert load_task_records("humaneval", data_dir=tmp_path)[0]["entry_point"] == "f"
    assert load_task_records("instruct", data_dir=tmp_path) == [{"instruction": "i", "output": "5"}]
    dataset = load_task_dataset("gsm8k", data_dir=str(tmp_path), version=1.0, pretrained="ignored")
    assert list(dataset) == ["test"] and dataset["test"]["reference"] == ["4", "1200"]


def test_bad_local_data_is_named(tmp_path):
    with pytest.raises(PathError, match="gsm8k.jsonl"):
        load_task_records("gsm8k", data_dir=tmp_path)
    write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "q", "answer": "#### 4"}, {"question": "q"}])
    with pytest.raises(FedmergeError, match=r"gsm8k.jsonl, record 2: missing field\(s\) answer"):
        load_task_records("gsm8k", data_dir=tmp_path)
    write_jsonl(tmp_path / "math.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(FedmergeError, match=r"math.jsonl, record 1: .*boxed"):
        load_task_records("math", data_dir=tmp_path)
    write_jsonl(tmp_path / "mbpp.jsonl", [{"task_id": 1, "text": "t", "test_list": "assert x"}])
    with pytest.raises(FedmergeError, match="mbpp.jsonl, record 1: test_list"):
        load_task_records("mbpp", data_dir=tmp_path)
    (tmp_path / "instruct.jsonl").write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(FedmergeError, match="instruct.jsonl, line 2: not JSON"):
        read_jsonl(tmp_path / "instruct.jsonl")
    with pytest.raises(FedmergeError, match="no public dataset"):
        load_task_records("instruct")
    write_jsonl(tmp_path / "instruct.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(FedmergeError, match=r"instruct.jsonl: 1 item\(s\) are too few"):
        load_task_records("instruct", data_dir=tmp_path, validation_fraction=0.05)


def test_validation_split_is_seeded_disjoint_and_complete(tmp_path):
    count = 164
    validation = split_indices(count, "validation", 0.05, seed=1234)
    test = split_indices(count, "test", 0.05, seed=1234)
    assert len(validation) == round(0.05 * count) == 8
    assert set(validation).isdisjoint(test) and sorted(validation + test) == list(range(count))
    assert test == sorted(test) and validation == sorted(validation)
    assert validation == split_indices(count, "validation", 0.05, seed=1234)
    assert validation != split_indices(count, "validation", 0.05, seed=99)
    assert split_indices(10, "validation", 0.01, seed=0) != []  # at least one item
    assert split_indices(5, "test", None, seed=0) == [0, 1, 2, 3, 4]
    assert split_indices(5, "validation", None, seed=0) == [0, 1, 2, 3, 4]  # a local file is the split
    from fedmerge_plugins.evaluation.loaders import check_split

    with pytest.raises(DataError, match="needs a validation fraction"):
        check_split("validation", None, local=False)
    with pytest.raises(FedmergeError, match="too few"):
        split_indices(1, "test", 0.5, seed=0)
    with pytest.raises(FedmergeError, match=r"\(0, 1\)"):
        split_indices(10, "test", 1.0, seed=0)
    records = [{"instruction": f"i{n}", "output": str(n)} for n in range(20)]
    write_jsonl(tmp_path / "instruct.jsonl", records)
    held_out = load_task_records("instruct", data_dir=tmp_path, split="validation", validation_fraction=0.25, seed=7)
    rest = load_task_records("instruct", data_dir=tmp_path, split="test", validation_fraction=0.25, seed=7)
    expected = split_indices(20, "validation", 0.25, seed=7)
    assert [r["output"] for r in held_out] == [str(n) for n in expected]
    assert len(rest) == 15 and {r["output"] for r in rest} | {r["output"] for r in held_out} == {str(n) for n in range(20)}


def test_task_list_parsing():
    assert parse_names("GSM8K, math,gsm8k") == ("gsm8k", "math")
    assert resolve_tasks(["mbpp", "instruct"]) == (("mbpp", "instruct"), False)
    assert parse_names("gsm8k, Arc_Easy") == ("gsm8k", "Arc_Easy")
    with pytest.raises(DataError, match="no evaluation task"):
        parse_names(" , ")


def test_table_layout():
    table = format_table(
        [(("Math+Code", "FedGMA"), {"gsm8k": 0.655, "math": 0.1266, "humaneval": 0.1585, "mbpp": 0.218})],
        ("Tasks", "Methods"),
    )
    lines = table.splitlines()
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == [
        "", "", "Mathematical Reasoning", "", "Code Generation", "", "Instruction Following"
    ]
    assert [cell.strip() for cell in lines[1].strip("|").split("|")] == [
        "Tasks", "Methods", "GSM8K", "MATH", "HumanEval", "MBPP", "Instruct"
    ]
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == [
        "Math+Code", "FedGMA", "65.50", "12.66", "15.85", "21.80", "/"
    ]
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError, match="do not match"):
        format_table([(("a",), {})], ("Tasks", "Methods"))


def test_alpaca_eval_outputs(tmp_path):
    samples = [
        {"doc_id": 1, "doc": {"instruction": "Second", "output": "x"}, "resps": [["  answer two\n"]]},
        {"doc_id": 0, "doc": {"instruction": "First", "output": "y"}, "resps": [["answer one"]]},
    ]
    assert alpaca_eval_records(samples, "merged") == [
        {"instruction": "First", "output": "answer one", "generator": "merged"},
        {"instruction": "Second", "output": "answer two", "generator": "merged"},
    ]
    path = write_alpaca_eval_outputs({"samples": {"fedmerge_instruct": samples}}, tmp_path / "out.json", "merged")
    assert json.loads(path.read_text())[0]["instruction"] == "First"
    with pytest.raises(ValueError, match="instruct"):
        write_alpaca_eval_outputs({"samples": {}}, tmp_path / "none.json", "merged")

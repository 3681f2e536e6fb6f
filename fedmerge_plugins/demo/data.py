"""Synthetic tasks and corpus for the demo, made deterministically from a seed.

Three tasks in the spirit of the paper's trio (instruction following, math, code), each
an lm-eval task of ``fedmerge_plugins.evaluation`` fed from JSONL:

- ``instruct``: short word instructions ("Reverse the order of these words: …"),
  scored by exact match of the first response line; JSONL ``{"instruction", "output"}``.
- ``gsm8k``: one-step grade-school word problems answered as ``… The answer is: N``;
  JSONL ``{"question", "answer"}`` with the answer in GSM8K's ``reasoning\\n#### N`` form.
- ``humaneval``: write a one-line Python function from its signature and docstring, checked
  by a test; JSONL ``{"task_id", "prompt", "test", "entry_point", "canonical_solution"}``.

Each task's items are enumerated, deduplicated by prompt, shuffled with the seed and split
into disjoint train / validation / test parts, so no test prompt is ever trained on.
The pre-training corpus mixes stories, arithmetic facts, word facts and small Python
functions, which hold the knowledge the tasks need but never the instruction format:
the base model learns *what* and the fine-tunes learn *how to answer*.

Prompts come from ``fedmerge_plugins.evaluation.prompts``, the functions the lm-eval task
configs in ``eval/`` call, so the task models are trained on exactly what they are asked.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from fedmerge_plugins.evaluation import prompts

TASKS = ("instruct", "gsm8k", "humaneval")
TASK_LABELS = {"instruct": "instruction", "gsm8k": "math", "humaneval": "code"}

Record = Dict[str, str]

NAMES = ("Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Zoe", "Leo", "Emma")
PRONOUNS = {"Tom": "He", "Ben": "He", "Sam": "He", "Max": "He", "Leo": "He"}
OBJECTS = ("apples", "pens", "books", "cards", "coins", "stones", "cups", "eggs", "shells", "stamps")
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain", "hat", "box", "road")
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("fast", "slow"),
    ("old", "new"), ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("early", "late"),
    ("wet", "dry"), ("high", "low"), ("hard", "soft"), ("full", "empty"), ("left", "right"),
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def pronoun(name: str) -> str:
    return PRONOUNS.get(name, "She")


# ----------------------------------------------------------------------------- prompts


# Every response starts on a new line, as Alpaca-style models answer after "### Response:".
def instruct_response(record: Mapping[str, str]) -> str:
    return "\n" + record["output"]


def gsm8k_response(record: Mapping[str, str]) -> str:
    reasoning, number = record["answer"].split("\n#### ")
    return f"\n{reasoning} The answer is: {number}"


def humaneval_response(record: Mapping[str, str]) -> str:
    signature = record["prompt"].splitlines()[0]
    return f"\n{signature}\n{record['canonical_solution'].rstrip()}"


# the evaluation's own prompt builders, so the task models learn exactly what they are asked
PROMPTS: Dict[str, Callable[[Mapping[str, str]], str]] = {
    "instruct": prompts.instruct_prompt,
    "gsm8k": prompts.gsm8k_prompt,
    "humaneval": prompts.humaneval_prompt,
}
RESPONSES: Dict[str, Callable[[Mapping[str, str]], str]] = {
    "instruct": instruct_response,
    "gsm8k": gsm8k_response,
    "humaneval": humaneval_response,
}


def training_pair(task: str, record: Mapping[str, str]) -> Tuple[str, str]:
    """(prompt as the evaluation sends it, the response a task model is trained to write)."""
    return PROMPTS[task](record), RESPONSES[task](record)


# ----------------------------------------------------------------------------- instruct


def _instruct_records() -> Iterator[Record]:
    for a, b, c in itertools.permutations(WORDS, 3):
        yield {"instruction": f"Reverse the order of these words: {a} {b} {c}", "output": f"{c} {b} {a}"}
        yield {"instruction": f"Join these words with a dash: {a} {b} {c}", "output": f"{a}-{b}-{c}"}
    for words in itertools.permutations(WORDS[:10], 4):
        text = " ".join(words)
        yield {"instruction": f"Write the first word of this list: {text}", "output": words[0]}
        yield {"instruction": f"Write the last word of this list: {text}", "output": words[-1]}
    for word, count in itertools.product(WORDS, (2, 3, 4)):
        yield {"instruction": f"Repeat the word {word} {NUMBER_WORDS[count]} times.", "output": " ".join([word] * count)}
    for pair in OPPOSITES:
        for word, other in (pair, pair[::-1]):
            yield {"instruction": f"Give the opposite of the word {word}.", "output": other}
            yield {"instruction": f"What is the opposite of {word}?", "output": other}


# ----------------------------------------------------------------------------- math

MATH_TEMPLATES = (
    ("+", "{name} has {a} {obj}. {he} buys {b} more {obj}. How many {obj} does {name} have now?"),
    ("+", "{name} had {a} {obj} and found {b} more. How many {obj} does {name} have?"),
    ("-", "{name} has {a} {obj}. {he} gives {b} {obj} to {other}. How many {obj} does {name} have left?"),
    ("-", "{name} had {a} {obj} and lost {b} of them. How many {obj} are left?"),
)


def _math_records() -> Iterator[Record]:
    for (op, template), name, obj, a, b in itertools.product(MATH_TEMPLATES, NAMES, OBJECTS, range(2, 21), range(1, 10)):
        if op == "-" and b >= a:
            continue
        value = a + b if op == "+" else a - b
        other = NAMES[(NAMES.index(name) + 1) % len(NAMES)]
        question = template.format(name=name, he=pronoun(name), obj=obj, a=a, b=b, other=other)
        yield {"question": question, "answer": f"{a} {op} {b} = {value}.\n#### {value}"}


# ----------------------------------------------------------------------------- code

NUMERIC_ARGS = ("x", "n", "value", "number", "a", "num")
LIST_ARGS = ("xs", "items", "values", "numbers", "data", "nums")
# (function names, docstring, body, argument kind); {k}/{kw} are the constant and its word
CONSTANT_FUNCTIONS = (
    (("add_{kw}", "plus_{kw}"), "Return {a} plus {kw}.", "return {a} + {k}", range(1, 10)),
    (("subtract_{kw}", "minus_{kw}"), "Return {a} minus {kw}.", "return {a} - {k}", range(1, 10)),
    (("times_{kw}", "multiply_by_{kw}"), "Return {a} times {kw}.", "return {a} * {k}", range(2, 10)),
    (("greater_than_{kw}", "above_{kw}"), "Return True if {a} is greater than {kw}.", "return {a} > {k}", range(1, 10)),
    (("less_than_{kw}", "below_{kw}"), "Return True if {a} is less than {kw}.", "return {a} < {k}", range(1, 10)),
)
NUMERIC_FUNCTIONS = (
    ("is_even", "Return True if {a} is even.", "return {a} % 2 == 0"),
    ("is_odd", "Return True if {a} is odd.", "return {a} % 2 == 1"),
    ("is_positive", "Return True if {a} is greater than zero.", "return {a} > 0"),
    ("is_negative", "Return True if {a} is less than zero.", "return {a} < 0"),
    ("square", "Return {a} times itself.", "return {a} * {a}"),
    ("double", "Return two times {a}.", "return {a} * 2"),
    ("negate", "Return minus {a}.", "return -{a}"),
    ("absolute", "Return the absolute value of {a}.", "return abs({a})"),
)
LIST_FUNCTIONS = (
    ("first_item", "Return the first element of {a}.", "return {a}[0]"),
    ("last_item", "Return the last element of {a}.", "return {a}[-1]"),
    ("count_items", "Return the number of elements in {a}.", "return len({a})"),
    ("total", "Return the sum of {a}.", "return sum({a})"),
    ("largest", "Return the largest element of {a}.", "return max({a})"),
    ("smallest", "Return the smallest element of {a}.", "return min({a})"),
    ("reverse_list", "Return {a} in reverse order.", "return {a}[::-1]"),
    ("sort_list", "Return {a} sorted from small to large.", "return sorted({a})"),
)
NUMERIC_CASES = (3, -2, 0, 7)
LIST_CASES = ([3, 1, 2], [5], [-4, 9, 0, 2])


def _code_record(name: str, doc: str, body: str, arg: str, cases: Sequence[object]) -> Record:
    prompt = f'def {name}({arg}):\n    """{doc}"""\n'
    solution = f"    {body}\n"
    namespace: Dict[str, object] = {}
    exec(prompt + solution, namespace)  # noqa: S102 - our own generated one-liners
    function = namespace[name]
    asserts = "".join(f"    assert candidate({case!r}) == {function(list(case) if isinstance(case, list) else case)!r}\n" for case in cases)
    return {
        "task_id": f"demo/{name}/{arg}",
        "prompt": prompt,
        "canonical_solution": solution,
        "test": f"def check(candidate):\n{asserts}",
        "entry_point": name,
    }


def _code_functions() -> Iterator[Tuple[str, str, str, str, Sequence[object]]]:
    """(name, docstring, body, argument, test inputs) of every code item."""
    for names, doc, body, constants in CONSTANT_FUNCTIONS:
        for pattern, k, arg in itertools.product(names, constants, NUMERIC_ARGS):
            fields = {"a": arg, "k": k, "kw": NUMBER_WORDS[k]}
            yield pattern.format(**fields), doc.format(**fields), body.format(**fields), arg, NUMERIC_CASES
    for (name, doc, body), arg in itertools.product(NUMERIC_FUNCTIONS, NUMERIC_ARGS):
        yield name, doc.format(a=arg), body.format(a=arg), arg, NUMERIC_CASES
    for (name, doc, body), arg in itertools.product(LIST_FUNCTIONS, LIST_ARGS):
        yield name, doc.format(a=arg), body.format(a=arg), arg, LIST_CASES


def _code_records() -> Iterator[Record]:
    for name, doc, body, arg, cases in _code_functions():
        yield _code_record(name, doc, body, arg, cases)


RECORD_SOURCES: Dict[str, Callable[[], Iterator[Record]]] = {
    "instruct": _instruct_records,
    "gsm8k": _math_records,
    "humaneval": _code_records,
}
PROMPT_KEYS = {"instruct": "instruction", "gsm8k": "question", "humaneval": "prompt"}


# ----------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Splits:
    """Disjoint train / validation / test records of one task."""

    train: List[Record]
    validation: List[Record]
    test: List[Record]


def task_splits(task: str, n_validation: int, n_test: int, seed: int) -> Splits:
    """Every item of ``task`` shuffled with ``seed``: the first n_test are the test part,
    the next n_validation the validation part, the rest the training part."""
    records = {r[PROMPT_KEYS[task]]: r for r in RECORD_SOURCES[task]()}
    ordered = [records[key] for key in sorted(records)]
    random.Random(f"{seed}/{task}").shuffle(ordered)
    if n_test + n_validation >= len(ordered):
        raise ValueError(f"task {task} has {len(ordered)} items; {n_test} test + {n_validation} validation leave none to train on")
    return Splits(
        train=ordered[n_test + n_validation :],
        validation=ordered[n_test : n_test + n_validation],
        test=ordered[:n_test],
    )


def write_jsonl(path: Path, records: Sequence[Mapping[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


def write_eval_data(directory: Path, splits: Mapping[str, Splits], part: str) -> Path:
    """``directory/{task}.jsonl`` for each task from the ``part`` split ("validation"/"test")."""
    for task, task_splits_ in splits.items():
        write_jsonl(directory / f"{task}.jsonl", getattr(task_splits_, part))
    return directory


# ----------------------------------------------------------------------------- corpus


def _story(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    a, b = rng.randint(2, 20), rng.randint(1, 9)
    return rng.choice(
        (
            f"{name} has {a} {obj}.",
            f"{name} and {other} like {obj}.",
            f"{pronoun(name)} keeps {b} {obj} in a box.",
            f"{name} gives {other} some {obj}.",
            f"{other} buys {b} {obj} at the shop.",
            f"{name} finds {b} {obj} on the {rng.choice(WORDS)}.",
            f"{name} counts the {obj}: there are {a}.",
        )
    )


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(2, 20), rng.randint(1, 9)
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b}."
    a, b = max(a, b + 1), b
    return f"{a} - {b} = {a - b}."


def _word_fact(rng: random.Random) -> str:
    word, other = rng.choice(OPPOSITES)[:: rng.choice((1, -1))]
    k = rng.randint(0, 9)
    a, b, c, d = rng.sample(WORDS, 4)
    return rng.choice(
        (
            f"The opposite of {word} is {other}.",
            f"{word.capitalize()} and {other} are opposites.",
            f"{NUMBER_WORDS[k].capitalize()} is {k}.",
            f"Words: {a} {b} {c}. Backwards: {c} {b} {a}.",
            f"In the list {a} {b} {c} {d}, {a} comes first and {d} comes last.",
            f"{a}, {b} and {c} make {a}-{b}-{c}.",
            f"Say {a} {NUMBER_WORDS[k % 3 + 2]} times: {' '.join([a] * (k % 3 + 2))}.",
        )
    )


def _python(rng: random.Random) -> str:
    name, _, body, arg, cases = rng.choice(list(_CODE_FUNCTIONS))
    case = rng.choice(cases)
    return f"def {name}({arg}):\n    {body}\n\nprint({name}({case!r}))\n"


_CODE_FUNCTIONS = tuple(_code_functions())
CORPUS_PARTS: Tuple[Callable[[random.Random], str], ...] = (_story, _arithmetic, _word_fact)


def pretraining_document(rng: random.Random) -> str:
    """One document: a Python snippet (one in four) or five to eight mixed sentences."""
    if rng.random() < 0.25:
        return _python(rng)
    return " ".join(rng.choice(CORPUS_PARTS)(rng) for _ in range(rng.randint(5, 8)))


def pretraining_corpus(n_documents: int, seed: int, formatted: Optional[Mapping[str, Sequence[str]]] = None, format_share: float = 0.0) -> List[str]:
    """``n_documents`` documents; a ``format_share`` of them (on average) are texts in a task's
    own prompt-and-response format (``formatted``: task -> its training items only), the task
    drawn uniformly, as Llama-2 saw some math and code before anyone fine-tuned it."""
    rng = random.Random(f"{seed}/corpus")
    tasks = sorted(task for task, texts in (formatted or {}).items() if texts)
    documents = []
    for _ in range(n_documents):
        if tasks and rng.random() < format_share:
            documents.append(rng.choice(formatted[rng.choice(tasks)]))  # type: ignore[index]
        else:
            documents.append(pretraining_document(rng))
    return documents

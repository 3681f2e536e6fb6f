"""Answer extraction (GSM8K, MATH, instruct) and the MATH paper's LaTeX equivalence."""

from __future__ import annotations

from fractions import Fraction

import pytest

from fedmerge_plugins.evaluation.answers import (
    extract_gsm8k_answer,
    extract_math_answer,
    first_line,
    gsm8k_correct,
    gsm8k_reference,
    instruct_correct,
    is_equiv,
    last_boxed_only_string,
    math_correct,
    math_reference,
    parse_number,
    remove_boxed,
    strip_string,
    text_after_answer_marker,
)

WIZARDMATH_GSM8K = (
    "Step 1: Calculate the number of eggs Janet has left after breakfast.\n"
    "Janet's ducks lay 16 eggs per day, and she eats 3 for breakfast, so she has 16 - 3 = 13 eggs left.\n\n"
    "Step 2: She bakes muffins with 4, so 13 - 4 = 9 eggs remain.\n\n"
    "Step 3: She sells them for $2 each: 9 * $2 = $18.\n\n"
    "The answer is: 18."
)


@pytest.mark.parametrize(
    "generation, expected",
    [
        (WIZARDMATH_GSM8K, "18"),
        ("So the total cost is $1,250.\nThe answer is: $1,250.", "1250"),
        ("The answer is: 1,234,567", "1234567"),
        ("The answer is: -42 degrees.", "-42"),
        ("The answer is: 3.50 dollars", "3.50"),
        ("The answer is: 3/4 of the cake", "3/4"),
        ("The answer is 7", "7"),  # no colon
        ("The answer is: 5. Wait, recompute. The answer is: 6.", "6"),  # the last marker counts
        ("The answer is: x = 12", "12"),
        ("I think it is 18.", None),  # no marker
        ("The answer is: unknown.", None),  # no number
    ],
)
def test_gsm8k_extraction(generation, expected):
    assert extract_gsm8k_answer(generation) == expected


def test_gsm8k_reference_and_comparison_by_value():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert gsm8k_reference(solution) == "72"
    assert gsm8k_reference("#### 1,080") == "1080"
    assert gsm8k_reference("  5 ") == "5"
    with pytest.raises(ValueError, match="not a number"):
        gsm8k_reference("#### many")
    assert gsm8k_correct(WIZARDMATH_GSM8K, "18")
    assert gsm8k_correct("The answer is: 18.00", "18")  # equal value
    assert gsm8k_correct("The answer is: $1,080.", "1080")
    assert not gsm8k_correct("The answer is: 18.5", "18")  # DARE rounds this to 18; exact here
    assert not gsm8k_correct("The answer is: 19", "18")
    assert not gsm8k_correct("Eighteen.", "18")
    assert parse_number("$1,234.50") == Fraction(2469, 2)
    assert parse_number("abc") is None


def test_answer_marker():
    # the last marker with a colon wins; the colon-less form counts only when there is none
    assert text_after_answer_marker("a The answer is: b The answer is c") == "b The answer is c"
    assert text_after_answer_marker("a The answer is: b The answer is: c") == "c"
    assert text_after_answer_marker("a The answer is b The answer is c") == "c"
    assert text_after_answer_marker("no marker") is None


@pytest.mark.parametrize(
    "generation, expected",
    [
        # a formal answer, then an informal check that quotes other numbers
        ("Tom has 3 apples and buys 4 more. 3 + 4 = 7.\nThe answer is: 7\n\nThe answer is correct since 3 + 4 = 7.", "7"),
        ("48 / 2 = 24 clips in May. 48 + 24 = 72.\nThe answer is: 72.\nI hope the answer is helpful: 1 question solved.", "72"),
        # two formal answers: the model corrected itself, the last one counts
        ("So 5 * 6 = 30. The answer is: 30\nWait, 5 * 7 = 35. The answer is: 35", "35"),
        # only informal markers (the documented leniency): the last one
        ("I think the answer is 12, no, the answer is 14.", None),  # lower-case "the" is no marker
        ("First guess. The answer is 12. Checking again, The answer is 14.", "14"),
    ],
)
def test_formal_marker_wins_over_later_informal(generation, expected):
    assert extract_gsm8k_answer(generation) == expected


def test_math_formal_marker_wins():
    generation = "We get $x = \\frac{1}{2}$.\nThe answer is: \\frac{1}{2}.\nThe answer is easy to check by substitution."
    assert extract_math_answer(generation) == "\\frac{1}{2}"


@pytest.mark.parametrize(
    "solution, expected",
    [
        ("We find $x = 3$, so the answer is $\\boxed{3}$.", "3"),
        ("Thus $\\boxed{\\frac{\\sqrt{3}}{2}}$ and not $\\boxed{1}$ first.", "1"),  # the last box
        ("Hence \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("Answer: \\fbox{5}", "5"),
    ],
)
def test_math_reference(solution, expected):
    assert math_reference(solution) == expected


def test_boxed_helpers():
    assert last_boxed_only_string("x \\boxed{a{b}c} y") == "\\boxed{a{b}c}"
    assert last_boxed_only_string("\\boxed{unclosed") is None
    assert last_boxed_only_string("no box") is None
    assert last_boxed_only_string("so \\boxed 5$ done") == "\\boxed 5"
    assert remove_boxed("\\boxed 5") == "5"
    assert remove_boxed("\\boxed{x}") == "x"
    assert remove_boxed("x") is None
    with pytest.raises(ValueError, match="boxed"):
        math_reference("the answer is 5")


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("First, ... Therefore the probability is 1/2.\nThe answer is: \\frac{1}{2}.", "\\frac{1}{2}"),
        ("The answer is: 10.\n\nExplanation follows.", "10"),
        ("The answer is: 3.5", "3.5"),  # a decimal point is not a sentence end
        ("The answer is: $\\sqrt{2}$.", "\\sqrt{2}"),
        ("The answer is: \\boxed{(1, 2)}.", "(1, 2)"),
        ("The answer is \\text{(C)}", "\\text{(C)}"),
        ("no marker at all", None),
    ],
)
def test_math_extraction(generation, expected):
    assert extract_math_answer(generation) == expected


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("\\frac12", "\\frac{1}{2}"),
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("\\tfrac1{72}", "\\frac{1}{72}"),
        ("\\frac{72}1", "\\frac{72}1"),  # the original leaves this one alone
        ("0.5", "\\frac{1}{2}"),
        (".5", "\\frac{1}{2}"),
        ("3/4", "\\frac{3}{4}"),
        ("\\sqrt3", "\\sqrt{3}"),
        ("2\\sqrt3+1", "2\\sqrt{3}+1"),
        ("x = 5", "5"),
        ("10 \\text{ cm}", "10"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("\\$18.50", "18.50"),
        ("50\\%", "50"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("1\\!000", "1000"),
        ("\\\\frac{1}{3}", "\\frac{1}{3}"),
    ],
)
def test_strip_string(raw, normalized):
    assert strip_string(raw) == normalized


@pytest.mark.parametrize(
    "predicted, reference, equal",
    [
        ("\\frac12", "\\frac{1}{2}", True),
        ("1/2", "\\frac{1}{2}", True),
        ("0.5", "\\dfrac{1}{2}", True),
        ("k = 7", "7", True),
        ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("5 \\text{ inches}", "5", True),
        ("0.50", "\\frac{1}{2}", False),  # only the literal 0.5 is rewritten
        ("7.0", "7", False),  # string comparison, as in the original
        ("x^2+1", "x^2 + 1", True),
        ("\\sqrt{2}", "\\sqrt{3}", False),
        ("a \\text{ b} \\text{ c}", "a \\text{ b} \\text{ c}", True),  # units with two \text{ : raw equality
        ("a \\text{ b} \\text{ c}", "a", False),
        (None, "3", False),
        (None, None, True),
    ],
)
def test_is_equiv(predicted, reference, equal):
    assert is_equiv(predicted, reference) is equal


def test_math_correct_from_generations():
    generation = (
        "We need $\\sin 30^\\circ$. From the unit circle, this is $\\frac{1}{2}$.\n"
        "The answer is: \\frac{1}{2}.\n\n"
    )
    assert math_correct(generation, math_reference("Thus the value is $\\boxed{\\frac{1}{2}}$."))
    assert math_correct("The answer is: 1/2", "\\frac{1}{2}")
    assert not math_correct("The answer is: 2", "\\frac{1}{2}")
    assert not math_correct("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")  # no answer marker


def test_instruct_first_line_case_insensitive():
    assert first_line("\n\n  Paris\nIt is the capital.") == "Paris"
    assert first_line("   ") == ""
    assert instruct_correct(" PARIS \nmore", "paris")
    assert not instruct_correct("The capital is Paris.", "Paris")
    assert not instruct_correct("", "Paris")

"""Reading answers out of generations and comparing them with the reference.

GSM8K and MATH follow the DARE paper's evaluation code (Yu et al., 2024), which the paper uses:
the answer is the text after the last "The answer is: ". GSM8K answers are numbers compared by
value; MATH answers are compared as strings after ``strip_string``, the LaTeX normalization of
the MATH paper's ``is_equiv`` (Hendrycks et al., 2021), re-implemented here.

Deliberate differences from DARE's code, all on the lenient side of wrong-format answers:
"The answer is" without the colon is accepted, but only when no marker with a colon is there:
the last formal "The answer is: N" wins over any later informal "The answer is correct since
…" (DARE itself reads only the colon form); GSM8K numbers are compared exactly (DARE rounds
the prediction to an integer first, so "12.5" counted as 12); "1,234,567" is read whole;
a MATH answer wrapped in ``$...$`` or ``\\boxed{...}`` is unwrapped; ``_fix_a_slash_b`` also
tolerates non-integer parts instead of falling back to raw string equality.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

FORMAL_MARKER = re.compile(r"The answer is: ?")
INFORMAL_MARKER = re.compile(r"The answer is ?")
_NUMBER = re.compile(r"[-+]?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s?/\s?\d[\d,]*)?")


def text_after_answer_marker(generation: str) -> Optional[str]:
    """The text after the last "The answer is: "; without any marker with a colon, after the
    last "The answer is "; None without either."""
    for marker in (FORMAL_MARKER, INFORMAL_MARKER):
        matches = list(marker.finditer(generation))
        if matches:
            return generation[matches[-1].end() :]
    return None


# ----------------------------------------------------------------------------- GSM8K


def parse_number(text: str) -> Optional[Fraction]:
    """``"$1,234.50"``, ``"-3"``, ``"3/4"`` -> exact value; None when ``text`` is not a number."""
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def extract_gsm8k_answer(generation: str) -> Optional[str]:
    """The first number after the answer marker, with ``$``, commas and spaces removed
    (``"The answer is: $1,200."`` -> ``"1200"``); None if there is no marker or number."""
    tail = text_after_answer_marker(generation)
    if tail is None:
        return None
    match = _NUMBER.search(tail)
    if match is None:
        return None
    return match.group().replace("$", "").replace(",", "").replace(" ", "")


def gsm8k_reference(answer: str) -> str:
    """GSM8K's ``answer`` field (worked solution ending ``#### 42``) or a bare number -> ``"42"``."""
    final = answer.rsplit("####", 1)[-1]
    cleaned = final.strip().replace("$", "").replace(",", "").rstrip(".").strip()
    if parse_number(cleaned) is None:
        raise ValueError(f"GSM8K answer {final.strip()!r} is not a number")
    return cleaned


def gsm8k_correct(generation: str, reference: str) -> bool:
    predicted = extract_gsm8k_answer(generation)
    if predicted is None:
        return False
    value = parse_number(predicted)
    return value is not None and value == parse_number(reference)


# ----------------------------------------------------------------------------- MATH


def last_boxed_only_string(text: str) -> Optional[str]:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in ``text``, braces balanced."""
    index = text.rfind("\\boxed")
    if index < 0:
        index = text.rfind("\\fbox")
        if index < 0:
            return None
    if text.startswith("\\boxed ", index):
        return "\\boxed " + text[index + len("\\boxed ") :].split("$")[0]
    depth = 0
    for position in range(index, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[index : position + 1]
    return None


def remove_boxed(boxed: Optional[str]) -> Optional[str]:
    """``\\boxed{x}`` -> ``x`` (also ``\\fbox{x}`` and ``\\boxed x``); None if not of that form."""
    if boxed is None:
        return None
    if boxed.startswith("\\boxed "):
        return boxed[len("\\boxed ") :]
    for left in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(left) and boxed.endswith("}"):
            return boxed[len(left) : -1]
    return None


def math_reference(solution: str) -> str:
    """The final answer of a MATH solution: the content of its last ``\\boxed{...}``."""
    answer = remove_boxed(last_boxed_only_string(solution))
    if answer is None:
        raise ValueError("MATH solution has no \\boxed{...} answer")
    return answer


def extract_math_answer(generation: str) -> Optional[str]:
    """DARE's reading: after the last answer marker, up to the first ".\\n", without a final
    period; then an enclosing ``\\boxed{}`` or ``$...$`` is removed."""
    tail = text_after_answer_marker(generation)
    if tail is None:
        return None
    answer = tail.split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1].strip()
    unboxed = remove_boxed(last_boxed_only_string(answer))
    if unboxed is not None:
        answer = unboxed
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer


def _fix_fracs(string: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1b`` -> ``\\frac{1}{b}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``."""
    pieces = string.split("\\frac")
    result = pieces[0]
    for piece in pieces[1:]:
        result += "\\frac"
        if piece.startswith("{"):
            result += piece
            continue
        if len(piece) < 2:
            return string
        numerator, rest = piece[0], piece[1:]
        if rest[0] != "{":
            result += "{" + numerator + "}{" + rest[0] + "}" + rest[1:]
        else:
            result += "{" + numerator + "}" + rest
    return result


def _fix_a_slash_b(string: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are plain integers."""
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{numerator}/{denominator}":
        return string
    return "\\frac{" + str(numerator) + "}{" + str(denominator) + "}"


def _remove_right_units(string: str) -> str:
    """``5 \\text{ cm}`` -> ``5 `` (in MATH, ``"\\text{ "`` only ever introduces units)."""
    if "\\text{ " in string:
        parts = string.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("more than one unit")
        return parts[0]
    return string


def _fix_sqrt(string: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    pieces = string.split("\\sqrt")
    result = pieces[0]
    for piece in pieces[1:]:
        if piece and piece[0] != "{":
            result += "\\sqrt{" + piece[0] + "}" + piece[1:]
        else:
            result += "\\sqrt" + piece
    return result


def strip_string(string: str) -> str:
    """The MATH paper's answer normalization (``math_equivalence.strip_string``)."""
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    # " 0." is the same as " ." and "{0." as "{."; a leading "." gets its 0
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # "k = 3" -> "3" when the left side is short
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        string = sides[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def is_equiv(first: Optional[str], second: Optional[str]) -> bool:
    """The MATH paper's ``is_equiv``: equal after ``strip_string`` (raw equality if that fails)."""
    if first is None or second is None:
        return first is None and second is None
    try:
        return strip_string(first) == strip_string(second)
    except Exception:  # a malformed answer: compare as given, like the original
        return first == second


def math_correct(generation: str, reference: str) -> bool:
    predicted = extract_math_answer(generation)
    return predicted is not None and is_equiv(predicted, reference)


# ----------------------------------------------------------------------------- instruct


def first_line(generation: str) -> str:
    """The first non-empty line of ``generation``, stripped."""
    for line in generation.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def instruct_correct(generation: str, reference: str) -> bool:
    """Case-insensitive exact match of the generation's first line against the reference."""
    return first_line(generation).casefold() == reference.strip().casefold()

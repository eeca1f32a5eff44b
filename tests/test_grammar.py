"""The specification of the arithmetic language, as tests of grammar.py.

Read top to bottom: the original project's examples, Python's precedence and semantics,
the exact error texts, the limits, and then three properties checked by Hypothesis on
generated lines:

- the fast path gives exactly what the pyparsing grammar, the definition of the language,
  gives: ``evaluate_flat`` the same values on the flat form, and ``fast_tokens`` takes
  exactly the lines ``parse_line`` parses, where ``evaluate_tokens`` gives what
  ``evaluate`` gives (values, error texts, and which of several faults is reported); every
  other line is the grammar's to answer, with its message and column;
- random expression trees, rendered to text with the fewest parentheses Python needs
  (plus some redundant ones), give what Python's own operators compute when a small
  reference in this file walks the tree.  It reads no text, so it checks the grammar's
  precedence and associativity, which the first property cannot (both of grammar.py's
  evaluators could share a mistake there);
- no text at all makes ``evaluate_line`` raise, or answer with more than one line or with
  text that UTF-8 cannot encode.

How fast the lines of each kind answer is measured by ``make bench``, not here.
"""

from __future__ import annotations

import contextlib
import math
import operator
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Union

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fastpath
import grammar
from grammar import evaluate_line
from test_bluserver import ORIGINAL_EXAMPLES
from tests.harness import run_python

DIVISION_BY_ZERO = "error: division by zero"
TOO_MANY_DIGITS = "error: number too large (over 4300 digits)"
FLOAT_TOO_LARGE = "error: number too large for a float"
COMPLEX_RESULT = "error: complex result"
TOO_DEEPLY_NESTED = "error: too deeply nested"


@pytest.fixture(autouse=True, scope="module")
def worker_interpreter_limits() -> Iterator[None]:
    """The limits a worker process sets before it evaluates (worker.py), so that the
    nesting and digit tests here mean what a worker does."""
    recursion_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(grammar.RECURSION_LIMIT)
    if hasattr(sys, "set_int_max_str_digits"):  # Python 3.11+, 3.10.7+, 3.9.14+
        digits_limit = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(grammar.MAX_INT_DIGITS)
    yield
    sys.setrecursionlimit(recursion_limit)
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(digits_limit)


@contextlib.contextmanager
def worker_recursion_limit() -> Iterator[None]:
    """The recursion limit a worker sets, for the body of a Hypothesis test: around each example
    Hypothesis sets its own (2,000 frames past its depth), too few for MAX_NESTING groups."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(grammar.RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(limit)


def is_one_line(text: str) -> bool:
    """True if text holds no line break of any kind str.splitlines knows."""
    return text.splitlines() == ([text] if text else [])


# --- Examples: each table is one behaviour, each row one case. ----------------------


@pytest.mark.parametrize(
    ("line", "expected"), ORIGINAL_EXAMPLES.values(), ids=ORIGINAL_EXAMPLES.keys()
)
def test_original_examples_give_bit_identical_results(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


PYTHON_SEMANTICS = [
    pytest.param("-2 ** 2", "-4", id="power-binds-tighter-than-sign-on-its-left"),
    pytest.param("2 ** -1", "0.5", id="sign-on-the-right-of-power"),
    pytest.param("2 ** 3 ** 2", "512", id="power-is-right-associative"),
    pytest.param("(2 ** 3) ** 2", "64", id="parentheses-override-associativity"),
    pytest.param("1 + 2 * 3", "7", id="product-before-sum"),
    pytest.param("(1 + 2) * 3", "9", id="parentheses-before-product"),
    pytest.param("8 - 4 - 2", "2", id="minus-is-left-associative"),
    pytest.param("8 / 4 / 2", "1.0", id="true-division-is-left-associative"),
    pytest.param("7 // 2", "3", id="floor-division"),
    pytest.param("-7 // 2", "-4", id="floor-division-rounds-down"),
    pytest.param("7 % -3", "-2", id="modulo-has-sign-of-divisor"),
    pytest.param("7.5 // 2", "3.0", id="floor-division-of-float-is-float"),
    pytest.param("7.5 % 2", "1.5", id="modulo-of-float"),
    pytest.param("6 / 3", "2.0", id="true-division-gives-float"),
    pytest.param("0.1 + 0.2", "0.30000000000000004", id="float-rounding-as-python"),
    pytest.param("-0.0", "-0.0", id="negative-zero"),
    pytest.param("0 ** 0", "1", id="zero-to-the-zero"),
    pytest.param("2 ** 0.5", "1.4142135623730951", id="float-exponent"),
    pytest.param("+-+1", "-1", id="chained-unary-signs"),
    pytest.param("1 - -1", "2", id="sign-after-binary-minus"),
    pytest.param("2 * -3", "-6", id="sign-after-product"),
    pytest.param("007", "7", id="leading-zeros"),
    pytest.param("0.05", "0.05", id="decimal"),
    pytest.param("\t1\t+\t2\t", "3", id="tabs-between-tokens"),
    pytest.param(" ( 1 + 2 ) * 3 ", "9", id="spaces-around-parentheses"),
    pytest.param("2**3", "8", id="no-spaces"),
    pytest.param("1 ** 99999999999999", "1", id="one-to-a-huge-power"),
    pytest.param("(-1) ** 99999999999999", "-1", id="minus-one-to-a-huge-odd-power"),
    pytest.param("(-1) ** 99999999999998", "1", id="minus-one-to-a-huge-even-power"),
    pytest.param("2 ** -99999999999", "0.0", id="underflow-is-zero-as-python"),
]


@pytest.mark.parametrize(("line", "expected"), PYTHON_SEMANTICS)
def test_arithmetic_follows_python_precedence_and_semantics(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


@pytest.mark.parametrize("line", ["", " ", "\t", " \t  \t"])
def test_blank_line_gives_empty_result(line: str) -> None:
    assert evaluate_line(line) == ""


ERRORS = [
    pytest.param("1 ^ 2", "error: unexpected '^' at column 3", id="unknown-operator"),
    pytest.param("(1 + 2", "error: missing ')' at column 7", id="missing-parenthesis"),
    pytest.param("((1)", "error: missing ')' at column 5", id="missing-outer-parenthesis"),
    pytest.param("1)", "error: unexpected ')' at column 2", id="extra-parenthesis"),
    pytest.param("()", "error: unexpected ')' at column 2", id="empty-parentheses"),
    pytest.param("1 2", "error: unexpected '2' at column 3", id="missing-operator"),
    pytest.param("2 * * 3", "error: unexpected '*' at column 5", id="split-power-operator"),
    pytest.param("1 +", "error: unexpected end of line at column 4", id="missing-operand"),
    pytest.param(
        "1 + ", "error: unexpected end of line at column 5", id="missing-operand-before-space"
    ),
    pytest.param("-", "error: unexpected end of line at column 2", id="lone-sign"),
    pytest.param("5.", "error: unexpected '.' at column 2", id="decimal-without-fraction"),
    pytest.param(".5", "error: unexpected '.' at column 1", id="decimal-without-integer-part"),
    pytest.param("1 / 0", DIVISION_BY_ZERO, id="division-by-zero"),
    pytest.param("1 // 0", DIVISION_BY_ZERO, id="floor-division-by-zero"),
    pytest.param("1 % 0", DIVISION_BY_ZERO, id="modulo-zero"),
    pytest.param("1.5 % 0.0", DIVISION_BY_ZERO, id="float-modulo-zero"),
    pytest.param("0 ** -1", DIVISION_BY_ZERO, id="zero-to-a-negative-power"),
    pytest.param("10.0 ** 400", FLOAT_TOO_LARGE, id="float-overflow"),
    pytest.param("10.0 ** 300 * 10.0 ** 300", FLOAT_TOO_LARGE, id="infinite-float-result"),
    pytest.param("1.0 * 10 ** 400", FLOAT_TOO_LARGE, id="int-too-large-to-convert"),
    pytest.param("10 ** 400 / 3", FLOAT_TOO_LARGE, id="int-quotient-too-large"),
    pytest.param("(-8) ** 0.5", COMPLEX_RESULT, id="complex-result"),
    pytest.param("1" * 4301, TOO_MANY_DIGITS, id="literal-of-4301-digits"),
    pytest.param("10 ** 4300", TOO_MANY_DIGITS, id="result-of-4301-digits"),
    pytest.param("-(10 ** 4300)", TOO_MANY_DIGITS, id="negative-result-of-4301-digits"),
    pytest.param("10 ** 4299 * 10 // 100", TOO_MANY_DIGITS, id="intermediate-of-4301-digits"),
    pytest.param("2 ** 99999999999", TOO_MANY_DIGITS, id="huge-power"),
    pytest.param("9 ** 9 ** 9", TOO_MANY_DIGITS, id="tower-of-powers"),
    pytest.param("2 ** 10 ** 400", TOO_MANY_DIGITS, id="exponent-too-large-for-a-float"),
    pytest.param(
        "1" * 12000, "error: line too long (12000 bytes, limit 10000)", id="line-too-long"
    ),
    pytest.param(
        "٣" * 5001, "error: line too long (10002 bytes, limit 10000)", id="limit-counts-utf8-bytes"
    ),
    pytest.param(
        "(1 / 0) ^ 2", "error: unexpected '^' at column 9", id="syntax-error-before-evaluation"
    ),
    pytest.param("1 / 0 + " + "1" * 4301, TOO_MANY_DIGITS, id="long-literal-found-when-parsing"),
    pytest.param("(-8) ** 0.5 + (1 / 0)", COMPLEX_RESULT, id="operands-left-to-right"),
    pytest.param("(" * 4999 + "1" + ")" * 4999, TOO_DEEPLY_NESTED, id="deep-parentheses"),
    pytest.param("(" * 9999 + "1", TOO_DEEPLY_NESTED, id="deep-unclosed-parentheses"),
]


@pytest.mark.parametrize(("line", "expected"), ERRORS)
def test_invalid_line_gives_the_exact_error_text(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


REJECTED_AS_CODE = [
    pytest.param("import sys;sys.exit()", "error: unexpected 'i' at column 1", id="statement"),
    pytest.param("__import__('os')", "error: unexpected '_' at column 1", id="builtin-call"),
    pytest.param("1_000", "error: unexpected '_' at column 2", id="digit-separator"),
    pytest.param("٣", "error: unexpected '٣' at column 1", id="arabic-indic-digit"),
    pytest.param("１", "error: unexpected '１' at column 1", id="fullwidth-digit"),
    pytest.param("1 + ٣", "error: unexpected '٣' at column 5", id="non-ascii-digit-operand"),
    pytest.param("0x10", "error: unexpected 'x' at column 2", id="hexadecimal"),
    pytest.param("1e3", "error: unexpected 'e' at column 2", id="exponent-notation"),
    pytest.param("1e5", "error: unexpected 'e' at column 2", id="exponent-notation-of-issue"),
    pytest.param("1 if 1 else 0", "error: unexpected 'i' at column 3", id="conditional"),
    pytest.param("1 << 2", "error: unexpected '<' at column 3", id="shift"),
    pytest.param("\r", "error: unexpected '\\r' at column 1", id="carriage-return-is-escaped"),
    pytest.param(
        "1\u2028", "error: unexpected '\\u2028' at column 2", id="line-separator-is-escaped"
    ),
]


@pytest.mark.parametrize(("line", "expected"), REJECTED_AS_CODE)
def test_code_and_foreign_notation_are_rejected(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


TAB_COLUMNS = [
    pytest.param("\t1 ^ 2", "error: unexpected '^' at column 4", id="leading-tab"),
    pytest.param("1\t^ 2", "error: unexpected '^' at column 3", id="tab-before-error"),
    pytest.param("(1\t+ 2", "error: missing ')' at column 7", id="tab-before-missing-parenthesis"),
    pytest.param("1\t+\t", "error: unexpected end of line at column 5", id="tab-at-end-of-line"),
]


@pytest.mark.parametrize(("line", "expected"), TAB_COLUMNS)
def test_error_column_counts_a_tab_as_one_character(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


def test_first_error_in_python_evaluation_order_is_reported() -> None:
    # Python computes 1 / 0 before it looks at (-8) ** 0.5.
    assert evaluate_line("1 / 0 * (-8) ** 0.5") == DIVISION_BY_ZERO


NOT_UTF8_LINES = [
    pytest.param(b"1 + \xff", id="in-an-operand"),
    pytest.param(b"\xff", id="alone"),
    pytest.param(b"(" * 201 + b"\x80", id="after-too-deep-nesting"),
    pytest.param(b"1" * 4301 + b"\xff", id="after-a-literal-too-long"),
]


@pytest.mark.parametrize("line", NOT_UTF8_LINES)
def test_byte_that_is_not_utf8_decoded_as_a_lone_surrogate_gives_the_not_utf8_error(
    line: bytes,
) -> None:
    # worker.py decodes with surrogateescape: b"1 + \xff" arrives as "1 + \udcff".
    assert evaluate_line(line.decode("utf-8", "surrogateescape")) == "error: not valid UTF-8"


# --- Limits. ---------------------------------------------------------------------------


def test_line_of_exactly_the_byte_limit_is_evaluated() -> None:
    assert evaluate_line("1" + " " * (grammar.MAX_LINE_BYTES - 1)) == "1"
    assert (
        evaluate_line("1" + " " * grammar.MAX_LINE_BYTES)
        == "error: line too long (10001 bytes, limit 10000)"
    )


def test_line_too_long_gives_the_error_text_for_a_size_in_bytes() -> None:
    # worker.py answers with it for a line it measures in bytes, before decoding it.
    assert grammar.line_too_long(12000) == "error: line too long (12000 bytes, limit 10000)"


FOUR_BYTE_DIGIT = "\U0001d7cf"  # MATHEMATICAL BOLD DIGIT ONE: 4 bytes in UTF-8


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            FOUR_BYTE_DIGIT * 2500,
            f"error: unexpected {FOUR_BYTE_DIGIT!r} at column 1",
            id="10000-bytes",
        ),
        pytest.param(
            FOUR_BYTE_DIGIT * 2501,
            "error: line too long (10004 bytes, limit 10000)",
            id="10004-bytes-in-2501-characters",
        ),
        pytest.param("٣" * 4999, "error: unexpected '٣' at column 1", id="9998-bytes"),
    ],
)
def test_line_length_is_counted_in_utf8_bytes(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


def test_integers_of_4300_digits_are_allowed() -> None:
    assert evaluate_line("9" * 4300) == "9" * 4300
    assert evaluate_line("10 ** 4299") == "1" + "0" * 4299
    assert evaluate_line("-" + "9" * 4300) == "-" + "9" * 4300


NESTING = [
    pytest.param("(" * 200 + "1" + ")" * 200, "1", id="200-parentheses"),
    pytest.param("(" * 199 + "-(1)" + ")" * 199, "-1", id="200-parentheses-innermost-in-a-run"),
    pytest.param("(" * 100 + "1" + ")" * 100, "1", id="100-parentheses"),
    pytest.param("-(" * 100 + "1" + ")" * 100, "1", id="100-signed-parentheses"),
    pytest.param("-(" * 101 + "1" + ")" * 101, "-1", id="101-signed-parentheses"),
    pytest.param("1 ** " * 100 + "2", "1", id="100-powers"),
]


@pytest.mark.parametrize(("line", "expected"), NESTING)
def test_up_to_200_levels_of_nesting_are_evaluated(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


TOO_DEEP = [
    pytest.param("(" * 201 + "1" + ")" * 201, id="201-parentheses"),
    pytest.param("(" * 200 + "-(1)" + ")" * 200, id="201-parentheses-innermost-in-a-run"),
    pytest.param("(" * 201 + "1", id="201-unclosed-parentheses"),
]


@pytest.mark.parametrize("line", TOO_DEEP)
def test_more_than_200_levels_of_nesting_are_an_error(line: str) -> None:
    assert evaluate_line(line) == TOO_DEEPLY_NESTED


def test_evaluation_works_after_a_too_deeply_nested_line() -> None:
    assert evaluate_line("(" * 4999 + "1" + ")" * 4999) == TOO_DEEPLY_NESTED
    assert evaluate_line("(" * 100 + "1 + 1" + ")" * 100) == "2"


LONG_LINES = [
    pytest.param("9" * 4300 + " * 9" * 1000, TOO_MANY_DIGITS, id="long-product-of-big-int"),
    pytest.param("1 + " * 999 + "1", "1000", id="longest-flat-path-line"),
    pytest.param("1+" * 4999 + "1", "5000", id="10000-byte-line-without-parentheses"),
    pytest.param("(1)+" * 2499 + "1", "2500", id="10000-byte-line-of-groups"),
    pytest.param("((1))+" * 1666 + "1", "1667", id="10000-byte-line-of-nested-groups"),
    pytest.param("-" * 9999 + "1", "-1", id="9999-signs-are-no-nesting"),
    pytest.param("1 ** -" * 1666 + "1", "1.0", id="1666-powers-with-signs"),
    pytest.param(
        "(" * 10000 + "1" + ")" * 10000,
        "error: line too long (20001 bytes, limit 10000)",
        id="20001-bytes",
    ),
]


@pytest.mark.parametrize(("line", "expected"), LONG_LINES)
def test_long_line_gives_its_result(line: str, expected: str) -> None:
    assert evaluate_line(line) == expected


# --- The fast path: which lines it takes. ----------------------------------------------

FLAT_LINES = [
    pytest.param("1 + 2", ["1", "+", "2"], id="original-spacing"),
    pytest.param("7", ["7"], id="single-number"),
    pytest.param("10 * 3 / 2 - 1", ["10", "*", "3", "/", "2", "-", "1"], id="every-operator"),
]


@pytest.mark.parametrize(("line", "tokens"), FLAT_LINES)
def test_flat_path_takes_the_originals_flat_form(line: str, tokens: list[str]) -> None:
    assert fastpath.flat_tokens(line) == tokens


NOT_FLAT_LINES = [
    pytest.param("", id="empty"),
    pytest.param(" \t", id="blank"),
    pytest.param("1+1", id="no-spaces"),
    pytest.param("1  + 1", id="two-spaces"),
    pytest.param("1\t+ 1", id="tab"),
    pytest.param(" 1 + 1", id="leading-space"),
    pytest.param("1 + 1 ", id="trailing-space"),
    pytest.param("-1", id="unary-sign"),
    pytest.param("(1)", id="parentheses"),
    pytest.param("1.5 + 1", id="decimal"),
    pytest.param("2 ** 3", id="power"),
    pytest.param("7 // 2", id="floor-division"),
    pytest.param("7 % 2", id="modulo"),
    pytest.param("1 +", id="missing-operand"),
    pytest.param("٣ + 1", id="non-ascii-digit"),
    pytest.param("1 + 1\n", id="newline"),
    pytest.param("1" * (fastpath.FLAT_MAX_CHARS + 1), id="longer-than-flat-max-chars"),
]


@pytest.mark.parametrize("line", NOT_FLAT_LINES)
def test_flat_path_leaves_other_lines_to_the_grammar(line: str) -> None:
    assert fastpath.flat_tokens(line) is None


FAST_PATH_LINES = [
    pytest.param("1+1", ["", 1, "+", 1], id="flat-form-without-spaces"),
    pytest.param(" - 2 ** -3.5 // 4 % 5 ", ["-", 2, "** -", 3.5, "//", 4, "%", 5], id="signs"),
    pytest.param("\t+-1", ["+-", 1], id="signs-only-before-the-number"),
    pytest.param("-( -1)", ["-", "( -", 1, ")"], id="signs-after-opening"),
    pytest.param("((1) * 2)", ["", "(", "(", 1, ")", "*", 2, ")"], id="nested-groups"),
    pytest.param("(" * 200 + "1" + ")" * 200, ["", *"(" * 200, 1, *")" * 200], id="deepest"),
]


@pytest.mark.parametrize(("line", "tokens"), FAST_PATH_LINES)
def test_fast_path_gives_the_tokens_of_every_valid_line(line: str, tokens: list[object]) -> None:
    assert fastpath.fast_tokens(line) == tokens


FAST_PATH_DECLINES = [
    pytest.param("(1", id="unclosed-group"),
    pytest.param("1)", id="unopened-group"),
    pytest.param("(1))+((1)", id="balanced-count-wrong-order"),
    pytest.param("()", id="empty-group"),
    pytest.param("1 +", id="missing-operand"),
    pytest.param("-", id="signs-alone"),
    pytest.param("1 2", id="missing-operator"),
    pytest.param("1.", id="decimal-without-fraction"),
    pytest.param("٣", id="non-ascii-digit"),
    pytest.param("1" * 4301, id="integer-too-long"),
    pytest.param("(" * 201 + "1" + ")" * 201, id="nested-too-deeply"),
]


@pytest.mark.parametrize("line", FAST_PATH_DECLINES)
def test_fast_path_leaves_every_invalid_line_to_the_grammar(line: str) -> None:
    assert fastpath.fast_tokens(line) is None


# --- Property: the fast path agrees with the grammar. ---------------------------------


def outcome(compute: Callable[[], grammar.Number]) -> str:
    """The result text of compute(), with errors turned into text as evaluate_line does."""
    try:
        return grammar.format_number(compute())
    except grammar.EvaluationError as error:
        return f"error: {error}"
    except ZeroDivisionError:
        return DIVISION_BY_ZERO
    except OverflowError:
        return FLOAT_TOO_LARGE


def grammar_outcome(line: str) -> str:
    """What line gives when the grammar alone parses it, without the fast path."""
    return outcome(lambda: grammar.evaluate(grammar.parse_line(line)))


FLAT_OPERANDS = st.one_of(
    st.just(0),
    st.integers(0, 99),
    st.integers(0, 10**300),  # big enough that a quotient overflows a float
).map(str)


@st.composite
def flat_lines(draw: st.DrawFn) -> str:
    """A line in the original's flat form: 2-10 integers joined by + - * /."""
    operands = draw(st.lists(FLAT_OPERANDS, min_size=2, max_size=10))
    operators = draw(
        st.lists(st.sampled_from("+-*/"), min_size=len(operands) - 1, max_size=len(operands) - 1)
    )
    tokens = [operands[0]]
    for operator_token, operand in zip(operators, operands[1:]):
        tokens += [operator_token, operand]
    return " ".join(tokens)


@settings(max_examples=100, deadline=None)
@given(flat_lines())
@example("1 / 0")
@example("7 / 2 * 0 / 0 - 1")
@example("1 - 1 / 0")
@example("9" * 400 + " / 1")
def test_flat_path_agrees_with_the_grammar_on_flat_lines(line: str) -> None:
    tokens = fastpath.flat_tokens(line)
    assert tokens is not None
    assert outcome(lambda: fastpath.evaluate_flat(tokens)) == grammar_outcome(line)


def test_flat_path_agrees_on_the_largest_product_it_takes() -> None:
    # FLAT_MAX_CHARS is what spares the flat path the digit checks: no product it takes
    # can reach 4300 digits.
    half = fastpath.FLAT_MAX_CHARS // 2
    line = "9" * half + " * " + "9" * (fastpath.FLAT_MAX_CHARS - half - 3)
    assert fastpath.flat_tokens(line) is not None
    assert evaluate_line(line) == grammar_outcome(line)


GRAMMAR_CHARACTERS = st.sampled_from("0123456789.+-*/%() \t^x٣\r\n\u2028")


# --- Property: random expression trees agree with a reference evaluator. ------------


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class Signed:
    sign: str
    operand: Tree


@dataclass(frozen=True)
class Binary:
    operator: str
    left: Tree
    right: Tree


Tree = Union[Literal, Signed, Binary]


class Refused(Exception):
    """The reference evaluator's own errors, with the text after 'error: '."""


REFERENCE_OPERATORS: dict[str, Callable[[grammar.Number, grammar.Number], grammar.Number]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": operator.pow,
}
SMALLEST_TOO_LARGE = 10**4300  # the first integer of 4301 digits


def reference_result(tree: Tree) -> str:
    """The text evaluate_line must give for the tree, computed with Python's operators."""
    try:
        value = reference_value(tree)
    except Refused as reason:
        return f"error: {reason}"
    except ZeroDivisionError:
        return DIVISION_BY_ZERO
    except OverflowError:
        return FLOAT_TOO_LARGE
    if isinstance(value, float) and not math.isfinite(value):
        return FLOAT_TOO_LARGE
    return str(value)


def reference_value(tree: Tree) -> grammar.Number:
    """Value of tree, operands left to right as Python computes them; raise Refused past the
    limits."""
    if isinstance(tree, Literal):
        return allowed(float(tree.text) if "." in tree.text else int(tree.text))
    if isinstance(tree, Signed):
        operand = reference_value(tree.operand)
        return -operand if tree.sign == "-" else +operand
    left = reference_value(tree.left)  # first, as Python computes it
    right = reference_value(tree.right)
    if tree.operator == "**" and certainly_too_many_digits(left, right):
        raise Refused("number too large (over 4300 digits)")
    return allowed(REFERENCE_OPERATORS[tree.operator](left, right))


def certainly_too_many_digits(base: grammar.Number, exponent: grammar.Number) -> bool:
    """True if base ** exponent is an integer of over 4300 digits; if False, it is cheap to
    compute.

    |base| >= 2 ** (bits - 1), so |base| ** exponent >= 2 ** (exponent * (bits - 1)); if
    that is False the power has under 2 * SMALLEST_TOO_LARGE.bit_length() bits.
    """
    if not (isinstance(base, int) and isinstance(exponent, int)) or abs(base) < 2 or exponent < 1:
        return False
    return exponent * (abs(base).bit_length() - 1) >= SMALLEST_TOO_LARGE.bit_length()


def allowed(value: grammar.Number | complex) -> grammar.Number:
    if isinstance(value, complex):
        raise Refused("complex result")
    if isinstance(value, int) and abs(value) >= SMALLEST_TOO_LARGE:
        raise Refused("number too large (over 4300 digits)")
    return value


# How tightly a piece of text binds, weakest first: an operand weaker than its place
# needs parentheses (a SUM inside a product, anything but an ATOM left of '**').
SUM = 0
PRODUCT = 1
SIGNED = 2
POWER = 3
ATOM = 4
OPERATOR_LEVELS = {
    "+": SUM,
    "-": SUM,
    "*": PRODUCT,
    "/": PRODUCT,
    "//": PRODUCT,
    "%": PRODUCT,
    "**": POWER,
}


@dataclass(frozen=True)
class Expression:
    """A tree and one text that parses to it."""

    tree: Tree
    text: str
    level: int


SPACES = st.sampled_from(["", "", " ", "\t", "  ", " \t"])
LITERALS = st.one_of(
    st.sampled_from(["0", "1", "2", "3", "0.0", "0.5"]),
    st.from_regex(r"[0-9]{1,6}", fullmatch=True),
    st.from_regex(r"[0-9]{1,4}\.[0-9]{1,4}", fullmatch=True),
    st.integers(0, 10**40).map(str),
)


@st.composite
def literals(draw: st.DrawFn) -> Expression:
    text = draw(LITERALS)
    return Expression(Literal(text), text, ATOM)


def operand_text(draw: st.DrawFn, operand: Expression, weakest_level: int) -> str:
    """operand's text, in parentheses if it binds more weakly than weakest_level."""
    if operand.level >= weakest_level:
        return operand.text
    return f"({draw(SPACES)}{operand.text}{draw(SPACES)})"


@st.composite
def signed(draw: st.DrawFn, operands: st.SearchStrategy[Expression]) -> Expression:
    sign = draw(st.sampled_from("+-"))
    operand = draw(operands)
    text = sign + draw(SPACES) + operand_text(draw, operand, SIGNED)
    return Expression(Signed(sign, operand.tree), text, SIGNED)


@st.composite
def binary(draw: st.DrawFn, operands: st.SearchStrategy[Expression]) -> Expression:
    operator_token = draw(st.sampled_from(sorted(OPERATOR_LEVELS)))
    left = draw(operands)
    right = draw(operands)
    level = OPERATOR_LEVELS[operator_token]
    if operator_token == "**":  # power ::= atom ['**' factor]
        left_text = operand_text(draw, left, ATOM)
        right_text = operand_text(draw, right, SIGNED)
    else:  # left-associative: a right operand of the same level needs parentheses
        left_text = operand_text(draw, left, level)
        right_text = operand_text(draw, right, level + 1)
    text = left_text + draw(SPACES) + operator_token + draw(SPACES) + right_text
    return Expression(Binary(operator_token, left.tree, right.tree), text, level)


@st.composite
def redundant_parentheses(draw: st.DrawFn, operands: st.SearchStrategy[Expression]) -> Expression:
    operand = draw(operands)
    return Expression(operand.tree, f"({draw(SPACES)}{operand.text}{draw(SPACES)})", ATOM)


EXPRESSIONS = st.recursive(
    literals(),
    lambda operands: st.one_of(
        binary(operands), signed(operands), redundant_parentheses(operands)
    ),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None)
@given(EXPRESSIONS, SPACES, SPACES)
@example(
    Expression(Binary("**", Signed("-", Literal("8")), Literal("0.5")), "(-8)**0.5", POWER), "", ""
)
@example(
    Expression(Binary("%", Literal("7"), Signed("-", Literal("3"))), "7 % -3", PRODUCT), " ", "\t"
)
def test_expression_tree_gives_what_python_operators_give(
    expression: Expression, lead: str, trail: str
) -> None:
    line = lead + expression.text + trail
    assert evaluate_line(line) == reference_result(expression.tree), line


def test_reference_evaluator_agrees_with_the_specified_examples() -> None:
    # The reference is itself checked against known answers, so that it cannot agree
    # with grammar.py by sharing a mistake.
    two = Literal("2")
    three = Literal("3")
    eight = Literal("8")
    assert reference_result(Signed("-", Binary("**", two, two))) == "-4"
    assert reference_result(Binary("**", two, Binary("**", three, two))) == "512"
    assert reference_result(Binary("**", Signed("-", eight), Literal("0.5"))) == COMPLEX_RESULT
    assert (
        reference_result(Binary("**", Literal("9"), Binary("**", Literal("9"), Literal("9"))))
        == TOO_MANY_DIGITS
    )
    assert reference_result(Binary("**", Literal("10"), Literal("4299"))) == "1" + "0" * 4299
    assert reference_result(Binary("**", Literal("10"), Literal("4300"))) == TOO_MANY_DIGITS
    assert reference_result(Binary("**", Literal("10.0"), Literal("400"))) == FLOAT_TOO_LARGE
    assert reference_result(Binary("%", eight, Literal("0"))) == DIVISION_BY_ZERO
    assert reference_result(Signed("-", Literal("0.0"))) == "-0.0"


# --- Property: the fast path takes exactly the lines the grammar parses. ------------

# Faults to drop into a valid line: syntax errors, a literal too long, and operations
# that fail when evaluated, so that one line often has several faults.
FAULTS = st.sampled_from(
    ["(", ")", "((", "^", ".", "5.", "**", "* *", "-", "/ 0", "% 0.0", "1" * 4301, "٣", "\t", ""]
)


@st.composite
def faulty_lines(draw: st.DrawFn) -> str:
    """A generated expression with one to three faults put in, each replacing 0-2 characters."""
    line = draw(EXPRESSIONS).text
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(line)))
        line = line[:position] + draw(FAULTS) + line[position + draw(st.integers(0, 2)) :]
    return line


LINES = st.one_of(
    st.builds(
        lambda lead, expression, trail: lead + expression.text + trail,
        SPACES,
        EXPRESSIONS,
        SPACES,
    ),
    faulty_lines(),
    st.text(GRAMMAR_CHARACTERS, max_size=40),
)


def fast_path_outcome(line: str) -> str | None:
    """What line gives by the fast path alone, or None if the fast path declines it."""
    tokens = fastpath.fast_tokens(line)
    if tokens is None:
        return None
    return outcome(lambda: fastpath.evaluate_tokens(tokens))


def grammar_parses(line: str) -> bool:
    try:
        grammar.parse_line(line)
    except grammar.EvaluationError:
        return False
    return True


@settings(max_examples=500, deadline=None)
@given(LINES)
@example(" \t- -( +1 ) ** - 2\t")
@example("(1))+((1)")  # as many '(' as ')', in the wrong order
@example("(" * 200 + "-(1)" + ")" * 200)  # the 201st group
@example("1 + " + "1" * 4301)
@example("1" * 4301 + ".0 % 0")  # a decimal of any length is a float
@example("2 ** -(1 / 0) ** (-8) ** 0.5")
@example("-2 ** -3 ** 2 // 7 % -3")
def test_fast_path_takes_exactly_the_lines_the_grammar_parses_and_gives_their_result(
    line: str,
) -> None:
    with worker_recursion_limit():
        expected = grammar_outcome(line) if grammar_parses(line) else None
    assert fast_path_outcome(line) == expected


def fits_and_not_blank(line: str) -> bool:
    """Whether evaluate_line evaluates line: blank and too long lines are answered before."""
    return bool(line.strip(" \t")) and len(line.encode()) <= grammar.MAX_LINE_BYTES


@settings(max_examples=300, deadline=None)
@given(st.one_of(LINES, st.text(GRAMMAR_CHARACTERS, max_size=60)).filter(fits_and_not_blank))
@example("(1 / 0) ^ 2")
@example("(1 + " + "1" * 4301 + " ^")
@example("( 1 + ( 2 \t")
def test_fast_path_never_changes_a_result(line: str) -> None:
    with worker_recursion_limit():
        assert evaluate_line(line) == grammar_outcome(line)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(grammar.MAX_NESTING - 2, grammar.MAX_NESTING + 2),
    st.sampled_from(["(", "(-", "( ", " ("]),
    EXPRESSIONS,
    st.sampled_from(["", "^", ")", "+"]),
)
def test_nesting_limit_is_the_same_with_and_without_the_fast_path(
    depth: int, opening: str, expression: Expression, end: str
) -> None:
    line = opening * depth + expression.text + ")" * depth + end
    with worker_recursion_limit():
        assert evaluate_line(line) == grammar_outcome(line)


# --- Property: no text makes evaluate_line raise or break the reply's lines. ---------

LONG_TEXTS = st.builds(operator.mul, st.text(min_size=1, max_size=8), st.integers(0, 3000))
LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # what UTF-8 cannot encode


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(), st.text(GRAMMAR_CHARACTERS), LONG_TEXTS))
def test_any_text_gives_one_line_of_utf8_result(line: str) -> None:
    result = evaluate_line(line)
    assert is_one_line(result), repr(result)
    assert not LONE_SURROGATE.search(result), repr(result)


# --- What a worker inherits: a grammar that pyparsing has finished with. ------------------

# Lines that run every parse action, and fail in each way pyparsing reports.
EVERY_PARSE_ACTION = ["-(1 + 2) * 3 ** 2 // 4 % 5", "(2", "1 +", "import sys"]

FRESH_PROCESS_PROGRAM = """
import traceback
import grammar

assert grammar.line.streamlined, "pyparsing would finish the grammar at the first parse"

def arity_trial(*args, **kwargs):
    raise AssertionError("pyparsing tried a parse action's arity, reading its source")

traceback.extract_tb = arity_trial
for line in {lines!r}:
    print(grammar.evaluate_line(line))
"""


def test_pyparsing_does_its_one_time_work_at_import_not_at_a_workers_first_line() -> None:
    # Every worker is a fresh fork of the server, which imported grammar.py and parsed
    # nothing: pyparsing's work at a first parse (streamlining the grammar, and learning each
    # parse action's arity by trial, a traceback that reads its source from disk) would be
    # repeated in each, for ~2 ms.  A fresh interpreter is a process that has parsed nothing.
    program = FRESH_PROCESS_PROGRAM.format(lines=EVERY_PARSE_ACTION)
    done = run_python("-c", program)
    assert done.stderr == ""
    assert done.stdout.splitlines() == [evaluate_line(line) for line in EVERY_PARSE_ACTION]

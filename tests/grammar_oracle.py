"""The arithmetic language in its plainest form: one pyparsing element per precedence level.

This is the grammar before it was optimised, and the reference that grammar.py, its fast
paths included, is proven against: test_grammar.py checks with Hypothesis that
grammar.evaluate_line gives exactly what ``evaluate_line`` here gives, errors and their
columns included; tools/bench.py times the two side by side.  Read it before grammar.py.

The precedence levels, loosest first, written as pyparsing's ``fourFn.py`` example writes its
own (grammar.py's BNF)::

    line      ::= expr end_of_line
    expr      ::= term (('+' | '-') term)*
    term      ::= factor (('*' | '/' | '//' | '%') factor)*
    factor    ::= ('+' | '-') factor | power
    power     ::= atom ['**' factor]                  '**' groups right to left
    atom      ::= number | '(' expr ')'
    number    ::= digit+ ['.' digit+]                 digit: ASCII 0-9 only

Spaces and tabs may stand between tokens.  grammar.py allows at most MAX_NESTING groups open
at once; here the only bound is the recursion limit the caller sets (grammar.RECURSION_LIMIT,
as a worker does: a fixture of test_grammar.py, and tools/bench.py), past which a line is
"too deeply nested".  Lines in the original's flat form ("1 + 2 * 3") take a fast path of
their own (section "The fast path").
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from typing import Callable, Union

import pyparsing as pp

Number = Union[int, float]

MAX_LINE_BYTES = 10_000
MAX_INT_DIGITS = 4300  # Python's own limit for printing an int (sys.int_info)
INT_LIMIT = 10**MAX_INT_DIGITS  # the smallest integer with too many digits

FLOAT_OVERFLOW = "number too large for a float"


class EvaluationError(Exception):
    """A line has no value; the message says why, for the user."""


def _checked(value: Number | complex) -> Number:
    """Return value if it is a number the language allows; raise EvaluationError if not."""
    if isinstance(value, complex):
        raise EvaluationError("complex result")
    if isinstance(value, int) and not -INT_LIMIT < value < INT_LIMIT:
        raise EvaluationError(f"number too large (over {MAX_INT_DIGITS} digits)")
    return value


def _too_many_digits(base: int, exponent: int) -> bool:
    """Whether base ** exponent would have over MAX_INT_DIGITS digits, without computing it."""
    if abs(base) <= 1 or exponent <= 0:
        return False
    if exponent > 4 * MAX_INT_DIGITS:  # |base| >= 2: over 0.3 * exponent digits
        return True
    # About exponent * log10(|base|) digits; the margin of one digit leaves the exact
    # boundary to the check on the computed result.
    return exponent * math.log10(abs(base)) > MAX_INT_DIGITS + 1


def _power(base: Number, exponent: Number) -> Number:
    """base ** exponent, refusing before computing an integer that would be too large."""
    if isinstance(base, int) and isinstance(exponent, int) and _too_many_digits(base, exponent):
        raise EvaluationError(f"number too large (over {MAX_INT_DIGITS} digits)")
    result: Number = base**exponent
    return result


BINARY_OPERATORS: dict[str, Callable[[Number, Number], Number]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "//": operator.floordiv,
    "%": operator.mod,
    "**": _power,
}


# --- The nodes that parse actions build, and their evaluation. -----------------------


@dataclass(frozen=True)
class Signed:
    """factor ::= ('+' | '-') factor"""

    sign: str
    operand: Node


@dataclass(frozen=True)
class Chain:
    """operand (operator operand)*, applied left to right: an expr, a term or a power."""

    first: Node
    rest: list[tuple[str, Node]]


Node = Union[int, float, Signed, Chain]


def evaluate(node: Node) -> Number:
    """The value of a parsed line; raises EvaluationError, ZeroDivisionError or OverflowError."""
    if isinstance(node, Chain):
        value = evaluate(node.first)
        for operator_symbol, operand in node.rest:
            value = _checked(BINARY_OPERATORS[operator_symbol](value, evaluate(operand)))
        return value
    if isinstance(node, Signed):
        value = evaluate(node.operand)
        return -value if node.sign == "-" else +value
    return node


# --- Parse actions: each turns the tokens of one rule into its node. ----------------


def _number_value(tokens: pp.ParseResults) -> Number:
    literal: str = tokens[0]
    if "." in literal:
        return float(literal)
    if len(literal) > MAX_INT_DIGITS:
        raise EvaluationError(f"number too large (over {MAX_INT_DIGITS} digits)")
    return int(literal)


def _signed(tokens: pp.ParseResults) -> Signed:
    sign, operand = tokens
    return Signed(sign, operand)


def _chain(tokens: pp.ParseResults) -> Node:
    """A Chain for ``operand (operator operand)*``; a lone operand stands for itself."""
    if len(tokens) == 1:
        only: Node = tokens[0]
        return only
    pairs = [(tokens[index], tokens[index + 1]) for index in range(1, len(tokens), 2)]
    return Chain(tokens[0], pairs)


def _missing_closing_parenthesis(line: str, loc: int, element: object, error: Exception) -> None:
    raise EvaluationError(f"missing ')' at column {loc + 1}")


# --- The grammar, top-down as in the BNF of the docstring. ----------------------------

pp.ParserElement.set_default_whitespace_chars(" \t")

expr = pp.Forward()
factor = pp.Forward()
number = pp.Regex(r"[0-9]+(?:\.[0-9]+)?").set_parse_action(_number_value)
closing_parenthesis = pp.Suppress(")").set_fail_action(_missing_closing_parenthesis)
# '-' (not '+') between elements means: once the left part matched, the right part
# must follow; a failure there is reported where it happened, with no backtracking.
atom = number | pp.Suppress("(") - expr - closing_parenthesis
power = (atom + pp.Opt(pp.Literal("**") - factor)).set_parse_action(_chain)
factor <<= (pp.one_of("+ -") - factor).set_parse_action(_signed) | power
term = (factor + (pp.one_of("* // / %") - factor)[...]).set_parse_action(_chain)
expr <<= (term + (pp.one_of("+ -") - term)[...]).set_parse_action(_chain)
expr.parse_with_tabs()  # report columns in the line as sent, not with tabs expanded


def evaluate_expression(line: str) -> Number:
    """Parse and evaluate one line of the full language; raise EvaluationError if invalid."""
    size = len(line.encode("utf-8", "surrogatepass"))
    if size > MAX_LINE_BYTES:
        raise EvaluationError(f"line too long ({size} bytes, limit {MAX_LINE_BYTES})")
    try:
        tree: Node = expr.parse_string(line, parse_all=True)[0]
    except pp.ParseBaseException as error:
        raise EvaluationError(_describe_syntax_error(line, error.loc)) from None
    except RecursionError:
        raise EvaluationError("too deeply nested") from None
    return evaluate(tree)


def _describe_syntax_error(line: str, loc: int) -> str:
    if loc >= len(line):
        return f"unexpected end of line at column {loc + 1}"
    return f"unexpected {line[loc]!r} at column {loc + 1}"


# --- The fast path: the original's flat form. -----------------------------------------

# The flat form as the original's files write it: single spaces around each operator.
FLAT_SPACED = re.compile(r"[0-9]+(?: [-+*/] [0-9]+)*")
# The flat form with any spacing, as people type it: "1 + 1     - 0-1 * 1".
FLAT = re.compile(r"[ \t]*[0-9]+(?:[ \t]*[-+*/][ \t]*[0-9]+)*[ \t]*")
FLAT_TOKEN = re.compile(r"[0-9]+|[-+*/]")
# No integer in a flat line this short can reach MAX_INT_DIGITS: a product has at most
# as many digits as its factors together, and each sum adds at most one digit per term
# count's decade.  So the fast path needs no size checks at all.
FLAT_MAX_CHARS = 4000


def flat_tokens(line: str) -> list[str] | None:
    """The tokens of line if it is in the flat form, else None."""
    if len(line) > FLAT_MAX_CHARS:
        return None
    if FLAT_SPACED.fullmatch(line):
        return line.split(" ")
    if FLAT.fullmatch(line):
        return FLAT_TOKEN.findall(line)
    return None


def evaluate_flat(tokens: list[str]) -> Number:
    """Value of a flat line's tokens, computed in Python's order with Python's operators.

    Products and quotients are folded left to right into a term; each finished term is
    added to or subtracted from the running total, also left to right.
    """
    total: Number = 0
    pending_sign = "+"
    term: Number = int(tokens[0])
    rest = iter(tokens[1:])
    for operator_token, literal in zip(rest, rest):
        if operator_token == "*":
            term *= int(literal)
        elif operator_token == "/":
            term /= int(literal)
        else:
            total = total + term if pending_sign == "+" else total - term
            pending_sign = operator_token
            term = int(literal)
    return total + term if pending_sign == "+" else total - term


# --- One line in, one result out. -----------------------------------------------------


def evaluate_line(line: str) -> str:
    """The result text for one line (without newline); never raises."""
    try:
        tokens = flat_tokens(line)
        if tokens is not None:
            return format_number(evaluate_flat(tokens))
        if not line.strip(" \t"):
            return ""
        return format_number(evaluate_expression(line))
    except EvaluationError as error:
        return f"error: {error}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return f"error: {FLOAT_OVERFLOW}"


def format_number(value: Number) -> str:
    """str(value), Python's own formatting; a float must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise EvaluationError(FLOAT_OVERFLOW)
    return str(value)

"""The arithmetic language: one pyparsing grammar, its evaluation, and fast paths.

worker.py calls ``evaluate_line`` per line: a number, ``""`` for a blank line, or ``error:
<reason>``; no line makes it raise, hang or exhaust memory.  Each rule is the pyparsing
element of that name (the last three: pieces of its regexes)::

    line      ::= signs expr end_of_line
    expr      ::= operand (operator operand)*
    operand   ::= run | group
    group     ::= opening expr ')'
    run       ::= number (operator number)*
    opening   ::= '(' signs
    operator  ::= binary signs
    signs     ::= ('+' | '-')*
    binary    ::= '+' | '-' | '*' | '//' | '/' | '%' | '**'
    number    ::= digit+ ['.' digit+]          digit: ASCII 0-9 only

Spaces and tabs may stand between tokens; operators bind as in Python.  ``evaluate`` computes
each operation when Python would, so results and faults are Python's.  A line or group without
parentheses is one regex (UNNESTED), and ``evaluate_flat`` a faster path for the original's form
(``1 + 2 * 3``); tests/test_grammar.py proves all paths equal.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from operator import add, floordiv, mod, mul, sub, truediv
from typing import Callable, Union

import pyparsing as pp

Number = Union[int, float]

MAX_LINE_BYTES = 10_000
MAX_INT_DIGITS = 4300  # Python's own limit for printing an int (sys.int_info)
INT_LIMIT = 10**MAX_INT_DIGITS  # the smallest integer with too many digits
RECURSION_LIMIT = 6000  # set by worker.py: ~9 frames per '(', so deep nesting is no crash

NOT_UTF8 = "error: not valid UTF-8"
NOT_UTF8_BYTE = re.compile("[\udc80-\udcff]")  # how worker.py decodes a byte that is not UTF-8
FLOAT_OVERFLOW = "number too large for a float"
TOO_MANY_DIGITS = f"number too large (over {MAX_INT_DIGITS} digits)"


class EvaluationError(Exception):
    """A line has no value; the message says why, for the user."""


def _power(base: Number, exponent: Number) -> Number:
    """base ** exponent, refusing before computing an integer of over MAX_INT_DIGITS digits."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        # About exponent * log10(|base|) digits; _apply checks the exact boundary in the result.
        digits_over = (
            exponent > 4 * MAX_INT_DIGITS or exponent * math.log10(abs(base)) > MAX_INT_DIGITS + 1
        )
        if digits_over:
            raise EvaluationError(TOO_MANY_DIGITS)
    result: Number = base**exponent
    return result


BINARY_OPERATORS: dict[str, Callable[[Number, Number], Number | complex]] = {
    "+": add,
    "-": sub,
    "*": mul,
    "/": truediv,
    "//": floordiv,
    "%": mod,
    "**": _power,
}
NEGATE = "negate"  # a unary minus waiting for its operand's value
# Higher binds tighter, as in Python: -2 ** 2 is -4, and 2 ** 3 ** 2 is 512 ('**' groups right to left).
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2, NEGATE: 3, "**": 4}


NUMBER = r"[0-9]+(?:\.[0-9]+)?"
BINARY = r"\*\*|//|[-+*/%]"
SIGNS = r"(?:[ \t]*[+-])*"
OPERATOR = rf"(?:{BINARY}){SIGNS}"
RUN = rf"{NUMBER}(?:[ \t]*{OPERATOR}[ \t]*{NUMBER})*"
RUN_TOKEN = re.compile(rf"{NUMBER}|{OPERATOR}")
# A line or group without parentheses inside: ~20x faster whole than in pyparsing's walk.
UNNESTED = rf"({SIGNS})[ \t]*({RUN})[ \t]*"
UNNESTED_LINE = re.compile(UNNESTED)


@dataclass
class Parenthesized:
    """opening expr ')': the opening's signs, then the tokens of the expr."""

    tokens: list[Token]


# A number, a Parenthesized, or text: signs before an operand ('', '- +', '(-'), or an operator and signs ('* -').
Token = Union[int, float, str, Parenthesized]


def _run_tokens(run_text: str) -> list[Token]:
    """The numbers and operators of a run."""
    return [
        _number_value(text) if text[0].isdigit() else text for text in RUN_TOKEN.findall(run_text)
    ]


def _number_value(literal: str) -> Number:
    if "." in literal:
        return float(literal)
    if len(literal) > MAX_INT_DIGITS:
        raise EvaluationError(TOO_MANY_DIGITS)
    return int(literal)


def _unnested_tokens(match: re.Match[str]) -> list[Token]:
    return [match[1], *_run_tokens(match[2])]


def _missing_closing_parenthesis(line: str, loc: int, element: object, error: Exception) -> None:
    """Fail action of ')': raising no ParseException ends the parse here, not in vaguer backtracking."""
    raise EvaluationError(f"missing ')' at column {loc + 1}")


# Global to pyparsing, for elements created after it: set first.  '\f' and '\v' are no blanks here.
pp.ParserElement.set_default_whitespace_chars(" \t")

expr = pp.Forward()
signs = pp.Regex(SIGNS)  # may match nothing: an optional element would cost an exception
operator = pp.Regex(OPERATOR)
run = pp.Regex(RUN).set_parse_action(lambda tokens: _run_tokens(tokens[0]))
opening = pp.Regex(rf"\({SIGNS}")
closing = pp.Literal(")").set_fail_action(_missing_closing_parenthesis)
unnested_group = pp.Regex(rf"\({UNNESTED}\)", as_match=True)  # a group with no nesting inside
unnested_group.set_parse_action(lambda tokens: Parenthesized(_unnested_tokens(tokens[0])))
# '-' (not '+'): once the left part matched, the right must follow; a failure is reported there.
group = (opening - expr - closing).set_parse_action(lambda tokens: Parenthesized(tokens[:-1]))
operand = unnested_group | run | group
expr <<= operand + (operator - operand)[...]
line = signs + expr + pp.StringEnd()
line.parse_with_tabs()  # report columns in the line as sent, not with tabs expanded


def evaluate(tokens: list[Token]) -> Number:
    """The value of an expr's tokens; raises EvaluationError, ZeroDivisionError or OverflowError.
    Each operator waits on a stack until the next binds no tighter: Python's order."""
    values: list[Number] = []
    waiting: list[str] = []
    for position, token in enumerate(tokens):  # signs, operand, then (operator, operand) pairs
        if not isinstance(token, str):
            values.append(evaluate(token.tokens) if isinstance(token, Parenthesized) else token)
            continue
        signs_start = 0
        if position:  # the token starts with the operator after an operand
            symbol = token[:2] if token[:2] in PRECEDENCE else token[0]  # '**' and '//'
            signs_start = len(symbol)
            if symbol != "**":  # right to left: '**' waits for its whole right operand
                while waiting and PRECEDENCE[waiting[-1]] >= PRECEDENCE[symbol]:
                    _apply(waiting.pop(), values)
            waiting.append(symbol)
        if token.count("-", signs_start) % 2:
            waiting.append(NEGATE)
    while waiting:
        _apply(waiting.pop(), values)
    return values[0]


def _apply(operator_symbol: str, values: list[Number]) -> None:
    """Replace the operand(s) on top of values with the operator's result, if the language allows it."""
    if operator_symbol == NEGATE:
        values[-1] = -values[-1]
        return
    right = values.pop()
    result = BINARY_OPERATORS[operator_symbol](values[-1], right)
    if isinstance(result, complex):
        raise EvaluationError("complex result")
    if isinstance(result, int) and not -INT_LIMIT < result < INT_LIMIT:
        raise EvaluationError(TOO_MANY_DIGITS)
    values[-1] = result


def evaluate_expression(text: str) -> Number:
    """Parse and evaluate one line of the full language; raise EvaluationError if invalid."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_LINE_BYTES:
        raise EvaluationError(f"line too long ({size} bytes, limit {MAX_LINE_BYTES})")
    unnested = UNNESTED_LINE.fullmatch(text)
    return evaluate(_unnested_tokens(unnested) if unnested else parsed_tokens(text))


def parsed_tokens(text: str) -> list[Token]:
    """The tokens of a line as pyparsing parses it; raise EvaluationError if it does not parse."""
    try:
        return list(line.parse_string(text))
    except pp.ParseBaseException as error:
        found = repr(text[error.loc]) if error.loc < len(text) else "end of line"
        raise EvaluationError(f"unexpected {found} at column {error.loc + 1}") from None
    except RecursionError:
        raise EvaluationError("too deeply nested") from None


# The original's flat form: integers and + - * / between single spaces, split(" ") its tokens.
FLAT = re.compile(r"[0-9]+(?: [-+*/] [0-9]+)*")
FLAT_MAX_CHARS = 4000  # too short for an integer of MAX_INT_DIGITS: the flat path checks no sizes


def flat_tokens(line: str) -> list[str] | None:
    """The tokens of line if it is in the flat form, else None."""
    return line.split(" ") if len(line) <= FLAT_MAX_CHARS and FLAT.fullmatch(line) else None


def evaluate_flat(tokens: list[str]) -> Number:
    """Value of a flat line's tokens: * and / fold into a term, which + and - fold into the total."""
    total: Number = 0
    pending_sign = "+"
    term: Number = int(tokens[0])
    rest = iter(tokens[1:])
    for operator_token, literal in zip(
        rest, rest
    ):  # one iterator twice: (operator, literal) pairs
        if operator_token == "*":
            term *= int(literal)
        elif operator_token == "/":
            term /= int(literal)
        else:
            total = total + term if pending_sign == "+" else total - term
            pending_sign, term = operator_token, int(literal)
    return total + term if pending_sign == "+" else total - term


def evaluate_line(line: str) -> str:
    """The result text for one line (without newline); never raises."""
    try:
        tokens = flat_tokens(line)
        if tokens is None and not line.strip(" \t"):
            return ""
        return format_number(
            evaluate_flat(tokens) if tokens is not None else evaluate_expression(line)
        )
    except EvaluationError as error:  # which a line with a byte that is not UTF-8 always is
        return NOT_UTF8 if NOT_UTF8_BYTE.search(line) else f"error: {error}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return f"error: {FLOAT_OVERFLOW}"


def format_number(value: Number) -> str:
    """str(value), Python's own formatting; a float must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise EvaluationError(FLOAT_OVERFLOW)
    return str(value)


def line_too_long(size_bytes: int) -> str:
    """The result text for a line of size_bytes bytes, over MAX_LINE_BYTES."""
    return f"error: line too long ({size_bytes} bytes, limit {MAX_LINE_BYTES})"

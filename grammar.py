"""The arithmetic language: its pyparsing grammar, how a parsed line is evaluated, fast paths.

worker.py calls ``evaluate_line`` once per line: it returns the value as text, ``""`` for a
blank line, or ``error: <reason>``, and no line makes it raise, hang or exhaust memory.

The language is Python's arithmetic on non-negative literals.  Its precedence levels, one
rule each, loosest first (pyparsing's ``fourFn.py`` writes its BNF the same way, a rule per
level)::

    line      ::= expr end_of_line
    expr      ::= term (('+' | '-') term)*
    term      ::= factor (('*' | '/' | '//' | '%') factor)*
    factor    ::= ('+' | '-') factor | power
    power     ::= atom ['**' factor]                  '**' groups right to left
    atom      ::= number | '(' expr ')'               at most MAX_NESTING groups open at once
    number    ::= digit+ ['.' digit+]                 digit: ASCII 0-9 only

Spaces and tabs may stand between tokens.  That grammar, one pyparsing element per level, is
tests/grammar_oracle.py: the most straightforward form, and the place to start reading.  Here
the pyparsing grammar (section "The grammar") parses the same lines as one chain of operands
and operators, each element named after its rule::

    line           ::= signs expr end_of_line
    expr           ::= operand (operator operand)*
    operand        ::= run | group
    group          ::= opening expr ')'
    run            ::= simple_operand (operator simple_operand)*          one regex
    simple_operand ::= number | opening number (operator number)* ')'     no group inside
    opening        ::= '(' signs
    operator       ::= binary signs
    signs          ::= ('+' | '-')*
    binary         ::= '+' | '-' | '*' | '//' | '/' | '%' | '**'

and ``evaluate`` applies the precedence levels to the chain's tokens with a stack: operator-
precedence parsing, Dijkstra's *shunting-yard* algorithm.  pyparsing tries every level of the
first grammar for every number (680 µs a line); the chain costs it a regex per run and ~30 µs
per group that holds a group.

**Why signs ride on the operator before them.**  A '-' right after an operand is the binary
minus, anywhere else it is a sign.  Writing ``operator ::= binary signs`` (and ``opening ::=
'(' signs``) makes that distinction in the tokens themselves: operands and operators
alternate, no lexer has to look behind, and the line's tokens form a regular language apart
from the balance of parentheses.  ``evaluate`` turns each sign into a NEGATE that binds
tighter than ``*`` and looser than a ``**`` after it (``-2 ** 2`` is -4); a ``**`` before it
takes the signed operand whole (``2 ** -1`` is 0.5).

**The fast paths** (last section) are an optimisation, proven equal to the grammar by
tests/test_grammar.py: the original's flat form has a path of its own, and for every other
line one regular expression checks its tokens and a counter the balance of its
parentheses, so a valid line reaches ``evaluate`` without pyparsing.  pyparsing
stays the definition of the language and answers every line the fast path declines: every
invalid line, whose message and column are pyparsing's.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from itertools import islice
from operator import add, floordiv, mod, mul, sub, truediv
from typing import Callable, NamedTuple, Union

import pyparsing as pp

Number = Union[int, float]

MAX_LINE_BYTES = 10_000
MAX_INT_DIGITS = 4300  # Python's own limit for printing an int (sys.int_info)
INT_LIMIT = 10**MAX_INT_DIGITS  # the smallest integer with too many digits
# Deeper groups are an error, found before pyparsing recurses past RECURSION_LIMIT.
MAX_NESTING = 200
# Set by worker.py.  pyparsing recurses ~9 frames per open group: MAX_NESTING groups need
# ~1,800 frames, and the margin covers other versions of Python and pyparsing.
RECURSION_LIMIT = 6000

NOT_UTF8 = "error: not valid UTF-8"
NOT_UTF8_BYTE = re.compile("[\udc80-\udcff]")  # how worker.py decodes a byte that is not UTF-8
FLOAT_OVERFLOW = "number too large for a float"
TOO_MANY_DIGITS = f"number too large (over {MAX_INT_DIGITS} digits)"
TOO_DEEPLY_NESTED = "too deeply nested"


class EvaluationError(Exception):
    """A line has no value; the message says why, for the user."""


def line_too_long(size_bytes: int) -> str:
    """The result text for a line of size_bytes, over MAX_LINE_BYTES."""
    return f"error: line too long ({size_bytes} bytes, limit {MAX_LINE_BYTES})"


# --- The operators. ----------------------------------------------------------------------


def _power(base: Number, exponent: Number) -> Number:
    """base ** exponent, refusing before computing an integer of over MAX_INT_DIGITS digits."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        # About exponent * log10(|base|) digits; _apply checks the exact boundary in the result.
        # The exponent alone first: with |base| >= 2, over 4 * MAX_INT_DIGITS is too many digits
        # for sure (2 ** 4 > 10), and an exponent of over 308 digits (a literal may have 4,300)
        # cannot be converted to the float the estimate multiplies (OverflowError).
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
NEGATE = "negate"  # a sign '-' waiting for its operand's value
OPEN = "("  # an open group on the stack: no operator inside it applies across it
# Higher binds tighter, as in Python: -2 ** 2 is -4, and 2 ** 3 ** 2 is 512.
PRECEDENCE = {OPEN: 0, "+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2, NEGATE: 3, "**": 4}


# --- The tokens, as regular expressions. --------------------------------------------------

NUMBER = r"[0-9]+(?:\.[0-9]+)?"
BINARY = r"\*\*|//|[-+*/%]"  # '**' and '//' before '*' and '/'
SIGNS = r"(?:[ \t]*[+-])*"
OPERATOR = rf"(?:{BINARY}){SIGNS}"
OPENING = rf"\({SIGNS}"
SIMPLE_GROUP = rf"{OPENING}[ \t]*{NUMBER}(?:[ \t]*{OPERATOR}[ \t]*{NUMBER})*[ \t]*\)"
SIMPLE_OPERAND = rf"(?:{NUMBER}|{SIMPLE_GROUP})"
RUN = rf"{SIMPLE_OPERAND}(?:[ \t]*{OPERATOR}[ \t]*{SIMPLE_OPERAND})*"
TOKEN = re.compile(rf"{NUMBER}|{OPERATOR}|{OPENING}|\)")  # spaces and tabs between are skipped

# A token is a number or text: the signs that start the line ('', '-', '- +'), an opening with
# its signs ('(', '(-'), ')', or an operator with its signs ('*', '* -').
Token = Union[int, float, str]


def _number_value(literal: str) -> Number:
    if "." in literal:
        return float(literal)
    if len(literal) > MAX_INT_DIGITS:
        raise EvaluationError(TOO_MANY_DIGITS)
    return int(literal)


def _tokens(text: str) -> list[Token]:
    """The tokens of text, which holds whole tokens only (a run, or a line after its signs)."""
    return [_number_value(token) if token[0].isdigit() else token for token in TOKEN.findall(text)]


# --- The grammar: the definition of the language. -----------------------------------------


class Nesting:
    """How many groups are open where pyparsing parses: its parse actions count them, and one
    more than MAX_NESTING is an error, raised before pyparsing recurses deeper.  Once '('
    matches, the group is complete or the parse fails (pyparsing's '-'): no backtracking
    leaves the count wrong.  parsed_tokens sets it to 0 before each line."""

    def __init__(self) -> None:
        self.depth = 0

    def open_group(self) -> None:
        """Parse action of opening."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise EvaluationError(TOO_DEEPLY_NESTED)

    def close_group(self) -> None:
        """Parse action of ')'."""
        self.depth -= 1

    def run_tokens(self, tokens: pp.ParseResults) -> list[Token]:
        """Parse action of run: its tokens.  A group in a run is one level deeper than the run."""
        text: str = tokens[0]
        if "(" in text and self.depth >= MAX_NESTING:
            raise EvaluationError(TOO_DEEPLY_NESTED)
        return _tokens(text)


def _missing_closing_parenthesis(line: str, loc: int, element: object, error: Exception) -> None:
    """Fail action of ')': an EvaluationError ends the parse here, where the ')' is missing."""
    raise EvaluationError(f"missing ')' at column {loc + 1}")


# Global to pyparsing, for elements created after it: set first.  '\f' and '\v' are no blanks.
pp.ParserElement.set_default_whitespace_chars(" \t")

nesting = Nesting()
expr = pp.Forward()
signs = pp.Regex(SIGNS)  # may match nothing: an optional element would cost an exception
operator = pp.Regex(OPERATOR)
# One regex for what needs no recursion (groups holding no group): pyparsing spends ~30 µs
# on each group it walks.
run = pp.Regex(RUN).set_parse_action(nesting.run_tokens)
opening = pp.Regex(OPENING).set_parse_action(nesting.open_group)
closing = pp.Literal(")").set_parse_action(nesting.close_group)
closing.set_fail_action(_missing_closing_parenthesis)
# '-' (not '+'): once the left part matched, the right must follow; a failure is reported there.
group = opening - expr - closing
operand = run | group
expr <<= operand + (operator - operand)[...]
line = signs + expr + pp.StringEnd()
line.parse_with_tabs()  # report columns in the line as sent, not with tabs expanded


def parsed_tokens(text: str) -> list[Token]:
    """The tokens of a line as pyparsing parses it; raise EvaluationError if it does not parse."""
    nesting.depth = 0
    try:
        return list(line.parse_string(text))
    except pp.ParseBaseException as error:
        found = repr(text[error.loc]) if error.loc < len(text) else "end of line"
        raise EvaluationError(f"unexpected {found} at column {error.loc + 1}") from None
    except RecursionError:  # only below RECURSION_LIMIT: an interpreter worker.py did not set up
        raise EvaluationError(TOO_DEEPLY_NESTED) from None


# --- Evaluation: operator precedence with a stack (shunting-yard). --------------------------


def evaluate(tokens: list[Token]) -> Number:
    """The value of a line's tokens; raises EvaluationError, ZeroDivisionError or OverflowError.

    Numbers go on the values stack; each operator waits on a second stack until the next one
    binds no tighter, and is then applied to the values on top: the order Python computes in,
    so results and faults are Python's.  ')' applies what waits since its '('.
    """
    values: list[Number] = []
    waiting: list[str] = []
    if str(tokens[0]).count("-") % 2:  # the signs before the line's first operand
        waiting.append(NEGATE)
    for token in islice(tokens, 1, None):
        if not isinstance(token, str):
            values.append(token)
        elif token == ")":
            while waiting[-1] != OPEN:
                _apply(waiting.pop(), values)
            waiting.pop()
        elif token[0] == OPEN:
            waiting.append(OPEN)
            if token.count("-") % 2:  # the signs after '('
                waiting.append(NEGATE)
        else:
            meaning = _operator_meaning(token)
            if meaning.symbol != "**":  # right to left: '**' waits for its whole right operand
                while waiting and PRECEDENCE[waiting[-1]] >= meaning.precedence:
                    _apply(waiting.pop(), values)
            waiting.append(meaning.symbol)
            if meaning.negates:
                waiting.append(NEGATE)
    while waiting:
        _apply(waiting.pop(), values)
    return values[0]


class OperatorMeaning(NamedTuple):
    """What an operator token (an operator and the signs after it) means to evaluate."""

    symbol: str  # the binary operator: '+', '**', ...
    precedence: int  # PRECEDENCE[symbol]
    negates: bool  # whether its signs negate the operand after it (an odd number of '-')


@lru_cache(maxsize=256)  # a few operator texts make up nearly every line: '+', '* -', ...
def _operator_meaning(token: str) -> OperatorMeaning:
    """What an operator token means: its symbol, its precedence, and its signs."""
    symbol = token[:2] if token[:2] in BINARY_OPERATORS else token[0]  # '**' and '//'
    negates = token.count("-", len(symbol)) % 2 == 1
    return OperatorMeaning(symbol, PRECEDENCE[symbol], negates)


def _apply(operator_symbol: str, values: list[Number]) -> None:
    """Replace the operand(s) on top of values with the operator's result, if the language
    allows it."""
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


# --- One line in, one result out. ----------------------------------------------------------


def evaluate_line(line: str) -> str:
    """The result text for one line (without newline); never raises."""
    flat = flat_tokens(line)
    if flat is None:
        # The size first: a line over the limit is refused whatever it holds (blanks, bytes
        # that are not UTF-8), as worker.py refuses one too long to decode.
        too_long = _too_long(line)
        if too_long is not None:
            return too_long
        if not line.strip(" \t"):
            return ""
    try:
        value = evaluate_flat(flat) if flat is not None else evaluate(line_tokens(line))
        return format_number(value)
    except EvaluationError as error:  # which a line with a byte that is not UTF-8 always is
        return NOT_UTF8 if NOT_UTF8_BYTE.search(line) else f"error: {error}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return f"error: {FLOAT_OVERFLOW}"


def line_tokens(line: str) -> list[Token]:
    """The tokens of a line: the fast path's if it takes the line, else pyparsing's."""
    tokens = fast_tokens(line)
    return parsed_tokens(line) if tokens is None else tokens


def _too_long(line: str) -> str | None:
    """line_too_long's text if line takes over MAX_LINE_BYTES in UTF-8, else None.

    A character takes 1 to 4 bytes, so only a line of over MAX_LINE_BYTES // 4 characters can
    be too long, and an ASCII one (str.isascii takes no time) has as many bytes as characters:
    only a long line with other characters is encoded to be measured.
    """
    if len(line) <= MAX_LINE_BYTES // 4:
        return None
    size_bytes = len(line) if line.isascii() else utf8_size(line)
    return line_too_long(size_bytes) if size_bytes > MAX_LINE_BYTES else None


def utf8_size(line: str) -> int:
    """The bytes of line in UTF-8.  A lone surrogate that worker.py's decoding made of a byte
    that is not UTF-8 counts as that one byte; any other (from a direct caller), as three."""
    try:
        return len(line.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        return len(line.encode("utf-8", "surrogatepass"))


def format_number(value: Number) -> str:
    """str(value), Python's own formatting; a float must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise EvaluationError(FLOAT_OVERFLOW)
    return str(value)


# --- Fast paths: an optimisation, proven equal to the grammar by tests/test_grammar.py. -----
#
# Each takes only lines the grammar parses, and gives what parsed_tokens and evaluate give.

# 1. The original's flat form: integers and + - * / between single spaces, split(" ") its
# tokens.  It is nearly every line the original's clients send, so it skips even the stack.
FLAT = re.compile(r"[0-9]+(?: [-+*/] [0-9]+)*")
FLAT_MAX_CHARS = 4000  # too short for an integer of MAX_INT_DIGITS: the flat path checks no sizes


def flat_tokens(line: str) -> list[str] | None:
    """The tokens of line if it is in the flat form, else None."""
    return line.split(" ") if len(line) <= FLAT_MAX_CHARS and FLAT.fullmatch(line) else None


def evaluate_flat(tokens: list[str]) -> Number:
    """Value of a flat line's tokens: * and / fold into a term, which + and - fold into the
    total."""
    total: Number = 0
    pending_sign = "+"
    term: Number = int(tokens[0])
    rest = iter(tokens[1:])
    pairs = zip(rest, rest)  # one iterator twice: (operator, literal) pairs
    for operator_token, literal in pairs:
        if operator_token == "*":
            term *= int(literal)
        elif operator_token == "/":
            term /= int(literal)
        else:
            total = total + term if pending_sign == "+" else total - term
            pending_sign = operator_token
            term = int(literal)
    return total + term if pending_sign == "+" else total - term


# 2. Every other valid line.  Apart from the balance of its parentheses, a line's tokens form a
# regular language (signs ride on the operator or '(' before them), so one regular expression
# checks them all; a count of open groups then checks the balance and MAX_NESTING.
WHITESPACE = "[ \t]*"
# A number with the openings before it and the closings after it.
BRACKETED_NUMBER = rf"(?:{WHITESPACE}{OPENING})*{WHITESPACE}{NUMBER}(?:{WHITESPACE}\))*"
# The signs are matched with the spaces before them (pyparsing skips those): a WHITESPACE
# before them would try every split of a long run of spaces between the two.
TOKENS_LINE = re.compile(
    rf"({SIGNS})({BRACKETED_NUMBER}(?:{WHITESPACE}{OPERATOR}{BRACKETED_NUMBER})*){WHITESPACE}"
)
PARENTHESIS = re.compile("[()]")
# An integer literal of over MAX_INT_DIGITS digits; a decimal's digits are a float's, any number.
LONG_INTEGER = re.compile(rf"(?<![0-9.])[0-9]{{{MAX_INT_DIGITS + 1},}}(?![0-9.])")


def fast_tokens(line: str) -> list[Token] | None:
    """The tokens parsed_tokens gives for line if it parses, else None (pyparsing says why).

    An integer of over MAX_INT_DIGITS digits, which fails parsing, is left to pyparsing too.
    """
    match = TOKENS_LINE.fullmatch(line)
    if match is None or not _balanced(line):
        return None
    if len(line) > MAX_INT_DIGITS and LONG_INTEGER.search(line):
        return None
    return [match[1].lstrip(" \t"), *_tokens(match[2])]


def _balanced(line: str) -> bool:
    """Whether each ')' of line closes a '(' before it, each '(' is closed, and no more than
    MAX_NESTING groups are open at once.  Meant for a line of tokens: a '(' is a group's."""
    depth = 0
    for parenthesis in PARENTHESIS.findall(line):
        depth += 1 if parenthesis == "(" else -1
        if not 0 <= depth <= MAX_NESTING:
            return False
    return depth == 0

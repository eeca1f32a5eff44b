"""The arithmetic language: its definition, a pyparsing grammar, and the evaluation of a line.

A worker (worker.py) calls ``evaluate_line`` once per line: it returns the value as text,
``""`` for a blank line, or ``error: <reason>``, and no line makes it raise, hang or exhaust
memory.

The language is Python's arithmetic on non-negative literals.  Its grammar, a rule per
precedence level, loosest first (pyparsing's ``fourFn.py`` writes its BNF the same way)::

    line    ::= expr end_of_line
    expr    ::= term (('+' | '-') term)*                     left to right
    term    ::= factor (('*' | '/' | '//' | '%') factor)*     left to right
    factor  ::= signs power                                   -2 ** 2 is -(2 ** 2)
    power   ::= atom ('**' signs atom)*                       right to left, see below
    atom    ::= number | '(' expr ')'                         at most MAX_NESTING groups open
    signs   ::= ('+' | '-')*
    number  ::= digit+ ['.' digit+]                           digit: ASCII 0-9 only

Spaces and tabs may stand between tokens.  Python writes the two middle rules ``factor ::=
('+' | '-') factor | power`` and ``power ::= atom ['**' factor]``: the same lines, but each
sign and each ``**`` a level of recursion.  Written as repetitions, ``-`` * 9,999 and a chain
of 1,666 powers cost none; only a group recurses.  So a power is applied right to left, and
the signs after a ``**`` negate all of its right side: ``2 ** -3 ** 2`` is ``2 ** -(3 ** 2)``.

Reading order, as in pyparsing's ``eval_arith.py``: the grammar, whose parse actions build a
tree of nodes (section "The grammar"); then plain Python that evaluates the tree (section
"Evaluation"); then ``evaluate_line``, which answers one line: parse, evaluate, format.  The
lesson's workers answer every line so.

The server people run plugs in an optimisation, fastpath.py: it answers the valid lines
without pyparsing and hands every other line to ``evaluate_line`` here, so every error
message and column is pyparsing's.  tests/test_grammar.py proves with Hypothesis that it
takes exactly the lines the grammar parses and gives what the grammar gives.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from operator import add, floordiv, mod, mul, sub, truediv
from typing import Callable, TypeVar, Union

import pyparsing as pp

Number = Union[int, float]

MAX_LINE_BYTES = 10_000
MAX_INT_DIGITS = 4300  # Python's own limit for printing an int (sys.int_info)
INT_LIMIT = 10**MAX_INT_DIGITS  # the smallest integer with too many digits
# Deeper groups are an error, found before pyparsing recurses past RECURSION_LIMIT.
MAX_NESTING = 200
# Set by worker.py.  pyparsing recurses 27 frames per open group, 5 more for each repetition
# the group stands in (42 in '1 + 2 * 3 ** (...)'; Python 3.9 to 3.13, pyparsing 3.3):
# MAX_NESTING groups take at most 200 * 42 = 8,400 frames, plus ~40 for the line's own levels
# and the caller's (~150 under pytest).  10,000 leaves ~1,400 to spare.  Python 3.9 and 3.10
# also spend C stack on each frame: with an 8 MiB stack they crash past ~13,000 such frames.
RECURSION_LIMIT = 10_000

NOT_UTF8 = "error: not valid UTF-8"
# worker.py decodes a request with errors="surrogateescape": each byte that is not UTF-8
# becomes one of these lone surrogates, which no other decoding produces.
NOT_UTF8_BYTE = re.compile("[\udc80-\udcff]")
FLOAT_OVERFLOW = "number too large for a float"
TOO_MANY_DIGITS = f"number too large (over {MAX_INT_DIGITS} digits)"
TOO_DEEPLY_NESTED = "too deeply nested"


class EvaluationError(Exception):
    """A line has no value; the message says why, for the user."""


def line_too_long(size_bytes: int) -> str:
    """The result text for a line of size_bytes, over MAX_LINE_BYTES."""
    return f"error: line too long ({size_bytes} bytes, limit {MAX_LINE_BYTES})"


# --- The grammar: the definition of the language. -----------------------------------------
#
# Its parse actions turn the tokens of each rule into a node of the tree below: a number is an
# int or a float, and a rule that matched a single operand stands for that operand.
#
# Each takes the three arguments pyparsing passes, (string, location, tokens), though most use
# the tokens alone: pyparsing learns the arity of one that takes fewer by calling it and
# catching the TypeError, whose traceback reads pyparsing's source from disk, once per
# process.  Every worker is a fresh process: with fewer arguments, each would pay ~0.7 ms for
# it at its first line that reaches pyparsing.


@dataclass(frozen=True)
class Chain:
    """operand (operator operand)+, applied left to right: an expr or a term."""

    first: Node
    rest: list[tuple[str, Node]]  # (operator symbol, operand)


@dataclass(frozen=True)
class Power:
    """atom ('**' signs atom)+, applied right to left."""

    atoms: list[Node]
    negations: list[bool]  # whether the signs after each '**' negate its right side


@dataclass(frozen=True)
class Negation:
    """signs power, with an odd number of '-' among the signs."""

    operand: Node


Node = Union[int, float, Chain, Power, Negation]


def number_value(literal: str) -> Number:
    """The int or float that literal (digit+ ['.' digit+]) stands for; raises EvaluationError
    for an integer of over MAX_INT_DIGITS digits (a decimal's digits are a float's, any number)."""
    if "." in literal:
        return float(literal)
    if len(literal) > MAX_INT_DIGITS:
        raise EvaluationError(TOO_MANY_DIGITS)
    return int(literal)


def negates(signs: str) -> bool:
    """Whether a run of signs negates what follows it: an odd number of '-'."""
    return signs.count("-") % 2 == 1


def _number(string: str, location: int, tokens: pp.ParseResults) -> Number:
    """Parse action of number.  A literal too long fails the parse where it stands."""
    return number_value(tokens[0])


def _chain(string: str, location: int, tokens: pp.ParseResults) -> Node:
    """Parse action of expr and term: [operand, operator, operand, ...]."""
    if len(tokens) == 1:
        only: Node = tokens[0]
        return only
    pairs = [(tokens[index], tokens[index + 1]) for index in range(1, len(tokens), 2)]
    return Chain(tokens[0], pairs)


def _factor(string: str, location: int, tokens: pp.ParseResults) -> Node:
    """Parse action of factor: [signs, power]."""
    signs, operand = tokens
    return Negation(operand) if negates(signs) else operand


def _power(string: str, location: int, tokens: pp.ParseResults) -> Node:
    """Parse action of power: [atom, '**', signs, atom, '**', signs, atom, ...]."""
    if len(tokens) == 1:
        only: Node = tokens[0]
        return only
    atoms = list(tokens[0::3])
    negations = [negates(signs) for signs in tokens[2::3]]
    return Power(atoms, negations)


class GroupDepth:
    """How many groups are open where pyparsing parses, counted by the parse actions of '('
    and ')' (as fourFn.py's parse actions push onto a stack of the grammar's).  Once '('
    matches, the group is complete or the parse fails (pyparsing's '-' below), so no
    backtracking leaves the count wrong.  parse_line sets it to 0 for each line."""

    def __init__(self) -> None:
        self.open_groups = 0

    def enter(self, string: str, location: int, tokens: pp.ParseResults) -> None:
        """Parse action of '(': the group past MAX_NESTING ends the parse, before pyparsing
        recurses into it."""
        self.open_groups += 1
        if self.open_groups > MAX_NESTING:
            raise EvaluationError(TOO_DEEPLY_NESTED)

    def leave(self, string: str, location: int, tokens: pp.ParseResults) -> None:
        """Parse action of ')'."""
        self.open_groups -= 1


def _missing_closing_parenthesis(line: str, loc: int, element: object, error: Exception) -> None:
    """Fail action of ')': an EvaluationError ends the parse here, where the ')' is missing."""
    raise EvaluationError(f"missing ')' at column {loc + 1}")


# Global to pyparsing, for elements created after it: set first.  '\f' and '\v' are no blanks.
pp.ParserElement.set_default_whitespace_chars(" \t")

group_depth = GroupDepth()

# The tokens, two of them as regular expressions that fastpath.py builds on too.
NUMBER = r"[0-9]+(?:\.[0-9]+)?"  # digit+ ['.' digit+]
# A run of signs is one token, which may be empty: an optional element would cost an exception
# for every operand without one.
SIGNS = r"(?:[ \t]*[+-])*"
number = pp.Regex(NUMBER).set_parse_action(_number)
signs = pp.Regex(SIGNS)
sum_operator = pp.one_of("+ -")
product_operator = pp.one_of("* // / %")
power_operator = pp.Literal("**")
opening = pp.Suppress("(").set_parse_action(group_depth.enter)
closing = pp.Suppress(")").set_parse_action(group_depth.leave)
closing.set_fail_action(_missing_closing_parenthesis)

# The rules, top-down as in the BNF.  '-' (not '+') between elements: once the left part
# matched, the right part must follow, and a failure is reported where it happened.
expr = pp.Forward()
term = pp.Forward()
factor = pp.Forward()
power = pp.Forward()
atom = pp.Forward()
line = expr + pp.StringEnd()
expr <<= (term + (sum_operator - term)[...]).set_parse_action(_chain)
term <<= (factor + (product_operator - factor)[...]).set_parse_action(_chain)
factor <<= (signs + power).set_parse_action(_factor)
power <<= (atom + (power_operator - signs - atom)[...]).set_parse_action(_power)
atom <<= number | opening - expr - closing
line.parse_with_tabs()  # report columns in the line as sent, not with tabs expanded
# pyparsing finishes building a grammar at its first parse: it merges nested sequences and
# names every element for its error messages.  Done here, at import, in the server: a worker,
# a fresh fork, would otherwise repeat it, ~1.5 ms, at its first line that reaches pyparsing.
line.streamline()


def parse_line(text: str) -> Node:
    """The tree of a line; raises EvaluationError if it does not parse."""
    group_depth.open_groups = 0
    try:
        tree: Node = line.parse_string(text)[0]
    except pp.ParseBaseException as error:
        found = repr(text[error.loc]) if error.loc < len(text) else "end of line"
        raise EvaluationError(f"unexpected {found} at column {error.loc + 1}") from None
    except RecursionError:  # only below RECURSION_LIMIT: an interpreter worker.py did not set up
        raise EvaluationError(TOO_DEEPLY_NESTED) from None
    return tree


# --- Evaluation: plain Python on the tree, in the order Python computes. ------------------


def evaluate(node: Node) -> Number:
    """The value of a parsed line; raises EvaluationError, ZeroDivisionError or OverflowError.

    Operands are computed left to right and each operator once its operands are, as Python
    does, so the first fault in Python's order is the one reported.
    """
    if isinstance(node, Chain):
        value = evaluate(node.first)
        for symbol, operand in node.rest:
            value = apply_operator(symbol, value, evaluate(operand))
        return value
    if isinstance(node, Power):
        atoms = [evaluate(atom) for atom in node.atoms]
        value = atoms[-1]  # the right side of the last '**'
        for base, negation in zip(reversed(atoms[:-1]), reversed(node.negations)):
            value = apply_operator("**", base, -value if negation else value)
        return value
    if isinstance(node, Negation):
        return -evaluate(node.operand)
    return node


def _raise_to(base: Number, exponent: Number) -> Number:
    """base ** exponent, refusing before computing an integer of over MAX_INT_DIGITS digits."""
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        # About exponent * log10(|base|) digits; apply_operator checks the exact boundary in the
        # result.  The exponent alone first: with |base| >= 2, over 4 * MAX_INT_DIGITS is too
        # many digits for sure (2 ** 4 > 10), and an exponent of over 308 digits (a literal may
        # have 4,300) cannot be converted to the float the estimate multiplies (OverflowError).
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
    "**": _raise_to,
}


def apply_operator(symbol: str, left: Number, right: Number) -> Number:
    """left <symbol> right with Python's operator, if the language allows the result; raises
    EvaluationError (a complex result, too many digits), ZeroDivisionError or OverflowError."""
    result = BINARY_OPERATORS[symbol](left, right)
    if isinstance(result, complex):
        raise EvaluationError("complex result")
    if isinstance(result, int) and not -INT_LIMIT < result < INT_LIMIT:
        raise EvaluationError(TOO_MANY_DIGITS)
    return result


def format_number(value: Number) -> str:
    """str(value), Python's own formatting; a float must be finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise EvaluationError(FLOAT_OVERFLOW)
    return str(value)


# --- One line in, one result out. ----------------------------------------------------------


def evaluate_line(line: str) -> str:
    """The result text for one line (without newline): its value, "" for a blank line, or
    "error: <reason>"; never raises.  The three steps of the language: parse the line into a
    tree (parse_line), evaluate the tree (evaluate), format the value (format_number); answer
    takes the last step, or turns the fault into its error line, as it does for the fast
    path's values (fastpath.py).

    line is text as worker.py decodes it, from UTF-8 with errors="surrogateescape": a byte
    that is not UTF-8 arrives as a lone surrogate U+DC80-U+DCFF, and a line holding one is
    answered with NOT_UTF8.  A direct caller gets the same answer for those code points.
    """
    # The size first: a line over the limit is refused whatever it holds (blanks, bytes that
    # are not UTF-8), as worker.py refuses one too long to decode.
    refusal = too_long(line)
    if refusal is not None:
        return refusal
    # A lone surrogate is no token, so such a line never parses: its answer names the real
    # fault rather than the surrogate's column.
    if NOT_UTF8_BYTE.search(line):
        return NOT_UTF8
    if not line.strip(" \t"):
        return ""
    return answer(line_value, line)


def line_value(line: str) -> Number:
    """The value of a line that is not blank: its tree, evaluated."""
    return evaluate(parse_line(line))


Operand = TypeVar("Operand")


def answer(value_of: Callable[[Operand], Number], operand: Operand) -> str:
    """The result text of value_of(operand): the value formatted, or the error line for the
    fault that computing it raised.  The one place a fault becomes its text, for the grammar
    and for the fast path (fastpath.py) alike."""
    try:
        return format_number(value_of(operand))
    except EvaluationError as error:
        return f"error: {error}"
    except ZeroDivisionError:
        return "error: division by zero"
    except OverflowError:
        return f"error: {FLOAT_OVERFLOW}"


def too_long(line: str) -> str | None:
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

"""The fast path: an optimisation of grammar.evaluate_line that the server people run plugs in.

grammar.py defines the language, and the lesson (lesson.py) answers every line with it:
pyparsing parses the line into a tree, plain Python evaluates the tree.  That costs hundreds
of microseconds a line, most of it pyparsing's (`make bench`, row "7. non-flat line, the
lesson's evaluator"); the server people run (bluserver.py) gives its
workers ``evaluate_line`` below instead, which answers a valid line without pyparsing, in
two steps, and hands every other line to the grammar::

    evaluate_line(line)
      1. flat_tokens:  the original's flat form ("1 + 2 * 3")      -> evaluate_flat
      2. fast_tokens:  any other line the grammar parses            -> evaluate_tokens
      3. anything else (every invalid line among them)              -> grammar.evaluate_line

It takes no line the grammar would refuse and gives the grammar's answer for every line it
takes: tests/test_grammar.py proves both with Hypothesis, so the grammar stays the one
definition and every error message and column is pyparsing's.  ``make bench`` measures
what it saves (OPERATIONS.md, "Performance").
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import islice
from typing import NamedTuple, Union

import grammar
from grammar import (
    BINARY_OPERATORS,
    MAX_INT_DIGITS,
    MAX_NESTING,
    NUMBER,
    SIGNS,
    Number,
    answer,
    apply_operator,
    negates,
    number_value,
)


def evaluate_line(line: str) -> str:
    """The result text for one line, as grammar.evaluate_line gives it; never raises."""
    flat = flat_tokens(line)
    if flat is not None:
        return answer(evaluate_flat, flat)
    # The grammar refuses a line over the limit however valid it is: so does the fast path,
    # by leaving it to the grammar.  (A flat line, at most FLAT_MAX_CHARS, is never too long.)
    if grammar.too_long(line) is not None:
        return grammar.evaluate_line(line)
    tokens = fast_tokens(line)
    if tokens is not None:
        return answer(evaluate_tokens, tokens)
    return grammar.evaluate_line(line)


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


# 2. Every other valid line.  Signs ride on the operator or '(' before them (a '-' right after
# an operand is the binary minus, anywhere else a sign), so operands and operators alternate
# and, apart from the balance of its parentheses, a line's tokens form a regular language: one
# regular expression checks them all, and a count of open groups the balance and MAX_NESTING.
BINARY = r"\*\*|//|[-+*/%]"  # '**' and '//' before '*' and '/'
OPERATOR = rf"(?:{BINARY}){SIGNS}"
OPENING = rf"\({SIGNS}"
TOKEN = re.compile(rf"{NUMBER}|{OPERATOR}|{OPENING}|\)")  # spaces and tabs between are skipped
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

# A token is a number or text: the signs that start the line ('', '-', '- +'), an opening with
# its signs ('(', '(-'), ')', or an operator with its signs ('*', '* -').
Token = Union[int, float, str]


def fast_tokens(line: str) -> list[Token] | None:
    """The tokens of line if the grammar parses it, else None (the grammar says why).

    An integer of over MAX_INT_DIGITS digits, which fails parsing, is left to the grammar too.
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


def _tokens(text: str) -> list[Token]:
    """The tokens of text, which holds whole tokens only (a line after its leading signs)."""
    return [number_value(token) if token[0].isdigit() else token for token in TOKEN.findall(text)]


NEGATE = "negate"  # a sign '-' pending until its operand's value is known
OPEN = "("  # an open group on the stack: no operator inside it applies across it
# Higher binds tighter, as in Python: -2 ** 2 is -4, and 2 ** 3 ** 2 is 512.
PRECEDENCE = {OPEN: 0, "+": 1, "-": 1, "*": 2, "/": 2, "//": 2, "%": 2, NEGATE: 3, "**": 4}


def evaluate_tokens(tokens: list[Token]) -> Number:
    """The value of a line's tokens, as grammar.evaluate gives it for the line's tree: operator-
    precedence parsing, Dijkstra's *shunting-yard* algorithm.

    Numbers go on the values stack; each operator is pending on a second stack until the next
    one binds no tighter, and is then applied to the values on top: the order Python computes
    in, so results and faults are Python's.  ')' applies what is pending since its '('.  A
    sign is a NEGATE that binds tighter than '*' and looser than a '**' after it (-2 ** 2 is
    -4); a '**' before it takes the signed operand whole (2 ** -1 is 0.5).
    """
    values: list[Number] = []
    pending: list[str] = []
    if negates(str(tokens[0])):  # the signs before the line's first operand
        pending.append(NEGATE)
    for token in islice(tokens, 1, None):
        if not isinstance(token, str):
            values.append(token)
        elif token == ")":
            while pending[-1] != OPEN:
                _apply(pending.pop(), values)
            pending.pop()
        elif token[0] == OPEN:
            pending.append(OPEN)
            if negates(token):  # the signs after '('
                pending.append(NEGATE)
        else:
            meaning = _operator_meaning(token)
            if meaning.symbol != "**":  # right to left: '**' waits for its whole right operand
                while pending and PRECEDENCE[pending[-1]] >= meaning.precedence:
                    _apply(pending.pop(), values)
            pending.append(meaning.symbol)
            if meaning.negates:
                pending.append(NEGATE)
    while pending:
        _apply(pending.pop(), values)
    return values[0]


class OperatorMeaning(NamedTuple):
    """What an operator token (an operator and the signs after it) means to evaluate_tokens."""

    symbol: str  # the binary operator: '+', '**', ...
    precedence: int  # PRECEDENCE[symbol]
    negates: bool  # whether its signs negate the operand after it (an odd number of '-')


@lru_cache(maxsize=256)  # a few operator texts make up nearly every line: '+', '* -', ...
def _operator_meaning(token: str) -> OperatorMeaning:
    """What an operator token means: its symbol, its precedence, and its signs."""
    symbol = token[:2] if token[:2] in BINARY_OPERATORS else token[0]  # '**' and '//'
    return OperatorMeaning(symbol, PRECEDENCE[symbol], negates(token[len(symbol) :]))


def _apply(symbol: str, values: list[Number]) -> None:
    """Replace the operand(s) on top of values with the pending operator's result."""
    if symbol == NEGATE:
        values[-1] = -values[-1]
        return
    right = values.pop()
    values[-1] = apply_operator(symbol, values[-1], right)

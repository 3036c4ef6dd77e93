"""Parse query text into a ``Query`` (see docs/query.md for the language).

A small tokenizer and a hand-written recursive-descent parser. ``parse`` raises only
``QuerySyntaxError``, for any input string; its message names the (1-based) column, what was
expected and what was found, e.g. ``column 16: expected a task name after BY, found end of
query``; ``.position`` is the 0-based offset and ``.expected`` the expected phrase.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn

from ..encodings import all_names, parse_encoding
from ..errors import QuerySyntaxError, UnknownNameError
from .ast import (
    AGGS,
    COMBINES,
    KEYWORDS,
    MODES,
    WEIGHTS,
    And,
    Compare,
    Expr,
    InList,
    IsNull,
    Like,
    Not,
    Or,
    Query,
    Value,
    compile_like,
)

# Deepest condition accepted: parentheses, and the depth of the AND/OR/NOT tree (a chain of
# n ANDs is n levels deep). Keeps every recursive walk of the tree far from Python's limit.
MAX_DEPTH = 100
MAX_OVERSAMPLE = 10**6

CLAUSES = ("COMBINE", "AGG", "CHECKPOINTS", "WEIGHT", "ENCODING", "MODE", "RERANK", "WHERE")
_CLAUSE_LIST = "a clause (COMBINE, AGG, CHECKPOINTS, WEIGHT, ENCODING, MODE, RERANK or WHERE)"
_VALUE = "a value ('string', number, TRUE, FALSE or NULL)"
_OPS = {"=": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}

_SPACE = frozenset(" \t\r\n\f\v")
_DIGIT = frozenset("0123456789")
_IDENT_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
_IDENT_CHAR = _IDENT_START | _DIGIT | frozenset(".-")
_NUMBER_TAIL = _IDENT_START | _DIGIT | frozenset(".")


@dataclass(frozen=True)
class Token:
    """One token: kind is name, qname ("quoted name"), keyword, string, number, op, punct, eof."""

    kind: str
    value: object
    text: str  # the source text
    pos: int  # 0-based offset of the first character
    end: int


def _printable(text: str, limit: int = 32) -> str:
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _describe(tok: Token) -> str:
    if tok.kind == "eof":
        return "end of query"
    if tok.kind == "keyword":
        return f"keyword {tok.value}"
    if tok.kind in ("name", "qname"):
        return f"name {_printable(tok.text)}"
    if tok.kind == "string":
        return f"string {_printable(tok.text)}"
    if tok.kind == "number":
        return f"number {_printable(tok.text)}"
    return f"'{tok.text}'"


def _where(text: str, pos: int) -> str:
    """'column C' (1-based), or 'line L, column C' when the query spans lines."""
    line = text.count("\n", 0, pos) + 1
    column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return f"column {column}" if "\n" not in text else f"line {line}, column {column}"


def _fail(text: str, pos: int, expected: str, found: str) -> NoReturn:
    raise QuerySyntaxError(
        f"{_where(text, pos)}: expected {expected}, found {found}", text, pos, expected
    )


def tokenize(text: str) -> list[Token]:
    """Split query text into tokens (comments and whitespace dropped), ending with an eof."""
    return list(_tokens(text))


def _tokens(text: str) -> Iterator[Token]:
    """Yield tokens lazily, so that the parser reports the first error in reading order."""
    n = len(text)
    end = 0
    i = 0
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c == "-" and text.startswith("--", i):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline + 1
        elif c in _IDENT_START:
            j = i + 1
            while j < n and text[j] in _IDENT_CHAR and not text.startswith("--", j):
                j += 1
            word = text[i:j]
            if word.upper() in KEYWORDS:
                yield Token("keyword", word.upper(), word, i, j)
            else:
                yield Token("name", word, word, i, j)
            i = end = j
        elif c in _DIGIT or (c in ".-" and _starts_number(text, i)):
            tok = _number(text, i)
            yield tok
            i = end = tok.end
        elif c == "'" or c == '"':
            tok = _quoted(text, i)
            yield tok
            i = end = tok.end
        elif c in "=<>!":
            two = text[i : i + 2]
            op = two if two in _OPS else c
            if op not in _OPS:
                _fail(text, i, "a query token", f"character {_printable(c)!r}")
            yield Token("op", _OPS[op], op, i, i + len(op))
            i = end = i + len(op)
        elif c in ",()%":
            yield Token("punct", c, c, i, i + 1)
            i = end = i + 1
        else:
            found = f"character {c!r}" if c.isprintable() else f"character U+{ord(c):04X}"
            _fail(text, i, "a query token (double-quote names that hold other characters)", found)
    yield Token("eof", None, "", end, end)


def _starts_number(text: str, i: int) -> bool:
    j = i + 1 if text[i] == "-" else i
    if j < len(text) and text[j] in _DIGIT:
        return True
    return text[j : j + 1] == "." and j + 1 < len(text) and text[j + 1] in _DIGIT


def _number(text: str, i: int) -> Token:
    n = len(text)
    j = i + 1 if text[i] == "-" else i
    while j < n and text[j] in _DIGIT:
        j += 1
    is_int = True
    if j < n and text[j] == ".":
        is_int = False
        j += 1
        while j < n and text[j] in _DIGIT:
            j += 1
    if j < n and text[j] in "eE":
        k = j + 1
        if k < n and text[k] in "+-":
            k += 1
        if k < n and text[k] in _DIGIT:
            is_int = False
            j = k
            while j < n and text[j] in _DIGIT:
                j += 1
    if j < n and text[j] in _NUMBER_TAIL:
        k = j
        while k < n and text[k] in _IDENT_CHAR:
            k += 1
        _fail(text, i, "a number (double-quote names that start with a digit)",
              f"'{_printable(text[i:k])}'")
    source = text[i:j]
    try:
        value: int | float = int(source) if is_int else float(source)
    except ValueError:  # more digits than int() converts
        _fail(text, i, "a number of at most 4300 digits", f"number {_printable(source)}")
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        _fail(text, i, "a number within the range of a double", f"number {_printable(source)}")
    return Token("number", value, source, i, j)


def _quoted(text: str, i: int) -> Token:
    quote = text[i]
    parts = []
    j = i + 1
    while True:
        k = text.find(quote, j)
        if k < 0:
            what = "string" if quote == "'" else "name"
            _fail(text, i, f"a closing {quote} for the {what} that starts here", "end of query")
        parts.append(text[j:k])
        if text.startswith(quote * 2, k):
            parts.append(quote)
            j = k + 2
        else:
            j = k + 1
            break
    value = "".join(parts)
    if quote == '"' and not value:
        _fail(text, i, "a name inside the double quotes", 'empty name ""')
    return Token("string" if quote == "'" else "qname", value, text[i:j], i, j)


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self._stream = _tokens(text)
        self.tok = next(self._stream)  # the current token; there is always one (eof last)

    # -- token helpers -------------------------------------------------------------------
    def advance(self) -> Token:
        tok = self.tok
        if tok.kind != "eof":
            self.tok = next(self._stream)
        return tok

    def is_keyword(self, *words: str) -> bool:
        return self.tok.kind == "keyword" and self.tok.value in words

    def is_punct(self, char: str) -> bool:
        return self.tok.kind == "punct" and self.tok.value == char

    def fail(self, expected: str, tok: Token | None = None, found: str | None = None) -> NoReturn:
        tok = tok or self.tok
        _fail(self.text, tok.pos, expected, found or _describe(tok))

    def expect_keyword(self, word: str, expected: str) -> Token:
        if not self.is_keyword(word):
            self.fail(expected)
        return self.advance()

    def expect_punct(self, char: str, expected: str) -> Token:
        if not self.is_punct(char):
            self.fail(expected)
        return self.advance()

    def name(self, expected: str, *, digits: bool = True) -> str:
        """A name: bare identifier, "double-quoted", 'single-quoted' or unsigned integer."""
        tok = self.tok
        if tok.kind in ("name", "qname", "string") and tok.value:
            self.advance()
            return str(tok.value)
        if digits and tok.kind == "number" and tok.text.isdigit() and tok.text.isascii():
            self.advance()
            return tok.text
        self.fail(expected)

    def word(self, allowed: tuple[str, ...], expected: str) -> str:
        """One of a fixed set of bare words (case-insensitive), returned in lower case."""
        tok = self.tok
        if tok.kind == "name" and str(tok.value).lower() in allowed:
            self.advance()
            return str(tok.value).lower()
        self.fail(expected)

    # -- the query -----------------------------------------------------------------------
    def query(self) -> Query:
        explain = False
        if self.is_keyword("EXPLAIN"):
            self.advance()
            explain = True
        top_k, top_percent = self.head(explain)
        self.expect_keyword("FROM", "FROM")
        set_name = self.name("a set name after FROM")
        self.expect_keyword("BY", "BY after the set name")
        tasks = self.name_list("task", "a task name after BY")
        clauses: dict[str, object] = {}
        seen: dict[str, Token] = {}
        after = "',' or "
        while self.tok.kind != "eof":
            tok = self.tok
            if not (tok.kind == "keyword" and tok.value in CLAUSES):
                self.fail(f"{after}{_CLAUSE_LIST} or end of query")
            if tok.value in seen:
                self.fail(f"at most one {tok.value} clause",
                          found=f"a second {tok.value} (the first is at "
                                f"{_where(self.text, seen[str(tok.value)].pos)})")
            if tok.value == "RERANK" and top_k is None and top_percent is None:
                self.fail(f"{after}{_CLAUSE_LIST} or end of query",
                          found="RERANK after SCORE (a rerank needs TOP: SCORE returns every row)")
            seen[str(tok.value)] = tok
            self.advance()
            clauses[str(tok.value)], after = self.clause(str(tok.value))
        kwargs = {}
        for key, field in (("COMBINE", "combine"), ("AGG", "agg"), ("WEIGHT", "weight")):
            if key in clauses:
                kwargs[field] = clauses[key]
        rerank, oversample = clauses.get("RERANK", (None, None))  # type: ignore[misc]
        return Query(
            explain=explain, top_k=top_k, top_percent=top_percent, set_name=set_name,
            tasks=tasks, checkpoints=clauses.get("CHECKPOINTS"),  # type: ignore[arg-type]
            encoding=clauses.get("ENCODING"), mode=clauses.get("MODE"),  # type: ignore[arg-type]
            rerank=rerank, oversample=oversample,
            where=clauses.get("WHERE"), **kwargs,  # type: ignore[arg-type]
        )

    def head(self, explain: bool) -> tuple[int | None, float | None]:
        if self.is_keyword("SCORE"):
            self.advance()
            return None, None
        if not self.is_keyword("TOP"):
            self.fail("TOP or SCORE after EXPLAIN" if explain else "EXPLAIN, TOP or SCORE")
        self.advance()
        return self.size()

    def size(self) -> tuple[int | None, float | None]:
        """TOP's operand: (count, None) or (None, percent)."""
        tok = self.tok
        if tok.kind != "number":
            self.fail("a row count or a percentage after TOP")
        self.advance()
        if self.is_punct("%"):
            self.advance()
            # compare before converting: float() of a huge int overflows
            if not 0 < tok.value <= 100:  # type: ignore[operator]
                self.fail("a percentage greater than 0 and at most 100 after TOP", tok,
                          f"{_printable(tok.text)}%")
            return None, float(tok.value)  # type: ignore[arg-type]
        if not isinstance(tok.value, int):
            self.fail("a whole number of rows (or a percentage such as 5%) after TOP", tok)
        if tok.value < 1:
            self.fail("a positive row count after TOP", tok)
        return tok.value, None

    def name_list(self, what: str, expected: str) -> tuple[str, ...]:
        names = {self.name(expected): None}  # a dict: ordered, with fast membership
        while self.is_punct(","):
            self.advance()
            tok = self.tok
            name = self.name(f"a {what} name after ','")
            if name in names:
                self.fail(f"each {what} once", tok, f"{_describe(tok)} again")
            names[name] = None
        return tuple(names)

    def clause(self, keyword: str) -> tuple[object, str]:
        """Parse one clause's body; return its value and what else may follow it."""
        if keyword == "COMBINE":
            return self.word(COMBINES, "mean, max or sum after COMBINE"), ""
        if keyword == "AGG":
            agg = self.word(AGGS, "max or mean after AGG")
            if self.is_keyword("OVER"):
                self.advance()
                self.word(("subtasks",), "subtasks after OVER")
                return agg, ""
            return agg, "OVER, "
        if keyword == "CHECKPOINTS":
            tok = self.tok
            if tok.kind == "name" and str(tok.value).lower() == "all":
                self.advance()
                if self.is_punct(","):
                    self.fail(f'{_CLAUSE_LIST} or end of query after CHECKPOINTS all '
                              '(double-quote a checkpoint named "all")')
                return None, ""
            return self.name_list("checkpoint", "a checkpoint name or all after CHECKPOINTS"), \
                "',' or "
        if keyword == "WEIGHT":
            return self.word(WEIGHTS, "lr or uniform after WEIGHT"), ""
        if keyword == "ENCODING":
            return self.encoding("ENCODING"), ""
        if keyword == "RERANK":
            rerank = self.encoding("RERANK")
            if not self.is_keyword("OVERSAMPLE"):
                return (rerank, None), "OVERSAMPLE, "
            self.advance()
            tok = self.tok
            if tok.kind != "number" or not 1 <= tok.value <= MAX_OVERSAMPLE:  # type: ignore[operator]
                self.fail(f"a number from 1 to {MAX_OVERSAMPLE:,} after OVERSAMPLE"
                          " (the shortlist is that many times k)")
            self.advance()
            return (rerank, float(tok.value)), ""  # type: ignore[arg-type]
        if keyword == "MODE":
            return self.word(MODES, "symmetric or asymmetric after MODE"), ""
        expr, _ = self.or_expr(" after WHERE", 0)
        return expr, "AND, OR, "

    def encoding(self, keyword: str) -> str:
        tok = self.tok
        expected = (f"an encoding after {keyword} ({', '.join(all_names())}; quantized ones "
                    "may add -global and/or -centered)")
        if tok.kind not in ("name", "qname", "string"):
            self.fail(expected)
        try:
            name = parse_encoding(str(tok.value)).name
        except UnknownNameError:
            self.fail(expected)
        self.advance()
        return name

    # -- conditions ----------------------------------------------------------------------
    # Each returns (expr, depth of expr's tree); `parens` counts the open parentheses.
    def or_expr(self, after: str, parens: int) -> tuple[Expr, int]:
        left, depth = self.and_expr(after, parens)
        while self.is_keyword("OR"):
            op = self.advance()
            right, rdepth = self.and_expr(" after OR", parens)
            left, depth = Or(left, right), self.deeper(op, depth, rdepth)
        return left, depth

    def and_expr(self, after: str, parens: int) -> tuple[Expr, int]:
        left, depth = self.not_expr(after, parens)
        while self.is_keyword("AND"):
            op = self.advance()
            right, rdepth = self.not_expr(" after AND", parens)
            left, depth = And(left, right), self.deeper(op, depth, rdepth)
        return left, depth

    def not_expr(self, after: str, parens: int) -> tuple[Expr, int]:
        nots = []
        while self.is_keyword("NOT"):
            nots.append(self.advance())
            after = " after NOT"
        expr, depth = self.primary(after, parens)
        for tok in reversed(nots):
            expr, depth = Not(expr), self.deeper(tok, depth)
        return expr, depth

    def deeper(self, tok: Token, *depths: int) -> int:
        depth = 1 + max(depths)
        if depth > MAX_DEPTH:
            self.fail(f"a condition at most {MAX_DEPTH} levels deep (each AND, OR and NOT "
                      "adds a level)", tok, "a deeper one")
        return depth

    def primary(self, after: str, parens: int) -> tuple[Expr, int]:
        tok = self.tok
        if self.is_punct("("):
            if parens >= MAX_DEPTH:
                self.fail(f"at most {MAX_DEPTH} nested parentheses", tok, "more")
            self.advance()
            expr, depth = self.or_expr(" after '('", parens + 1)
            self.expect_punct(")", f"')' to close the '(' at {_where(self.text, tok.pos)}")
            return expr, depth
        if tok.kind not in ("name", "qname"):
            self.fail(f"a condition (a field name, NOT or '('){after}")
        field = str(self.advance().value)
        return self.predicate(field, tok), 1

    def predicate(self, field: str, field_tok: Token) -> Expr:
        tok = self.tok
        label = _printable(field_tok.text)
        if tok.kind == "op":
            self.advance()
            return Compare(field, str(tok.value), self.value(f"{_VALUE} after {tok.text}"))
        negated = False
        if self.is_keyword("NOT"):
            self.advance()
            negated = True
            if not self.is_keyword("IN", "LIKE"):
                self.fail("IN or LIKE after NOT")
        if self.is_keyword("IN"):
            self.advance()
            self.expect_punct("(", "'(' after IN")
            values = [self.value(f"{_VALUE} after '('")]
            while not self.is_punct(")"):
                self.expect_punct(",", "',' or ')' in the IN list")
                values.append(self.value(f"{_VALUE} after ','"))
            self.advance()
            return InList(field, tuple(values), negated)
        if self.is_keyword("LIKE"):
            self.advance()
            pattern = self.tok
            if pattern.kind != "string":
                self.fail("a 'pattern' string after LIKE")
            try:
                compile_like(str(pattern.value))
            except ValueError:
                self.fail("a LIKE pattern that does not end in a lone backslash")
            self.advance()
            return Like(field, str(pattern.value), negated)
        if self.is_keyword("IS"):
            self.advance()
            if self.is_keyword("NOT"):
                self.advance()
                self.expect_keyword("NULL", "NULL after IS NOT")
                return IsNull(field, True)
            self.expect_keyword("NULL", "NULL or NOT NULL after IS")
            return IsNull(field, False)
        self.fail(f"an operator (=, !=, <, <=, >, >=, IN, NOT IN, LIKE, NOT LIKE or IS) "
                  f"after {label}")

    def value(self, expected: str) -> Value:
        tok = self.tok
        if tok.kind in ("string", "number"):
            self.advance()
            return tok.value  # type: ignore[return-value]
        if self.is_keyword("TRUE", "FALSE", "NULL"):
            self.advance()
            return {"TRUE": True, "FALSE": False, "NULL": None}[str(tok.value)]
        self.fail(expected)


def parse(text: str) -> Query:
    """Parse one query; raise QuerySyntaxError (and nothing else) if it does not parse."""
    if not isinstance(text, str):
        raise QuerySyntaxError(f"a query must be a string, not {type(text).__name__}",
                               "", 0, "a string")
    try:
        return _Parser(text).query()
    except RecursionError:  # a safety net: MAX_DEPTH should keep us far from the limit
        raise QuerySyntaxError("column 1: expected a less deeply nested query, found one "
                               "that exhausts the parser's stack", text, 0,
                               "a less deeply nested query") from None


def parse_size(text: str) -> tuple[int | None, float | None]:
    """Parse TOP's size alone ("100" -> (100, None), "5%" -> (None, 5.0)), e.g. for ``--k``."""
    parser = _Parser(text)
    size = parser.size()
    if parser.tok.kind != "eof":
        parser.fail("end of the size")
    return size


def parse_condition(text: str) -> Expr:
    """Parse a condition alone (the part after WHERE), e.g. for a CLI ``--where`` option."""
    if not isinstance(text, str):
        raise QuerySyntaxError(f"a condition must be a string, not {type(text).__name__}",
                               "", 0, "a string")
    try:
        parser = _Parser(text)
        expr, _ = parser.or_expr("", 0)
        if parser.tok.kind != "eof":
            parser.fail("AND, OR or end of condition")
    except RecursionError:
        raise QuerySyntaxError("column 1: expected a less deeply nested condition, found one "
                               "that exhausts the parser's stack", text, 0,
                               "a less deeply nested condition") from None
    return expr

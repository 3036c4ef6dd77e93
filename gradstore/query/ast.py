"""The query language's syntax tree: frozen dataclasses that print back as canonical text.

``Query`` is one parsed query; a ``WHERE`` condition is a tree of ``Expr`` nodes:
``Compare``, ``InList``, ``Like``, ``IsNull`` (the predicates) and ``And``, ``Or``, ``Not``.
Every node has ``to_text()``, whose output parses back to an equal tree, and every condition
node has ``evaluate(row)``, which says whether a row's metadata satisfies it.

Conditions use SQL's three-valued logic. A predicate is UNKNOWN (``None`` from ``truth``) when
its field is missing or NULL, when a value it compares with is NULL, or when the two sides are
of different kinds (numbers compare with numbers, strings with strings, booleans with booleans);
``NOT`` UNKNOWN is UNKNOWN; ``FALSE AND UNKNOWN`` is FALSE and ``TRUE OR UNKNOWN`` is TRUE.
``evaluate`` keeps a row only when the condition is TRUE, so a comparison with NULL, or of a
number with a string, never selects a row, and ``NOT (x = 1)`` selects exactly what ``x != 1``
does. ``IS NULL`` / ``IS NOT NULL`` are never UNKNOWN.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any

# Reserved words: a name spelled like one of these (in any case) must be double-quoted.
KEYWORDS = frozenset(
    (
        "EXPLAIN", "TOP", "SCORE", "FROM", "BY", "COMBINE", "AGG", "OVER", "CHECKPOINTS",
        "WEIGHT", "ENCODING", "MODE", "RERANK", "OVERSAMPLE", "WHERE", "AND", "OR", "NOT", "IN",
        "LIKE", "IS", "NULL", "TRUE", "FALSE",
    )
)

COMBINES = ("mean", "max", "sum")
AGGS = ("max", "mean")
WEIGHTS = ("lr", "uniform")
MODES = ("symmetric", "asymmetric")
COMPARE_OPS = ("=", "!=", "<", "<=", ">", ">=")

DEFAULT_COMBINE = "mean"
DEFAULT_AGG = "max"
DEFAULT_WEIGHT = "lr"

# A literal value in a condition: a string, a number, TRUE/FALSE, or NULL.
Value = str | int | float | bool | None

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_DIGITS = re.compile(r"[0-9]+\Z")


def is_bare_name(name: str) -> bool:
    """True if `name` can be written without quotes (an identifier that is no keyword)."""
    return bool(_IDENT.match(name)) and "--" not in name and name.upper() not in KEYWORDS


def quote_name(name: str, *, reserved: tuple[str, ...] = (), digits: bool = True) -> str:
    """Write a set, task, checkpoint or field name: bare when possible, else double-quoted.

    `reserved` holds extra words (lower case) that must be quoted in this position, such as
    ``all`` after CHECKPOINTS; `digits` says whether an all-digit name may stay bare (not for
    field names, where a number is a value).
    """
    bare = is_bare_name(name) or (digits and _DIGITS.match(name) is not None)
    if bare and name.lower() not in reserved:
        return name
    return '"' + name.replace('"', '""') + '"'


def format_value(value: Value) -> str:
    """Write a literal value as query text (strings single-quoted, '' for a quote)."""
    if value is None:
        return "NULL"
    if value is True:
        return "TRUE"
    if value is False:
        return "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"a query cannot hold the number {value!r}")
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    raise TypeError(f"not a query value: {value!r}")


def format_number(value: float) -> str:
    """Write a percentage: an integral float without its '.0', anything else as repr."""
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


@functools.lru_cache(maxsize=256)
def compile_like(pattern: str) -> re.Pattern[str]:
    """Compile a LIKE pattern to an anchored, case-sensitive regular expression.

    ``%`` matches any run of characters (including none), ``_`` exactly one character, and a
    backslash makes the next character literal (``\\%``, ``\\_``, ``\\\\``). A pattern that
    ends in a lone backslash raises ValueError.
    """
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 == len(pattern):
                raise ValueError(f"LIKE pattern {pattern!r} ends with a lone backslash")
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if c == "%" else "." if c == "_" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _kind(value: Any) -> str | None:
    """The comparison kind of a value: 'bool', 'number', 'str', or None (NULL or other)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "str"
    return None


def _lookup(row: dict, field: str) -> Any:
    """The row's value for `field`; a dotted name falls back to nested dicts; missing is None."""
    if field in row:
        return row[field]
    if "." in field:
        node: Any = row
        for part in field.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node
    return None


def _compare(left: Any, op: str, right: Any) -> bool | None:
    kind = _kind(left)
    if kind is None or kind != _kind(right):
        return None
    if op == "=":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    return bool(left >= right)


# Operator precedence for printing: a higher number binds tighter.
_PREC_OR, _PREC_AND, _PREC_NOT, _PREC_ATOM = 1, 2, 3, 4


class Expr:
    """A WHERE condition (base class of the condition nodes)."""

    _prec = _PREC_ATOM

    def truth(self, row: dict) -> bool | None:
        """Three-valued result on `row`: True, False, or None for UNKNOWN."""
        raise NotImplementedError

    def evaluate(self, row: dict) -> bool:
        """Whether `row` (a dict of row metadata) satisfies the condition (UNKNOWN -> False)."""
        return self.truth(row) is True

    def to_text(self) -> str:
        """Canonical query text for the condition; it parses back to an equal tree."""
        raise NotImplementedError

    def fields(self) -> frozenset[str]:
        """The metadata field names the condition reads."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.to_text()


def _tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else tuple(value)


@dataclass(frozen=True)
class Compare(Expr):
    """``field op value`` with op one of = != < <= > >=."""

    field: str
    op: str
    value: Value

    def __post_init__(self) -> None:
        if self.op not in COMPARE_OPS:
            raise ValueError(f"unknown comparison operator {self.op!r}")

    def truth(self, row: dict) -> bool | None:
        return _compare(_lookup(row, self.field), self.op, self.value)

    def to_text(self) -> str:
        return f"{quote_name(self.field, digits=False)} {self.op} {format_value(self.value)}"

    def fields(self) -> frozenset[str]:
        return frozenset((self.field,))


@dataclass(frozen=True)
class InList(Expr):
    """``field [NOT] IN (v, ...)``: equal to one of the values (SQL semantics for NULLs)."""

    field: str
    values: tuple[Value, ...]
    negated: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _tuple(self.values))
        if not self.values:
            raise ValueError("IN needs at least one value")

    def truth(self, row: dict) -> bool | None:
        left = _lookup(row, self.field)
        result: bool | None = False
        for value in self.values:
            eq = _compare(left, "=", value)
            if eq is True:
                result = True
                break
            if eq is None:
                result = None
        if result is None:
            return None
        return not result if self.negated else result

    def to_text(self) -> str:
        values = ", ".join(format_value(v) for v in self.values)
        op = "NOT IN" if self.negated else "IN"
        return f"{quote_name(self.field, digits=False)} {op} ({values})"

    def fields(self) -> frozenset[str]:
        return frozenset((self.field,))


@dataclass(frozen=True)
class Like(Expr):
    """``field [NOT] LIKE 'pattern'``: anchored, case-sensitive; % any run, _ one character."""

    field: str
    pattern: str
    negated: bool = False

    def truth(self, row: dict) -> bool | None:
        left = _lookup(row, self.field)
        if not isinstance(left, str):
            return None
        hit = compile_like(self.pattern).fullmatch(left) is not None
        return not hit if self.negated else hit

    def to_text(self) -> str:
        like = "NOT LIKE" if self.negated else "LIKE"
        return f"{quote_name(self.field, digits=False)} {like} {format_value(self.pattern)}"

    def fields(self) -> frozenset[str]:
        return frozenset((self.field,))


@dataclass(frozen=True)
class IsNull(Expr):
    """``field IS [NOT] NULL``: a missing field counts as NULL."""

    field: str
    negated: bool = False

    def truth(self, row: dict) -> bool | None:
        null = _lookup(row, self.field) is None
        return not null if self.negated else null

    def to_text(self) -> str:
        return f"{quote_name(self.field, digits=False)} IS {'NOT NULL' if self.negated else 'NULL'}"

    def fields(self) -> frozenset[str]:
        return frozenset((self.field,))


def _wrap(expr: Expr, parens: bool) -> str:
    text = expr.to_text()
    return f"({text})" if parens else text


@dataclass(frozen=True)
class And(Expr):
    """``left AND right``."""

    left: Expr
    right: Expr
    _prec = _PREC_AND

    def truth(self, row: dict) -> bool | None:
        a = self.left.truth(row)
        if a is False:
            return False
        b = self.right.truth(row)
        if b is False:
            return False
        return True if a is True and b is True else None

    def to_text(self) -> str:
        # AND is parsed left-associative: a right operand of the same precedence needs parens.
        left = _wrap(self.left, self.left._prec < _PREC_AND)
        right = _wrap(self.right, self.right._prec <= _PREC_AND)
        return f"{left} AND {right}"

    def fields(self) -> frozenset[str]:
        return self.left.fields() | self.right.fields()


@dataclass(frozen=True)
class Or(Expr):
    """``left OR right``."""

    left: Expr
    right: Expr
    _prec = _PREC_OR

    def truth(self, row: dict) -> bool | None:
        a = self.left.truth(row)
        if a is True:
            return True
        b = self.right.truth(row)
        if b is True:
            return True
        return False if a is False and b is False else None

    def to_text(self) -> str:
        left = _wrap(self.left, self.left._prec < _PREC_OR)
        right = _wrap(self.right, self.right._prec <= _PREC_OR)
        return f"{left} OR {right}"

    def fields(self) -> frozenset[str]:
        return self.left.fields() | self.right.fields()


@dataclass(frozen=True)
class Not(Expr):
    """``NOT expr``."""

    expr: Expr
    _prec = _PREC_NOT

    def truth(self, row: dict) -> bool | None:
        inner = self.expr.truth(row)
        return None if inner is None else not inner

    def to_text(self) -> str:
        return "NOT " + _wrap(self.expr, self.expr._prec < _PREC_NOT)

    def fields(self) -> frozenset[str]:
        return self.expr.fields()


@dataclass(frozen=True)
class Query:
    """One parsed query. Defaults are filled in: a missing clause holds its default value.

    Exactly one of `top_k` (a row count) and `top_percent` (in (0, 100]) is set for ``TOP``;
    both are None for ``SCORE`` (score every row). `checkpoints` None means all of them;
    `encoding` and `mode` None leave the choice to the planner. `rerank` names the encoding
    that rescores a shortlist of `oversample` x k rows (None: the planner's default).
    """

    explain: bool = False
    top_k: int | None = None
    top_percent: float | None = None
    set_name: str = ""
    tasks: tuple[str, ...] = ()
    combine: str = DEFAULT_COMBINE
    agg: str = DEFAULT_AGG
    checkpoints: tuple[str, ...] | None = None
    weight: str = DEFAULT_WEIGHT
    encoding: str | None = None
    mode: str | None = None
    rerank: str | None = None
    oversample: float | None = None
    where: Expr | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", _tuple(self.tasks))
        if self.checkpoints is not None:
            object.__setattr__(self, "checkpoints", _tuple(self.checkpoints))
        problems = []
        if self.top_k is not None and self.top_percent is not None:
            problems.append("top_k and top_percent are both set")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            problems.append(f"top_k must be a positive int, not {self.top_k!r}")
        if self.top_percent is not None and not 0 < self.top_percent <= 100:
            problems.append(f"top_percent must be in (0, 100], not {self.top_percent!r}")
        if not self.set_name:
            problems.append("set_name is empty")
        if not self.tasks or not all(self.tasks):
            problems.append("tasks must be a non-empty tuple of non-empty names")
        if self.checkpoints is not None and (not self.checkpoints or not all(self.checkpoints)):
            problems.append("checkpoints must be None or a non-empty tuple of names")
        for name, value, allowed in (("combine", self.combine, COMBINES), ("agg", self.agg, AGGS),
                                     ("weight", self.weight, WEIGHTS)):
            if value not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.mode is not None and self.mode not in MODES:
            problems.append(f"mode must be None or one of {', '.join(MODES)}, not {self.mode!r}")
        if self.rerank is not None and self.is_score:
            problems.append("rerank needs TOP (SCORE returns every row)")
        if self.oversample is not None and (
            self.rerank is None or isinstance(self.oversample, bool)
            or not isinstance(self.oversample, (int, float)) or not 1 <= self.oversample <= 10**6
        ):
            problems.append(f"oversample must be a number from 1 to 1e6 given with rerank, "
                            f"not {self.oversample!r}")
        if problems:
            raise ValueError("invalid Query: " + "; ".join(problems))

    @property
    def is_score(self) -> bool:
        """True for ``SCORE`` (every row's score), False for ``TOP``."""
        return self.top_k is None and self.top_percent is None

    def to_text(self) -> str:
        """Canonical query text: keywords upper case, clauses in a fixed order, defaults left out.

        It parses back to an equal Query.
        """
        parts = ["EXPLAIN"] if self.explain else []
        if self.top_k is not None:
            parts.append(f"TOP {self.top_k}")
        elif self.top_percent is not None:
            parts.append(f"TOP {format_number(self.top_percent)}%")
        else:
            parts.append("SCORE")
        parts.append(f"FROM {quote_name(self.set_name)}")
        parts.append("BY " + ", ".join(quote_name(t) for t in self.tasks))
        if self.combine != DEFAULT_COMBINE:
            parts.append(f"COMBINE {self.combine}")
        if self.agg != DEFAULT_AGG:
            parts.append(f"AGG {self.agg}")
        if self.checkpoints is not None:
            names = ", ".join(quote_name(c, reserved=("all",)) for c in self.checkpoints)
            parts.append(f"CHECKPOINTS {names}")
        if self.weight != DEFAULT_WEIGHT:
            parts.append(f"WEIGHT {self.weight}")
        if self.encoding is not None:
            parts.append(f"ENCODING {quote_name(self.encoding)}")
        if self.mode is not None:
            parts.append(f"MODE {self.mode}")
        if self.rerank is not None:
            parts.append(f"RERANK {quote_name(self.rerank)}")
            if self.oversample is not None:
                parts.append(f"OVERSAMPLE {format_number(self.oversample)}")
        if self.where is not None:
            parts.append(f"WHERE {self.where.to_text()}")
        return " ".join(parts)

    def __str__(self) -> str:
        return self.to_text()

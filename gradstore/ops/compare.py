"""compare: how well two encodings or two queries agree: Spearman correlation of their scores
over every row and the overlap of their top k."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..encodings import parse_encoding
from ..errors import SchemaMismatchError
from ..query import default_train_set
from ..query.ast import quote_name
from ..query.executor import execute
from ..query.parser import parse
from ..query.planner import plan, selection_size


@dataclass(frozen=True)
class Comparison:
    """Agreement of two scorings of the same rows."""

    a: str  # the SCORE query run for each side
    b: str
    rows: int
    spearman: float
    k: int
    overlap: float  # |top_k(A) & top_k(B)| / k

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties sharing the average of their ranks (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    new = np.r_[True, sx[1:] != sx[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n)
    ranks[order] = ((starts + ends - 1) / 2 + 1)[np.cumsum(new) - 1]
    return ranks


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when a side is constant."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-d arrays of one length, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den > 0 else float("nan")


def parse_k(k, n: int) -> int:
    """A count ("100") or a percentage ("5%") of n rows, sized as `TOP` sizes it."""
    text = str(k).strip()
    try:
        if text.endswith("%"):
            p = float(text[:-1])
            if not 0 < p <= 100:
                raise ValueError
            return selection_size(n, percent=p)
        count = int(text)
        if count < 1:
            raise ValueError
        return selection_size(n, count=count)
    except ValueError:
        raise ValueError(f"k must be a count or a percentage such as 5%, got {k!r}") from None


def compare(store, a: str, b: str, tasks: Sequence[str] = (), k="5%", set_name: str | None = None) -> Comparison:
    """Compare two encodings (`a`, `b` name encodings; `tasks` say what to score) or two queries.

    Each side runs as a SCORE query over the same train set; rows a WHERE drops on one side
    are left out of both.
    """
    qa, qb = (_score_query(store, x, tasks, set_name) for x in (a, b))
    if qa.set_name != qb.set_name:
        raise SchemaMismatchError(f"cannot compare: A scores set {qa.set_name!r}, B set {qb.set_name!r}")
    ra, rb = (execute(store, plan(store, q)) for q in (qa, qb))
    rows, ia, ib = np.intersect1d(ra.rows, rb.rows, return_indices=True)
    sa, sb = ra.scores[ia], rb.scores[ib]
    kk = parse_k(k, len(rows))
    top_a = rows[np.lexsort((rows, -sa.astype(np.float64)))[:kk]]
    top_b = rows[np.lexsort((rows, -sb.astype(np.float64)))[:kk]]
    overlap = len(np.intersect1d(top_a, top_b)) / kk if kk else float("nan")
    return Comparison(qa.to_text(), qb.to_text(), len(rows),
                      spearman(sa, sb) if len(rows) >= 2 else float("nan"), kk, overlap)


def _score_query(store, text: str, tasks, set_name):
    text = text.strip()
    if text and " " not in text:  # an encoding name
        enc = parse_encoding(text).name
        if not tasks:
            raise ValueError(f"comparing encodings ({enc}) needs a task to score")
        text = (f"SCORE FROM {quote_name(set_name or default_train_set(store))} BY "
                + ", ".join(quote_name(t) for t in tasks) + f" ENCODING {enc}")
    query = parse(text)
    if query.explain:
        raise ValueError("compare runs queries; drop EXPLAIN")
    return dataclasses.replace(query, top_k=None, top_percent=None)

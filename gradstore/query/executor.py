"""Execution: stream the train set's blocks once, score them, keep a bounded top-k.

score(z) = COMBINE_t AGG_s mean_{v in s} sum_i w_i cos(G_i(z), V_i(v)). Per block the
scorer accumulates, for every task, a (rows x subtasks) array over checkpoints, then applies
AGG and COMBINE. Memory is the block buffers plus the k best rows, whatever the pool size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..encodings import Encoding, parse_encoding
from ..quant import quantize, unpack_levels
from .planner import Plan, TaskPlan

_AGG = {"max": np.max, "mean": np.mean}
_COMBINE = {"max": np.max, "mean": np.mean, "sum": np.sum}


@dataclass
class Result:
    """Selected (or all) rows, best first for TOP, row order for SCORE."""

    ids: list[str]
    scores: np.ndarray  # float32
    rows: np.ndarray  # int64 row numbers in the train set
    plan: Plan
    records: list[dict] = field(default_factory=list, repr=False)  # row metadata, same order

    def __len__(self) -> int:
        return len(self.ids)

    def to_dicts(self) -> list[dict]:
        return [{"rank": i + 1, "id": r["id"], "score": float(s), "row": int(row),
                 **{k: v for k, v in r.items() if k not in ("id",)}}
                for i, (r, s, row) in enumerate(zip(self.records, self.scores, self.rows))]


class _TopK:
    """The k best (score, row) pairs seen so far; ties go to the lower row number."""

    def __init__(self, k: int):
        self.k = k
        self.scores = np.empty(0, np.float32)
        self.rows = np.empty(0, np.int64)

    def push(self, scores: np.ndarray, rows: np.ndarray) -> None:
        if self.k == 0:
            return
        if len(self.scores) == self.k:
            # Rows arrive in increasing order, so a newcomer must beat the k-th score outright.
            better = scores > self.scores[-1]
            if not better.any():
                return
            scores, rows = scores[better], rows[better]
        s = np.concatenate([self.scores, scores])
        r = np.concatenate([self.rows, rows])
        order = np.lexsort((r, -s.astype(np.float64)))[: self.k]
        self.scores, self.rows = s[order], r[order]


@dataclass
class _Side:
    """What scoring needs of one task at one checkpoint (see _subtask_cos for the formulas)."""

    counts: kernels.SignSubtasks | None = None  # xor-popcount: task sign rows, prepared
    queries: np.ndarray | None = None  # float-dot: one float vector per subtask
    center: float | np.ndarray = 0.0  # centered: per subtask, mean_v <c, unit direction of v>


def _unit(levels: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(levels, axis=1)
    return np.divide(levels, norms[:, None], out=np.zeros_like(levels), where=norms[:, None] > 0)


def _subtask_means(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.stack([x[starts[s]:starts[s + 1]].mean(axis=0) for s in range(len(starts) - 1)])


def _task_side(store, plan: Plan, task: TaskPlan, ckpt: str) -> _Side:
    enc = parse_encoding(plan.encoding)
    order = np.asarray(task.order, np.int64)
    starts = np.asarray(task.starts, np.int64)
    dim = store.dim
    if enc.centered:
        # The task rows' own directions: exact (asymmetric) or quantized plainly in the same
        # base encoding (symmetric). Task gradients do not share the train rows' centroid.
        v = store.vectors(task.name, ckpt, task.encoding)[order]
        base = Encoding(enc.kind, enc.bits, enc.global_scale)
        rows = quantize(v, base) if plan.mode == "symmetric" else None
        unit = _unit(v.astype(np.float64) if rows is None else
                     unpack_levels(rows.payload, base, dim).astype(np.float64))
        c = store.centroid(plan.set_name, ckpt).astype(np.float64)
        side = _Side(center=_subtask_means(unit @ c, starts))
        if plan.kernel == "xor-popcount":
            side.counts = kernels.SignSubtasks(rows.payload, starts, dim)
        else:
            side.queries = _subtask_means(unit, starts).astype(np.float32)
        return side
    rows = store.read(task.name, ckpt, task.encoding)
    if plan.kernel == "xor-popcount":  # sign rows on both sides: |v| = sqrt(d), cos = dot / d
        return _Side(counts=kernels.SignSubtasks(rows.payload[order], starts, dim))
    unit = _unit(unpack_levels(rows.payload, task.encoding, dim).astype(np.float64)[order])
    return _Side(queries=_subtask_means(unit, starts).astype(np.float32))


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    den = den.astype(np.float64)[:, None]
    return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def _subtask_cos(plan: Plan, enc: Encoding, side: _Side, blk, dim: int) -> np.ndarray:
    """(rows, subtasks): mean over each subtask's task rows of cos(train row, task row).

    Plain: <L, q_s> / |L| with q_s the subtask's collapsed unit task vectors (XOR-popcount for
    sign1 in symmetric mode). Centered (G = c + a R, R = L/|L|, exact a = |G - c| and |G|):
    mean_v cos(G, v) = (mean_v <c, v^> + a mean_v <R, v^>) / |G|, v^ the task row's unit
    direction (quantized in symmetric mode), the second mean as in the plain case.
    """
    if side.counts is not None:
        t = side.counts.means(blk.payload)
    else:
        t = _safe_div(kernels.float_dot(blk.payload, enc, dim, side.queries), blk.norm)
    if not enc.centered:
        return t
    a, full = (blk.extra[:, i].astype(np.float64) for i in range(2))
    return _safe_div(side.center[None, :] + a[:, None] * t, full)


def execute(store, plan: Plan) -> Result:
    enc = parse_encoding(plan.encoding)
    dim = store.dim
    sides = {(t.name, c): _task_side(store, plan, t, c) for t in plan.tasks for c in plan.checkpoints}
    where = plan.query.where
    top = _TopK(plan.k) if plan.k is not None else None
    all_scores = [] if top is None else None

    for start, blocks, metas in store.scan(plan.set_name, plan.checkpoints, plan.encoding,
                                          with_rows=where is not None, limit=plan.n_rows):
        n = len(blocks[0].scale)
        per_task = []
        for t in plan.tasks:
            acc = np.zeros((n, len(t.subtasks)), np.float64)
            for w, c, blk in zip(plan.weights, plan.checkpoints, blocks):
                acc += w * _subtask_cos(plan, enc, sides[(t.name, c)], blk, dim)
            per_task.append(_AGG[plan.query.agg](acc, axis=1))
        scores = _COMBINE[plan.query.combine](np.stack(per_task), axis=0).astype(np.float32)
        rows = np.arange(start, start + n, dtype=np.int64)
        if where is not None:
            keep = np.fromiter((where.evaluate(m) for m in metas), bool, n)
            scores, rows = scores[keep], rows[keep]
        if top is not None:
            top.push(scores, rows)
        else:
            all_scores.append((scores, rows))

    if top is not None:
        scores, rows = top.scores, top.rows
    elif all_scores:
        scores = np.concatenate([s for s, _ in all_scores])
        rows = np.concatenate([r for _, r in all_scores])
    else:
        scores, rows = np.empty(0, np.float32), np.empty(0, np.int64)
    records = store.rows_at(plan.set_name, rows)
    return Result([r["id"] for r in records], scores, rows, plan, records)

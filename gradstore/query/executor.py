"""Execution: stream the train set's blocks once, score them, keep a bounded top-k.

score(z) = COMBINE_t AGG_s mean_{v in s} sum_i w_i cos(G_i(z), V_i(v)). Per block the
scorer accumulates, for every task, a (rows x subtasks) array over checkpoints, then applies
AGG and COMBINE. Memory is the block buffers plus the k best rows, whatever the pool size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import kernels
from ..encodings import parse_encoding
from ..quant import unpack_levels
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
        s = np.concatenate([self.scores, scores])
        r = np.concatenate([self.rows, rows])
        order = np.lexsort((r, -s.astype(np.float64)))[: self.k]
        self.scores, self.rows = s[order], r[order]


def _task_side(store, plan: Plan, task: TaskPlan, ckpt: str) -> np.ndarray:
    """What the kernel needs of one task at one checkpoint.

    xor-popcount: the task's packed sign rows grouped by subtask.
    float-dot: one float64-accurate vector per subtask, mean_v of v/|v| (the collapse).
    """
    rows = store.read(task.name, ckpt, task.encoding)
    order = np.asarray(task.order, np.int64)
    if plan.kernel == "xor-popcount":
        return np.ascontiguousarray(rows.payload[order])
    levels = unpack_levels(rows.payload, task.encoding, store.dim).astype(np.float64)
    norms = np.linalg.norm(levels, axis=1)
    unit = np.divide(levels, norms[:, None], out=np.zeros_like(levels), where=norms[:, None] > 0)
    unit = unit[order]
    starts = task.starts
    return np.stack([unit[starts[s]:starts[s + 1]].mean(axis=0) for s in range(len(task.subtasks))]
                    ).astype(np.float32)


def execute(store, plan: Plan) -> Result:
    enc = parse_encoding(plan.encoding)
    dim = store.dim
    sides = {(t.name, c): _task_side(store, plan, t, c) for t in plan.tasks for c in plan.checkpoints}
    starts = {t.name: np.asarray(t.starts, np.int64) for t in plan.tasks}
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
                side = sides[(t.name, c)]
                if plan.kernel == "xor-popcount":
                    means = kernels.sign_subtask_means(blk.payload, side, starts[t.name], dim)
                else:
                    dots = kernels.float_dot(blk.payload, enc, dim, side)
                    norm = blk.norm.astype(np.float64)
                    means = np.divide(dots, norm[:, None], out=np.zeros(dots.shape, np.float64),
                                      where=norm[:, None] > 0)
                acc += w * means
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

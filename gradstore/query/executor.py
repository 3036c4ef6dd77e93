"""Execution: stream the train set's blocks once, score them, keep a bounded top-k.

score(z) = COMBINE_t AGG_s mean_{v in s} sum_i w_i cos(G_i(z), V_i(v)). Per block the
scorer accumulates, for every task, a (rows x subtasks) array over checkpoints, then applies
AGG and COMBINE. Blocks are scored on a small thread pool, results consumed in row order.
A two-stage plan keeps a shortlist (row numbers and scores) from the first scan, then reads
only those rows again for the second. Memory is the blocks in flight plus the rows kept,
whatever the pool size.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np

from .. import kernels
from ..encodings import Encoding, parse_encoding
from ..quant import quantize, unpack_levels
from .planner import Plan, Stage

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
    """The k best (score, row) pairs pushed so far; ties go to the lower row number.

    Rows must arrive in increasing order. Pushes are buffered and cut back to k once the
    buffer outgrows max(k, 65,536), so a push costs a comparison, not a sort.
    """

    def __init__(self, k: int):
        self.k = k
        self.scores = np.empty(0, np.float32)
        self.rows = np.empty(0, np.int64)
        self._parts: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending = 0

    def push(self, scores: np.ndarray, rows: np.ndarray) -> None:
        if self.k == 0:
            return
        if len(self.scores) == self.k:
            # Rows arrive in increasing order, so a newcomer must beat the k-th score outright.
            better = scores > self.scores[-1]
            scores, rows = scores[better], rows[better]
        if len(scores):
            self._parts.append((scores, rows))
            self._pending += len(scores)
            if self._pending >= max(self.k, 1 << 16):
                self._cut()

    def _cut(self) -> None:
        if not self._parts:
            return
        s = np.concatenate([self.scores] + [p[0] for p in self._parts])
        r = np.concatenate([self.rows] + [p[1] for p in self._parts])
        order = np.lexsort((r, -s.astype(np.float64)))[: self.k]
        self.scores, self.rows = s[order], r[order]
        self._parts, self._pending = [], 0

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), best first."""
        self._cut()
        return self.scores, self.rows


# The sign kernels return the mean sign agreement 2p - 1 of a row with a subtask's rows, which
# for randomly projected vectors estimates (2 / pi) arcsin(cos), about (2 / pi) cos near 0; a
# sign row against a float unit vector gives about sqrt(2 / pi) cos (E|x| of a unit normal).
# Scaling by the inverse puts the term on the cosine's scale, which matters only where it is
# added to another term: the centroid's in centered scoring.
_SIGN_GAIN = {"symmetric": math.pi / 2, "asymmetric": math.sqrt(math.pi / 2)}


@dataclass
class _Side:
    """What scoring needs of one task at one checkpoint (see _subtask_cos for the formulas)."""

    counts: kernels.SignSubtasks | None = None  # xor-popcount: task sign rows, prepared
    ints: kernels.IntQueries | None = None  # int-dot: one 15-bit vector per subtask
    queries: np.ndarray | None = None  # float-dot: one float vector per subtask
    center: float | np.ndarray = 0.0  # centered: per subtask, mean_v <c, unit direction of v>


def _unit(levels: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(levels, axis=1)
    return np.divide(levels, norms[:, None], out=np.zeros_like(levels), where=norms[:, None] > 0)


def _subtask_means(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.stack([x[starts[s]:starts[s + 1]].mean(axis=0) for s in range(len(starts) - 1)])


def _task_side(store, plan: Plan, stage: Stage, i: int, ckpt: str) -> _Side:
    """Task i of the plan at one checkpoint, prepared for `stage`'s kernel."""
    task = plan.tasks[i]
    task_enc = stage.task_encodings[i]
    enc = parse_encoding(stage.encoding)
    order = np.asarray(task.order, np.int64)
    starts = np.asarray(task.starts, np.int64)
    dim = store.dim
    side = _Side()
    if enc.centered:
        # The task rows' own directions (task gradients do not share the train rows' centroid):
        # exact for <c, v>, and quantized plainly in the same base encoding in symmetric mode.
        exact = _unit(store.vectors(task.name, ckpt, task_enc)[order].astype(np.float64))
        c = store.centroid(plan.set_name, ckpt).astype(np.float64)
        side.center = _subtask_means(exact @ c, starts)
        if stage.mode == "symmetric":
            base = Encoding(enc.kind, enc.bits, enc.global_scale)
            rows = quantize(exact, base)
            if stage.kernel == "xor-popcount":
                side.counts = kernels.SignSubtasks(rows.payload, starts, dim)
                return side
            unit = _unit(unpack_levels(rows.payload, base, dim).astype(np.float64))
        else:
            unit = exact
    else:
        rows = store.read(task.name, ckpt, task_enc)
        if stage.kernel == "xor-popcount":  # sign rows on both sides: |v| = sqrt(d), cos = dot / d
            side.counts = kernels.SignSubtasks(rows.payload[order], starts, dim)
            return side
        unit = _unit(unpack_levels(rows.payload, task_enc, dim).astype(np.float64)[order])
    queries = _subtask_means(unit, starts)
    if stage.kernel == "int-dot":
        side.ints = kernels.IntQueries(queries, enc, dim)
    else:
        side.queries = queries.astype(np.float32)
    return side


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    den = den.astype(np.float64)[:, None]
    return np.divide(num, den, out=np.zeros(num.shape, np.float64), where=den > 0)


def _subtask_cos(stage: Stage, enc: Encoding, side: _Side, blk, at, dim: int) -> np.ndarray:
    """(rows, subtasks): mean over each subtask's task rows of cos(train row, task row), for the
    block's rows `at` (positions; None: all of them).

    Plain: <L, q_s> / |L| with q_s the subtask's collapsed unit task vectors (XOR-popcount for
    sign1 in symmetric mode). Centered (G = c + a R, R = L/|L|, exact a = |G - c| and |G|):
    mean_v cos(G, v) = (mean_v <c, v^> + a mean_v <R, v^>) / |G|, v^ the task row's exact unit
    direction in the first term, the second mean as in the plain case (on the cosine's scale,
    see _SIGN_GAIN).
    """
    norm = blk.norm if at is None else blk.norm[at]
    if side.counts is not None:
        t = side.counts.means(blk.payload if at is None else blk.payload[at]).astype(np.float64)
    elif side.ints is not None:
        t = _safe_div(side.ints.dot(blk.payload, at), norm)
    else:
        t = _safe_div(kernels.float_dot(blk.payload, enc, dim, side.queries, at), norm)
    if not enc.centered:
        return t
    if enc.kind == "sign":
        t *= _SIGN_GAIN[stage.mode]
    extra = blk.extra if at is None else blk.extra[at]
    a, full = (extra[:, i].astype(np.float64) for i in range(2))
    return _safe_div(side.center[None, :] + a[:, None] * t, full)


class _Scorer:
    """Scores blocks of train rows for one stage: the plan's formula over tasks and checkpoints."""

    def __init__(self, store, plan: Plan, stage: Stage):
        self.plan, self.stage = plan, stage
        self.enc = parse_encoding(stage.encoding)
        self.dim = store.dim
        self.sides = [[_task_side(store, plan, stage, i, c) for c in plan.checkpoints]
                      for i in range(len(plan.tasks))]

    def __call__(self, blocks, at=None) -> np.ndarray:
        """Scores of the blocks' rows `at` (positions; None: all), one block per checkpoint."""
        plan = self.plan
        n = len(blocks[0].norm) if at is None else len(at)
        per_task = []
        for t, sides in zip(plan.tasks, self.sides):
            acc = np.zeros((n, len(t.subtasks)), np.float64)
            for w, side, blk in zip(plan.weights, sides, blocks):
                acc += w * _subtask_cos(self.stage, self.enc, side, blk, at, self.dim)
            per_task.append(_AGG[plan.query.agg](acc, axis=1))
        return _COMBINE[plan.query.combine](np.stack(per_task), axis=0).astype(np.float32)


def _scored(score: _Scorer, jobs: Iterable[tuple]) -> Iterator[tuple[tuple, np.ndarray]]:
    """(step, score(blocks, at)) for each job (step, blocks, at), in order, spread over
    numba's thread count.

    Each worker scores whole blocks on its own thread (kernels.single_threaded), so no block
    waits at a parallel barrier; at most two blocks per worker are in flight. They are views
    into the map, scored after `jobs` yields them, even after it ends: `jobs` must read
    from a snapshot the caller holds until this generator is done.
    """
    threads = numba.get_num_threads()
    if threads == 1:
        for step, blocks, at in jobs:
            yield step, score(blocks, at)
        return

    def work(blocks, at):
        with kernels.single_threaded():
            return score(blocks, at)

    with ThreadPoolExecutor(threads) as pool:
        pending: deque = deque()
        for step, blocks, at in jobs:
            pending.append((step, pool.submit(work, blocks, at)))
            if len(pending) > 2 * threads:
                step0, fut = pending.popleft()
                yield step0, fut.result()
        while pending:
            step0, fut = pending.popleft()
            yield step0, fut.result()


def execute(store, plan: Plan) -> Result:
    # The task sides are read first: inside the snapshot no handle may adopt a map another
    # process grew (see Store.snapshot), so nothing but its scans may touch the store there.
    scorers = stage_scorers(store, plan)
    # One snapshot spans both stages and outlives the first stage's scan: its last blocks are
    # still scored on the pool after the scan's generator ends, and the rerank must read the
    # rows the shortlist saw.
    with store.snapshot() as snap:
        scores, rows = run_stage(store, plan, scorers[0], snap)
        if len(scorers) > 1:
            scores, rows = run_stage(store, plan, scorers[1], snap, np.sort(rows))
    records = store.rows_at(plan.set_name, rows)
    return Result([r["id"] for r in records], scores, rows, plan, records)


def stage_scorers(tasks, plan: Plan) -> list[_Scorer]:
    """One scorer per stage, its task side read from `tasks`: the store itself, or for a
    shard of a sharded store the whole store's task rows (gradstore.sharded)."""
    return [_Scorer(tasks, plan, stage) for stage in plan.stages]


def run_stage(store, plan: Plan, score: _Scorer, snap, rows: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """One stage of the plan over this store's rows, read under `snap`: (scores, rows).

    The first stage scans every row (WHERE applies) and keeps its `keep` best, best first, or
    every score in row order; a later stage reads only `rows` (increasing: the shortlist) and
    keeps its best.
    """
    if score.stage is plan.stages[0]:
        return _first_stage(store, plan, score, snap)
    return _rerank(store, plan, score, rows, snap)


def _first_stage(store, plan: Plan, score: _Scorer, snap) -> tuple[np.ndarray, np.ndarray]:
    """Every row through the first stage: its top `keep`, or every score when keep is None."""
    where = plan.query.where
    keep = plan.stages[0].keep
    top = _TopK(keep) if keep is not None else None
    all_scores = []
    steps = store.scan(plan.set_name, plan.checkpoints, score.stage.encoding,
                       with_rows=where is not None, limit=plan.n_rows, snapshot=snap)
    jobs = ((step, step[1], None) for step in steps)
    with contextlib.closing(_scored(score, jobs)) as scored:  # waits for its pool on errors
        for (start, _, metas), scores in scored:
            n = len(scores)
            rows = np.arange(start, start + n, dtype=np.int64)
            if where is not None:
                kept = np.fromiter((where.evaluate(m) for m in metas), bool, n)
                scores, rows = scores[kept], rows[kept]
            if top is not None:
                top.push(scores, rows)
            else:
                all_scores.append((scores, rows))
    return top.best() if top is not None else in_row_order(all_scores)


def in_row_order(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """SCORE's answer: the (scores, rows) parts, in row order, one after the other."""
    if not parts:
        return np.empty(0, np.float32), np.empty(0, np.int64)
    return np.concatenate([s for s, _ in parts]), np.concatenate([r for _, r in parts])


def _rerank(store, plan: Plan, score: _Scorer, rows: np.ndarray, snap) -> tuple[np.ndarray, np.ndarray]:
    """The final stage over the shortlist's rows only: each stored block that holds some is
    scored in place at their positions (no copies), in row order, spread over the pool."""
    top = _TopK(score.stage.keep)
    steps = store.scan_rows(plan.set_name, plan.checkpoints, score.stage.encoding, rows, snapshot=snap)
    jobs = ((picked, blocks, at) for picked, at, blocks in steps)
    with contextlib.closing(_scored(score, jobs)) as scored:
        for picked, scores in scored:
            top.push(scores, picked)
    return top.best()

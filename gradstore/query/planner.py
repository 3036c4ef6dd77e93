"""Planning: check a parsed Query against the store and decide how to run it.

The plan fixes everything the scan needs: the train set and the rows it will cover, the
task sets with their subtask layout, checkpoint weights, the encoding of each side, and the
kernel. Two kernels exist:

- ``xor-popcount`` (symmetric sign1): every training row against every task row by
  XOR + popcount, averaged per subtask inside the kernel. V x d/64 word ops per row.
- ``float-dot`` (everything else): the subtask collapse
  ``mean_v cos(g, v) = <g/|g|, mean_v v/|v|>`` turns each subtask into one float vector, so a
  row costs S x d multiply-adds against the packed levels. Exact up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..encodings import Encoding, parse_encoding
from ..errors import SchemaMismatchError, UnknownNameError
from .ast import Query

# Default scoring encoding when the query names none: the first the train set holds, most
# faithful first by the fidelity benchmark (mean top-5% overlap with f32 on real gradients).
ENCODING_PREFERENCE = (
    "absmax8-centered", "absmax8", "absmax4-centered", "absmax4", "absmean8-centered", "absmean4-centered",
    "absmean2-centered", "absmean4", "absmean8", "sign1-centered", "absmean2", "sign1", "absmax2-centered",
    "absmax2", "f16", "f32",
)
FLOAT_PREFERENCE = ("f32", "f16")


@dataclass(frozen=True)
class TaskPlan:
    name: str
    encoding: str  # of the task side
    n_rows: int
    subtasks: tuple[str, ...]
    starts: tuple[int, ...]  # rows of subtask s are order[starts[s]:starts[s+1]]
    order: tuple[int, ...]  # task rows grouped by subtask


@dataclass(frozen=True)
class Plan:
    query: Query
    set_name: str
    n_rows: int
    k: int | None  # None: score every row
    encoding: str
    mode: str
    kernel: str
    checkpoints: tuple[str, ...]
    weights: tuple[float, ...]
    tasks: tuple[TaskPlan, ...]
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        q = self.query
        return {
            "query": q.to_text(),
            "set": self.set_name,
            "rows": self.n_rows,
            "k": self.k,
            "encoding": self.encoding,
            "mode": self.mode,
            "kernel": self.kernel,
            "collapse": self.kernel == "float-dot",
            "checkpoints": dict(zip(self.checkpoints, self.weights)),
            "weight": q.weight,
            "agg": q.agg,
            "combine": q.combine,
            "where": q.where.to_text() if q.where is not None else None,
            "tasks": [{"name": t.name, "rows": t.n_rows, "subtasks": len(t.subtasks),
                       "encoding": t.encoding} for t in self.tasks],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"QUERY      {self.query.to_text()}",
                 f"SCAN       {self.set_name}: {self.n_rows} rows in blocks, "
                 + ("all scores" if self.k is None else f"top {self.k} by a bounded heap"),
                 f"ENCODING   {self.encoding} ({self.mode})"]
        if self.kernel == "xor-popcount":
            lines.append("KERNEL     xor-popcount: every task row by XOR+popcount, mean per subtask fused")
        else:
            lines.append("KERNEL     float-dot with the subtask collapse: "
                         "mean_v cos(g,v) = <g/|g|, mean_v v/|v|>, one float vector per subtask")
        weights = ", ".join(f"{c}={w:.4g}" for c, w in zip(self.checkpoints, self.weights))
        lines.append(f"WEIGHTS    {self.query.weight}: {weights}")
        for t in self.tasks:
            lines.append(f"TASK       {t.name}: {t.n_rows} rows, {len(t.subtasks)} subtasks,"
                         f" {t.encoding}, AGG {self.query.agg}")
        if len(self.tasks) > 1:
            lines.append(f"COMBINE    {self.query.combine}")
        if self.query.where is not None:
            lines.append(f"WHERE      {self.query.where.to_text()}")
        lines.extend(f"NOTE       {n}" for n in self.notes)
        return "\n".join(lines)


def plan(store, query: Query) -> Plan:
    """Resolve names against the store, choose encoding, mode and kernel."""
    set_info = store.set_info(query.set_name)
    if set_info["kind"] != "train":
        raise SchemaMismatchError(f"FROM {query.set_name}: a task set; FROM takes a train set")
    all_ckpts = store.checkpoint_names()
    task_infos = {}
    for task in query.tasks:
        try:
            info = store.set_info(task)
        except UnknownNameError:
            tasks = [s for s in store.sets() if store.set_info(s)["kind"] == "task"]
            raise UnknownNameError(
                f"unknown task {task!r}; the store has: {', '.join(tasks) or '(none)'}") from None
        if info["kind"] != "task":
            raise SchemaMismatchError(f"BY {task}: a train set; BY takes task sets")
        task_infos[task] = info

    notes = []
    if query.checkpoints is None:
        ckpts = [c for c in all_ckpts if set_info["written"].get(c, 0) > 0
                 and all(t["written"].get(c, 0) > 0 for t in task_infos.values())]
        if not ckpts:
            raise SchemaMismatchError(
                f"no checkpoint holds both {query.set_name} and {', '.join(query.tasks)}")
    else:
        ckpts = [_checkpoint_name(c, all_ckpts) for c in query.checkpoints]
    weights = _weights(store, ckpts, query.weight, notes)

    encoding = _choose_encoding(query, set_info)
    enc = parse_encoding(encoding)
    mode = query.mode or ("symmetric" if enc.kind == "sign" else "asymmetric")
    if enc.is_float and mode == "symmetric":
        mode = "asymmetric"  # both sides float: the two modes coincide
    kernel = "xor-popcount" if (enc.kind == "sign" and mode == "symmetric") else "float-dot"

    tasks = []
    for name, info in task_infos.items():
        task_enc = _task_encoding(name, info, enc, mode)
        for c in ckpts:
            if info["written"].get(c, 0) < info["n_rows"]:
                raise SchemaMismatchError(
                    f"task {name!r} has {info['written'].get(c, 0)} of {info['n_rows']} rows at"
                    f" checkpoint {c!r}; finish its ingest first")
        tasks.append(_task_plan(store, name, info, task_enc))

    n_rows = store.n_rows(query.set_name, ckpts)
    if n_rows < set_info["n_rows"]:
        notes.append(f"{set_info['n_rows'] - n_rows} rows lack some checkpoint and are not scored")
    pool = n_rows
    if query.where is not None and query.top_percent is not None:
        # A percentage of the rows the WHERE keeps, as a user filtering a pool expects.
        rows = store.iter_rows(query.set_name)
        pool = sum(query.where.evaluate(next(rows)) for _ in range(n_rows))
        notes.append(f"{query.top_percent:g}% of the {pool} rows that pass WHERE")
    return Plan(query, query.set_name, n_rows, _k(query, pool), encoding, mode, kernel,
                tuple(ckpts), weights, tuple(tasks), tuple(notes))


def _checkpoint_name(name: str, all_ckpts: list[str]) -> str:
    """A checkpoint by name, or by its 1-based position in creation order (`CHECKPOINTS 1,2`)."""
    if name in all_ckpts:
        return name
    if name.isdigit() and 1 <= int(name) <= len(all_ckpts):
        return all_ckpts[int(name) - 1]
    raise UnknownNameError(f"unknown checkpoint {name!r}; the store has: {', '.join(all_ckpts)}")


def selection_size(n_rows: int, count: int | None = None, percent: float | None = None) -> int:
    """How many rows `TOP count` or `TOP percent%` keeps of n_rows.

    As LESS: the floor of the fraction, but never an empty selection of a non-empty pool.
    """
    if count is not None:
        return min(count, n_rows)
    return min(n_rows, max(1, math.floor(n_rows * percent / 100))) if n_rows else 0


def _k(query: Query, n_rows: int) -> int | None:
    if query.top_k is None and query.top_percent is None:
        return None  # SCORE
    return selection_size(n_rows, query.top_k, query.top_percent)


def _weights(store, ckpts: list[str], weight: str, notes: list[str]) -> tuple[float, ...]:
    if weight == "lr":
        lrs = {c["name"]: c["lr"] for c in store.checkpoints()}
        total = sum(lrs[c] for c in ckpts)
        if total > 0:
            return tuple(lrs[c] / total for c in ckpts)
        # lr 0 everywhere (a warmup of one optimizer step records the schedule's first lr, 0):
        # the weights are undefined, not the query, and with one checkpoint they cannot matter.
        notes.append(f"WEIGHT lr: the learning rates of {', '.join(ckpts)} sum to 0;"
                     " weighting uniformly")
    return tuple(1.0 / len(ckpts) for _ in ckpts)


def _choose_encoding(query: Query, set_info: dict) -> str:
    held = set_info["encodings"]
    if query.encoding is not None:
        name = parse_encoding(query.encoding).name
        if name not in held:
            raise UnknownNameError(
                f"set {query.set_name!r} has no encoding {name!r}; it holds: {', '.join(held)}")
        return name
    for name in ENCODING_PREFERENCE:
        if name in held:
            return name
    return next(iter(held))


def _task_encoding(task: str, info: dict, enc: Encoding, mode: str) -> str:
    held = info["encodings"]
    if mode == "symmetric" and not enc.centered:
        if enc.name not in held:
            raise UnknownNameError(
                f"MODE symmetric needs task {task!r} in {enc.name}; it holds: {', '.join(held)}")
        return enc.name
    for name in FLOAT_PREFERENCE:
        if name in held:
            return name
    why = "a centered encoding" if enc.centered else "MODE asymmetric"
    raise UnknownNameError(f"{why} needs task {task!r} in f32 or f16; it holds: {', '.join(held)}")


def _task_plan(store, name: str, info: dict, encoding: str) -> TaskPlan:
    subtasks = [r["subtask"] if r["subtask"] is not None else name for r in store.rows(name)]
    names = list(dict.fromkeys(subtasks))
    order, starts = [], [0]
    for s in names:
        order.extend(i for i, t in enumerate(subtasks) if t == s)
        starts.append(len(order))
    return TaskPlan(name, encoding, len(subtasks), tuple(names), tuple(starts), tuple(order))

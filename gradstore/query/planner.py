"""Planning: check a parsed Query against the store and decide how to run it.

The plan fixes everything the scan needs: the train set and the rows it will cover, the
task sets with their subtask layout, checkpoint weights, and one or two stages, each with
its encoding, mode, kernel and the number of rows it keeps. Three kernels exist:

- ``xor-popcount`` (symmetric sign1): every training row against every task row by
  XOR + popcount, averaged per subtask inside the kernel. V x d/64 word ops per row.
- ``int-dot`` (packed k-bit or sign rows against float task vectors): the subtask collapse
  ``mean_v cos(g, v) = <g/|g|, mean_v v/|v|>`` turns each subtask into one float vector,
  rounded to 15 bits as two int8 limbs and multiplied with the packed rows on the VNNI
  integer kernel. S x d x 2 byte multiply-adds per row.
- ``float-dot`` (f32 / f16 rows): the same collapse, float rows by float vectors.

Two stages (TOP only): the first scores every row in a cheap encoding and keeps a shortlist
of `oversample` x k rows; the second reads only those rows again in a faithful encoding and
keeps the top k of them. The default plan whenever the set holds a 1-bit and a faithful
encoding (ingest writes both by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..encodings import Encoding, parse_encoding
from ..errors import SchemaMismatchError, UnknownNameError
from .ast import Query

# Default scoring encoding of a single-stage plan when the query names none: the first the
# train set holds, most faithful first by the fidelity benchmark (mean top-5% overlap with f32
# on real gradients).
ENCODING_PREFERENCE = (
    "absmax8-centered", "absmax8", "absmax4-centered", "absmax4", "absmean8-centered", "absmean4-centered",
    "absmean2-centered", "absmean4", "absmean8", "sign1-centered", "absmean2", "sign1", "absmax2-centered",
    "absmax2", "f16", "f32",
)
FLOAT_PREFERENCE = ("f32", "f16")
# The default two-stage plan: shortlist in the first 1-bit encoding held (symmetric, XOR +
# popcount), rerank in the first faithful one held (asymmetric). absmax8 before the float
# copies: as faithful at top 5% on real gradients, and a quarter of f32's bytes to read.
SHORTLIST_PREFERENCE = ("sign1-centered", "sign1")
RERANK_PREFERENCE = ("absmax8-centered", "absmax8", "f16", "f32")
# Shortlist size over k when the query names none: the smallest that kept >= 0.98 of f32's top
# 5% on every task on real gradients (benchmarks/bench_fidelity.py, SmolLM2 LoRA r=8, 1,000
# rows: mmlu / bbh / tydiqa 0.98 / 0.98 / 1.00 at 6x; 0.98 / 0.96 / 1.00 at 4x).
DEFAULT_OVERSAMPLE = 6.0

KERNEL_TEXT = {
    "xor-popcount": "xor-popcount: every task row by XOR+popcount, mean per subtask fused",
    "int-dot": "int-dot (VNNI) with the subtask collapse mean_v cos(g,v) = <g/|g|, mean_v v/|v|>,"
               " one 15-bit integer vector per subtask",
    "float-dot": "float-dot with the subtask collapse mean_v cos(g,v) = <g/|g|, mean_v v/|v|>,"
                 " one float vector per subtask",
}


@dataclass(frozen=True)
class TaskPlan:
    name: str
    n_rows: int
    subtasks: tuple[str, ...]
    starts: tuple[int, ...]  # rows of subtask s are order[starts[s]:starts[s+1]]
    order: tuple[int, ...]  # task rows grouped by subtask


@dataclass(frozen=True)
class Stage:
    """One scoring pass: over every row (the first stage) or over the shortlist (a rerank)."""

    encoding: str
    mode: str
    kernel: str
    task_encodings: tuple[str, ...]  # per task, in Plan.tasks order
    keep: int | None  # rows it keeps: the shortlist, k, or None for SCORE

    def to_dict(self) -> dict:
        return {"encoding": self.encoding, "mode": self.mode, "kernel": self.kernel,
                "task_encodings": list(self.task_encodings), "keep": self.keep}


@dataclass(frozen=True)
class Plan:
    query: Query
    set_name: str
    n_rows: int
    k: int | None  # None: score every row
    checkpoints: tuple[str, ...]
    weights: tuple[float, ...]
    tasks: tuple[TaskPlan, ...]
    stages: tuple[Stage, ...]  # one, or a shortlist and its rerank
    notes: tuple[str, ...] = field(default=())

    @property
    def final(self) -> Stage:
        """The stage whose scores the query returns."""
        return self.stages[-1]

    @property
    def encoding(self) -> str:
        return self.final.encoding

    @property
    def mode(self) -> str:
        return self.final.mode

    @property
    def kernel(self) -> str:
        return self.final.kernel

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
            "stages": [s.to_dict() for s in self.stages],
            "rows_reread": self.stages[0].keep * len(self.checkpoints) if len(self.stages) > 1 else 0,
            "checkpoints": dict(zip(self.checkpoints, self.weights)),
            "weight": q.weight,
            "agg": q.agg,
            "combine": q.combine,
            "where": q.where.to_text() if q.where is not None else None,
            "tasks": [{"name": t.name, "rows": t.n_rows, "subtasks": len(t.subtasks),
                       "encoding": self.final.task_encodings[i]} for i, t in enumerate(self.tasks)],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [f"QUERY      {self.query.to_text()}"]
        keep = "all scores" if self.k is None else f"top {self.k} by a bounded heap"
        if len(self.stages) == 1:
            lines += [f"SCAN       {self.set_name}: {self.n_rows} rows in blocks, {keep}",
                      f"ENCODING   {self.encoding} ({self.mode})",
                      f"KERNEL     {KERNEL_TEXT[self.kernel]}"]
        else:
            first, second = self.stages
            lines += [(f"SCAN       {self.set_name}: {self.n_rows} rows in blocks, a shortlist of"
                       f" {first.keep} ({first.keep / self.k:.4g} x k) by a bounded heap"),
                      f"ENCODING   {first.encoding} ({first.mode})",
                      f"KERNEL     {KERNEL_TEXT[first.kernel]}",
                      (f"RERANK     the shortlist's {first.keep} rows x {len(self.checkpoints)}"
                       f" checkpoints read again in row order, block by block; {keep}"),
                      f"ENCODING   {second.encoding} ({second.mode})",
                      f"KERNEL     {KERNEL_TEXT[second.kernel]}"]
        weights = ", ".join(f"{c}={w:.4g}" for c, w in zip(self.checkpoints, self.weights))
        lines.append(f"WEIGHTS    {self.query.weight}: {weights}")
        for i, t in enumerate(self.tasks):
            encs = " then ".join(dict.fromkeys(s.task_encodings[i] for s in self.stages))
            lines.append(f"TASK       {t.name}: {t.n_rows} rows, {len(t.subtasks)} subtasks,"
                         f" {encs}, AGG {self.query.agg}")
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

    tasks = []
    for name, info in task_infos.items():
        for c in ckpts:
            if info["written"].get(c, 0) < info["n_rows"]:
                raise SchemaMismatchError(
                    f"task {name!r} has {info['written'].get(c, 0)} of {info['n_rows']} rows at"
                    f" checkpoint {c!r}; finish its ingest first")
        tasks.append(_task_plan(store, name, info))

    n_rows = store.n_rows(query.set_name, ckpts)
    if n_rows < set_info["n_rows"]:
        notes.append(f"{set_info['n_rows'] - n_rows} rows lack some checkpoint and are not scored")
    pool = n_rows
    if query.where is not None and query.top_percent is not None:
        # A percentage of the rows the WHERE keeps, as a user filtering a pool expects.
        pool = store.n_passing(query.set_name, query.where, n_rows)
        notes.append(f"{query.top_percent:g}% of the {pool} rows that pass WHERE")
    k = _k(query, pool)
    stages = _stages(query, set_info, task_infos, k, pool, notes)
    return Plan(query, query.set_name, n_rows, k, tuple(ckpts), weights, tuple(tasks), stages,
                tuple(notes))


def _stages(query: Query, set_info: dict, task_infos: dict, k: int | None, pool: int,
            notes: list[str]) -> tuple[Stage, ...]:
    """One stage, or a shortlist and its rerank (see the module docstring)."""
    held = set_info["encodings"]
    if query.rerank is not None:
        _check_held(query.set_name, held, query.rerank)
        first = query.encoding or next((e for e in SHORTLIST_PREFERENCE if e in held), None)
        if first is None:
            raise UnknownNameError(
                f"RERANK needs a shortlist encoding: set {query.set_name!r} holds no 1-bit encoding"
                f" ({', '.join(held)}); name one with ENCODING")
        _check_held(query.set_name, held, first)
        rerank, oversample = query.rerank, query.oversample or DEFAULT_OVERSAMPLE
    else:
        first = _choose_encoding(query, set_info)
        rerank = None
        if query.encoding is None and query.mode is None and k is not None:
            default = next((e for e in SHORTLIST_PREFERENCE if e in held), None)
            rerank = next((e for e in RERANK_PREFERENCE if e in held), None) if default else None
            first = default if rerank is not None else first
        oversample = DEFAULT_OVERSAMPLE
    if rerank is None:
        return (_stage(first, query.mode, task_infos, k),)
    shortlist = min(pool, math.ceil(oversample * k))
    if shortlist >= pool:
        notes.append(f"a shortlist of {oversample:g} x {k} rows would hold every row: one stage")
        return (_stage(rerank, "asymmetric", task_infos, k),)
    return (_stage(first, query.mode, task_infos, shortlist), _stage(rerank, "asymmetric", task_infos, k))


def _stage(encoding: str, mode: str | None, task_infos: dict, keep: int | None) -> Stage:
    enc = parse_encoding(encoding)
    mode = mode or ("symmetric" if enc.kind == "sign" else "asymmetric")
    if enc.is_float and mode == "symmetric":
        mode = "asymmetric"  # both sides float: the two modes coincide
    if enc.kind == "sign" and mode == "symmetric":
        kernel = "xor-popcount"
    else:
        kernel = "float-dot" if enc.is_float else "int-dot"
    task_encs = tuple(_task_encoding(name, info, enc, mode) for name, info in task_infos.items())
    return Stage(enc.name, mode, kernel, task_encs, keep)


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


def _check_held(set_name: str, held, name: str) -> None:
    if name not in held:
        raise UnknownNameError(f"set {set_name!r} has no encoding {name!r}; it holds: {', '.join(held)}")


def _choose_encoding(query: Query, set_info: dict) -> str:
    held = set_info["encodings"]
    if query.encoding is not None:
        name = parse_encoding(query.encoding).name
        _check_held(query.set_name, held, name)
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


def _task_plan(store, name: str, info: dict) -> TaskPlan:
    subtasks = [r["subtask"] if r["subtask"] is not None else name for r in store.rows(name)]
    names = list(dict.fromkeys(subtasks))
    order, starts = [], [0]
    for s in names:
        order.extend(i for i, t in enumerate(subtasks) if t == s)
        starts.append(len(order))
    return TaskPlan(name, len(subtasks), tuple(names), tuple(starts), tuple(order))

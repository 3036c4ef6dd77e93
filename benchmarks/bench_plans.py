"""Every query path against LESS's own scoring, side by side on the same rows in one run.

    python benchmarks/bench_plans.py --quick      # 20,000 rows x 1 checkpoint (a few minutes)
    python benchmarks/bench_plans.py              # 100,000 rows x 8192 x 1 checkpoint
    python benchmarks/bench_plans.py --rows 270679 --ckpts 4 --no-less \\
        --encodings sign1,sign1-centered,absmax8  # LESS's full shape: default plan vs 1-bit only

The reference is LESS's scoring (`less/data_selection/matching.py`) rendered in torch: the
normalized float32 train rows of each checkpoint in memory, `train @ val.T` weighted by the
checkpoint's lr and summed, `reshape(n, 57, 5).mean(-1).max(-1)`, `torch.sort` descending, the
top 5% kept. Loading the rows into memory is not timed (LESS's `torch.load`), only the scoring.

gradstore answers `TOP 5% FROM train BY mmlu` from an LMDB store holding the same rows in
f32, f16, absmax8, sign1 and sign1-centered, by every plan: the default (a sign1-centered
shortlist of 6 x k rows reranked in absmax8), each encoding single-stage in each mode. Each
query runs --repeat times, round-robin with the reference (so load spikes hit all of them),
warm (pages cached), and the best time counts. The table gives seconds, the speed-up over the
reference, and the share of the reference's top 5% each path keeps on these rows.

Rows: synthetic LESS-shaped vectors (benchmarks/common.py: a shared direction, 64 topics,
noise; mean pairwise cosine ~0.8); MMLU's 285 validation rows in 57 subtasks of 5. The speed
does not depend on the values; what each plan keeps of f32's selection on REAL gradients is
bench_fidelity.py's job (SmolLM2 LoRA gradients), not this one's.
Writes benchmarks/results/plans.json (plans_quick.json with --quick, plans_full.json at
270,679 x 4).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    LESS_LRS,
    STORES_DIR,
    Shape,
    Timer,
    build_stores,
    machine,
    print_machine,
    print_table,
    write_json,
)

import gradstore

QUERY = "TOP 5% FROM train BY mmlu"
# (label, query suffix, train encodings it needs, target speed-up over LESS's scoring)
PATHS = (
    ("default plan", "", ("sign1-centered", "absmax8"), 3.0),
    ("absmax8 asymmetric", " ENCODING absmax8", ("absmax8",), 3.0),
    ("absmax8 symmetric", " ENCODING absmax8 MODE symmetric", ("absmax8",), None),
    ("f32", " ENCODING f32", ("f32",), 1.5),
    ("f16", " ENCODING f16", ("f16",), None),
    ("sign1 symmetric", " ENCODING sign1", ("sign1",), 8.0),
    ("sign1 asymmetric", " ENCODING sign1 MODE asymmetric", ("sign1",), None),
    ("sign1-centered symmetric", " ENCODING sign1-centered", ("sign1-centered",), None),
    ("sign1-centered asymmetric", " ENCODING sign1-centered MODE asymmetric", ("sign1-centered",), None),
)
LESS = "LESS (torch, in memory)"


class LessScorer:
    """LESS's matching.py in torch over rows held in memory (normalized float32, as LESS saves)."""

    def __init__(self, store, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.torch = torch
        ckpts = store.checkpoint_names()
        lrs = {c["name"]: c["lr"] for c in store.checkpoints()}
        self.weights = [lrs[c] for c in ckpts]  # LESS passes the lrs as checkpoint weights
        subs = [r["subtask"] for r in store.rows("mmlu")]
        names = list(dict.fromkeys(subs))
        order = [i for n in names for i, s in enumerate(subs) if s == n]  # LESS: grouped by subtask
        self.n_sub = len(names)
        self.train, self.val = [], []
        n, dim = store.n_rows("train", ckpts), store.dim
        for c in ckpts:
            rows = np.empty((n, dim), np.float32)  # filled block by block: one copy in memory
            for start, (blk,), _ in store.scan("train", [c], "f32"):
                rows[start:start + len(blk.norm)] = _normalized(blk.payload.view("<f4")[:, :dim])
            self.train.append(torch.from_numpy(rows))
            self.val.append(torch.from_numpy(_normalized(store.vectors("mmlu", c, "f32")[order])))

    def top(self, k: int) -> np.ndarray:
        torch = self.torch
        score = 0
        for w, t, v in zip(self.weights, self.train, self.val):
            score = score + w * torch.matmul(t, v.transpose(0, 1))
        score = score.reshape(score.shape[0], self.n_sub, -1).mean(-1).max(-1)[0]
        _, idx = torch.sort(score, descending=True)
        return idx[:k].numpy()


def _normalized(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 rows")
    ap.add_argument("--rows", type=int, default=None, help="train rows (default 100,000)")
    ap.add_argument("--ckpts", type=int, default=1, help="checkpoints (LESS's first lrs)")
    ap.add_argument("--encodings", default="f32,f16,absmax8,sign1,sign1-centered")
    ap.add_argument("--no-less", action="store_true", help="skip the in-memory LESS reference")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reuse", action="store_true", help="reuse the store if it exists")
    ap.add_argument("--store-dir", type=Path, default=STORES_DIR)
    args = ap.parse_args(argv)
    n = args.rows or (20_000 if args.quick else 100_000)
    encs = tuple(args.encodings.split(","))
    shape = Shape(n_train=n, lrs=LESS_LRS[:args.ckpts])
    info = machine()
    print_machine(info)
    results: dict = {"machine": info, "rows": n, "dim": shape.dim, "checkpoints": args.ckpts,
                     "encodings": encs, "query": QUERY, "repeat": args.repeat}
    path = args.store_dir / f"plans-{n}-{args.ckpts}-{'-'.join(encs)}"
    if args.reuse and (path / "data.mdb").exists():
        results["build"] = "reused"
    else:
        print(f"building {path} ...", flush=True)
        results["build"] = build_stores([(str(path), encs)], shape, task_encodings_extra=("f32", "f16"),
                                        progress=False).to_dict()
    store = gradstore.open(path)
    paths = [(label, QUERY + suffix, target) for label, suffix, needs, target in PATHS
             if set(needs) <= set(encs)]
    less = None
    if not args.no_less:
        if "f32" not in encs:
            raise SystemExit("the LESS reference reads the f32 rows: store f32 or pass --no-less")
        print("loading the normalized float32 rows for the LESS reference ...", flush=True)
        less = LessScorer(store, args.threads)
    for label, text, _ in paths:  # JIT caches, plans, first page faults
        store.query(text)

    k = store.query("EXPLAIN " + QUERY).k
    best = {label: (math.inf, math.inf) for label, _, _ in paths}
    best[LESS] = (math.inf, math.inf)
    rows = {}
    for _ in range(args.repeat):
        if less is not None:
            with Timer() as t:
                rows[LESS] = less.top(k)
            best[LESS] = min(best[LESS], (t.s, t.cpu))
        for label, text, _ in paths:
            with Timer() as t:
                rows[label] = store.query(text).rows
            best[label] = min(best[label], (t.s, t.cpu))
            print(f"  {label}: {t.s:.3f} s", flush=True)
    results["loadavg_at_end"] = list(os.getloadavg())

    ref_wall = best[LESS][0] if less is not None else None
    base = best.get("sign1 symmetric", (None,))[0]
    table, out = [], {}
    for label, text, target in [(LESS, "LESS matching.py", None)] * (less is not None) + paths:
        wall, cpu = best[label]
        kept = len(set(rows[label].tolist()) & set(rows[LESS].tolist())) / k if less is not None else None
        speedup = ref_wall / wall if ref_wall else None
        out[label] = {"query": text, "wall_s": wall, "cpu_s": cpu, "speedup_vs_less": speedup,
                      "target_speedup": target, "kept_of_less_top": kept,
                      "x_sign1_symmetric_time": wall / base if base else None}
        table.append([label, wall, cpu, speedup, target, kept, out[label]["x_sign1_symmetric_time"]])
    results["paths"] = out
    results["table"] = print_table(
        ["path", "warm s", "CPU s", "x LESS", "target", "kept of LESS top", "time / sign1 sym"], table,
        title=f"\n{QUERY}: {n:,} rows x {shape.dim} x {args.ckpts} ckpts, k = {k}; best of "
              f"{args.repeat}, round-robin; loadavg at end {os.getloadavg()[0]:.1f}")
    store.close()
    name = "plans_quick" if args.quick else ("plans_full" if n == 270_679 else "plans")
    write_json(name, results)
    return results


if __name__ == "__main__":
    main()

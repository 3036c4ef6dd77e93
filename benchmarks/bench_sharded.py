"""Query time against the number of shards: the same rows in 1, 2 and 4 shard stores.

    python benchmarks/bench_sharded.py                 # 40,000 rows x 8192 x 1 checkpoint
    python benchmarks/bench_sharded.py --quick         # 8,000 rows

Each layout splits the same synthetic LESS-shaped rows (benchmarks/common.py) into contiguous
shards (the MMLU task set in the first), in absmax8 and sign1: the default plan's shortlist is
then sign1 (ingest's default sign1-centered would have each shard freeze its own centroid, so
the answers could not be checked against the plain store's; it costs 1.1x sign1). `TOP 5% FROM train BY mmlu` (the default two-stage
plan) and its absmax8 single-stage form run on one plain store and on every layout through
`open_sharded`, on the thread pool and on Ray actors (a local Ray instance, one actor per
shard), warm, best of --repeat, round-robin; every answer is checked against the plain store's.

All shards are on this one machine, so more shards add no cores: the table shows the fan-out's
overhead, not a speed-up. The paper estimate at the end (labelled as such) scales the measured
per-row cost of the plain store's scan to a 10M-row, 4-checkpoint pool over N nodes like this
one, plus the measured Ray fan-out overhead. Writes benchmarks/results/sharded.json
(sharded_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

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

QUERIES = {"default plan": "TOP 5% FROM train BY mmlu",
           "absmax8": "TOP 5% FROM train BY mmlu ENCODING absmax8"}
ENCODINGS = ("absmax8", "sign1")
PAPER_ROWS, PAPER_CKPTS, PAPER_NODES = 10_000_000, 4, (1, 2, 4, 8, 16)


def build(root: Path, shape: Shape, shards: int, reuse: bool) -> Path:
    """`shards` stores holding rows [n j / s, n (j+1) / s) and their manifest."""
    manifest = root / f"s{shards}" / "manifest.json"
    if reuse and manifest.exists():
        return manifest
    n = shape.n_train
    for j in range(shards):
        lo, hi = n * j // shards, n * (j + 1) // shards
        build_stores([(str(manifest.parent / f"shard-{j}"), ENCODINGS)], shape, with_task=j == 0,
                     n_rows=hi - lo, first_row=lo, progress=False, task_encodings_extra=("f32",))
    manifest.write_text(json.dumps({"shards": [{"path": f"shard-{j}"} for j in range(shards)]}))
    return manifest


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8,000 rows")
    ap.add_argument("--rows", type=int, default=None, help="train rows (default 40,000)")
    ap.add_argument("--ckpts", type=int, default=1, help="checkpoints (LESS's first lrs)")
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true", help="the thread pool only")
    ap.add_argument("--reuse", action="store_true", help="reuse the stores if they exist")
    ap.add_argument("--store-dir", type=Path, default=STORES_DIR)
    args = ap.parse_args(argv)
    n = args.rows or (8_000 if args.quick else 40_000)
    shape = Shape(n_train=n, lrs=LESS_LRS[:args.ckpts])
    counts = sorted({1, *(int(s) for s in args.shards.split(","))})  # 1 shard: the plain store too
    info = machine()
    print_machine(info)
    root = args.store_dir / f"sharded-{n}-{args.ckpts}"
    print(f"building {root} ...", flush=True)
    t0 = time.perf_counter()
    manifests = {s: build(root, shape, s, args.reuse) for s in counts}
    plain_path = manifests[1].parent / "shard-0"
    results: dict = {"machine": info, "rows": n, "dim": shape.dim, "checkpoints": args.ckpts,
                     "encodings": ENCODINGS, "queries": QUERIES, "repeat": args.repeat,
                     "build_s": time.perf_counter() - t0}

    plain = gradstore.open(plain_path)
    targets = {("plain store", 1): plain}
    for s, m in manifests.items():
        targets[("threads", s)] = gradstore.open_sharded(m)
    if not args.no_ray:
        import ray

        ray.init(include_dashboard=False, log_to_driver=False)
        for s, m in manifests.items():
            targets[("ray", s)] = gradstore.open_sharded(m, ray=True)
    want = {label: plain.query(q) for label, q in QUERIES.items()}
    for store in targets.values():  # warm: JIT caches (each Ray actor compiles its own), pages
        for label, q in QUERIES.items():
            got = store.query(q)
            assert got.ids == want[label].ids and (got.scores == want[label].scores).all(), label

    results["loadavg_before_timing"] = list(os.getloadavg())
    best = {(t, label): math.inf for t in targets for label in QUERIES}
    for _ in range(args.repeat):
        for t, store in targets.items():
            for label, q in QUERIES.items():
                with Timer() as timer:
                    store.query(q)
                best[t, label] = min(best[t, label], timer.s)
    results["loadavg_at_end"] = list(os.getloadavg())
    rows, out = [], []
    for (how, s) in targets:
        cells = [best[(how, s), label] for label in QUERIES]
        base = [best[("plain store", 1), label] for label in QUERIES]
        rows.append([how, s, *cells, *(c / b for c, b in zip(cells, base))])
        out.append({"executor": how, "shards": s, **{f"{label} s": c for label, c in zip(QUERIES, cells)}})
    results["timings"] = out
    results["table"] = print_table(
        ["executor", "shards", *(f"{q} s" for q in QUERIES), *(f"{q} / plain" for q in QUERIES)], rows,
        title=f"\nwarm, best of {args.repeat}: {n:,} rows x {shape.dim} x {args.ckpts} ckpts, k = "
              f"{want['default plan'].plan.k}; load average {results['loadavg_before_timing'][0]:.1f} before,"
              f" {results['loadavg_at_end'][0]:.1f} after")

    # Paper estimate: every node like this one scans its PAPER_ROWS / N rows at the measured
    # per-(row, checkpoint) cost, then the driver merges (the measured Ray overhead).
    label = "default plan"
    per_row = best[("plain store", 1), label] / (n * args.ckpts)
    overhead = max(best[("ray", 1), label] - best[("plain store", 1), label], 0.0) if not args.no_ray else 0.0
    estimate = [{"nodes": nodes, "seconds": per_row * PAPER_ROWS * PAPER_CKPTS / nodes + overhead}
                for nodes in PAPER_NODES]
    results["paper_estimate"] = {
        "label": "PAPER ESTIMATE, not measured: 10M rows x 4 checkpoints over N nodes like this one,"
                 " warm page cache, from the measured per-(row, checkpoint) cost of the default plan"
                 " plus the measured Ray fan-out overhead",
        "per_row_checkpoint_s": per_row, "ray_overhead_s": overhead, "estimates": estimate}
    print_table(["nodes", "seconds"], [[e["nodes"], e["seconds"]] for e in estimate],
                title=f"\nPAPER ESTIMATE (not measured): {PAPER_ROWS:,} rows x {PAPER_CKPTS} checkpoints,"
                      f" default plan, {per_row * 1e6:.3g} us per row and checkpoint + {overhead:.3g} s"
                      " Ray overhead")
    for store in targets.values():
        store.close()
    write_json("sharded_quick" if args.quick else "sharded", results)
    return results


if __name__ == "__main__":
    main()

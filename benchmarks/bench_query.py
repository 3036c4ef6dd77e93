"""Benchmark the full LESS query, `TOP 5% FROM train BY mmlu`, against numpy/BLAS references.

    python benchmarks/bench_query.py --quick      # 30,000 rows, encodings sign1, absmax8, f16
    python benchmarks/bench_query.py              # 270,679 rows x 8192 x 4 ckpts, sign1 + absmax8
    python benchmarks/bench_query.py --encodings sign1,absmax8,f16   # full, with the f16 master

Shape: LESS's train pool (270,679 rows, d = 8192, 4 checkpoints with LESS's learning rates)
and MMLU (285 rows in 57 subtasks of 5). Synthetic vectors (benchmarks/common.py) are streamed
into a store under benchmarks/stores/ once per encoding set (--reuse keeps it between runs).

Timed side by side, on the same store and in the same run:
- gradstore: `store.query("TOP 5% FROM train BY mmlu ENCODING e")` per encoding, cold (page
  cache dropped with posix_fadvise) and warm (best of --repeat);
- (a) QLESS's way: unpack the sign bits to float32 (np.unpackbits), BLAS against the 285
  validation rows, mean per subtask, weighted sum over checkpoints, max over subtasks;
- (b) plain numpy/BLAS over the f16 master: f16 -> float32 in blocks, the same formula.
(a) and (b) run on the first --ref-rows rows and are extrapolated linearly when that is fewer
than all rows (the table says so). The sign1 top 5% is checked against an exact numpy
reference over every row (integer dot products via BLAS, collapsed per subtask).
Writes benchmarks/results/query.json (query_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    STORES_DIR,
    Generator,
    Shape,
    Timer,
    build_stores,
    cached_fraction,
    evict,
    machine,
    mean_pairwise_cosine,
    print_machine,
    print_table,
    write_json,
)

import gradstore
from gradstore import kernels

QUERY = "TOP 5% FROM train BY mmlu"


# ---- independent numpy references ------------------------------------------------------------


def _levels(payload: np.ndarray, enc: str, dim: int) -> np.ndarray:
    """float32 levels of packed rows, in plain numpy (independent of gradstore.quant)."""
    if enc == "sign1":
        bits = np.unpackbits(payload, axis=1, bitorder="little")[:, :dim]
        return bits.astype(np.float32) * 2.0 - 1.0
    if enc == "f16":
        return payload.view("<f2")[:, :dim].astype(np.float32)
    if enc == "f32":
        return payload.view("<f4")[:, :dim].copy()
    bits = int(enc[-1])
    nf = 8 // bits
    fields = np.empty((payload.shape[0], payload.shape[1], nf), np.int16)
    for t in range(nf):
        fields[:, :, t] = (payload >> (bits * t)) & ((1 << bits) - 1)
    return (fields.reshape(payload.shape[0], -1)[:, :dim] - (1 << (bits - 1))).astype(np.float32)


def _val_side(store, enc: str, ckpts, starts):
    """Per checkpoint: unit validation vectors (285, d) float32 grouped by subtask order."""
    dim = store.dim
    out = []
    for c in ckpts:
        rows = store.read("mmlu", c, enc)
        v = _levels(rows.payload, enc, dim).astype(np.float64)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out.append(v.astype(np.float32))
    return out


def reference_scores(store, enc: str, task_enc: str, weights, limit: int | None,
                     collapse: bool, block_rows: int = 2048):
    """LESS's score over the first `limit` rows in numpy/BLAS: (scores f64, wall s, CPU s).

    collapse=False is the LESS/QLESS way: every train row against all 285 validation rows,
    then mean per subtask. collapse=True sums each subtask's validation rows first (for sign1
    both sides are +/-1, so every BLAS dot is an exact integer).
    """
    dim = store.dim
    ckpts = store.checkpoint_names()
    subs = [r["subtask"] for r in store.rows("mmlu")]
    names = list(dict.fromkeys(subs))
    order = np.concatenate([[i for i, s in enumerate(subs) if s == n] for n in names])
    counts = np.array([subs.count(n) for n in names], np.float64)
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    n = store.n_rows("train", ckpts)
    n = n if limit is None else min(n, limit)
    t0, c0 = time.perf_counter(), time.process_time()
    if enc == "sign1" and task_enc == "sign1":
        vals = []
        for c in ckpts:
            v = _levels(store.read("mmlu", c, "sign1").payload, "sign1", dim)[order]
            vals.append(np.add.reduceat(v, starts[:-1], axis=0) if collapse else v)
        denom = [counts * dim for _ in ckpts]
        sign = True
    else:
        units = [u[order] for u in _val_side(store, task_enc, ckpts, starts)]
        vals = ([np.add.reduceat(u.astype(np.float64), starts[:-1], axis=0).astype(np.float32)
                 for u in units] if collapse else units)
        denom = [counts for _ in ckpts]
        sign = False
    vt = [np.ascontiguousarray(v.T) for v in vals]
    scores = np.empty(n, np.float64)
    for start, blocks, _ in store.scan("train", ckpts, enc, limit=n):
        m = len(blocks[0].scale)
        acc = np.zeros((m, len(names)), np.float64)
        for w, blk, v, dn in zip(weights, blocks, vt, denom):
            for i0 in range(0, m, block_rows):
                x = _levels(np.asarray(blk.payload[i0:i0 + block_rows]), enc, dim)
                dots = (x @ v).astype(np.float64)
                if not sign:
                    norm = np.linalg.norm(x, axis=1).astype(np.float64)
                    dots /= np.where(norm > 0, norm, 1.0)[:, None]
                if not collapse:
                    dots = np.add.reduceat(dots, starts[:-1], axis=1)
                acc[i0:i0 + block_rows] += w * dots / dn
        scores[start:start + m] = acc.max(axis=1)
    return scores, time.perf_counter() - t0, time.process_time() - c0


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k best scores, ties to the lower row (as the executor)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def compare_top(result, ref_scores: np.ndarray) -> dict:
    """Overlap of gradstore's top k with the reference's, and the ties at the boundary."""
    k = len(result.rows)
    ref_top = top_rows(ref_scores, k)
    ours = {int(r) for r in result.rows}
    overlap = len(ours & {int(r) for r in ref_top})
    kth = ref_scores[ref_top[-1]]
    out = {"k": k, "overlap": overlap, "overlap_frac": overlap / k if k else 1.0,
           "identical_order": bool(np.array_equal(result.rows, ref_top)),
           "max_abs_score_diff": float(np.max(np.abs(result.scores.astype(np.float64)
                                                     - ref_scores[result.rows]))) if k else 0.0,
           "ref_rows_tied_at_kth_score": int(np.sum(ref_scores == kth))}
    if overlap < k:
        # Rows that differ: are they all within float rounding of the k-th score?
        diff = np.array(sorted(ours ^ {int(r) for r in ref_top}))
        out["differing_rows_max_dist_from_kth"] = float(np.max(np.abs(ref_scores[diff] - kth)))
    return out


# ---- gradstore timing ------------------------------------------------------------------------


def prewarm(dim: int) -> None:
    """Load the numba kernels (cache=True) so that a cold query measures I/O, not JIT."""
    rows = np.zeros((8, dim // 8), np.uint8)
    kernels.sign_subtask_means(rows, rows, np.array([0, 4, 8]), dim)
    for enc in ("absmax8", "absmax4", "absmax2", "sign1", "f16"):
        e = gradstore.parse_encoding(enc)
        kernels.float_dot(np.zeros((8, e.row_bytes(dim)), np.uint8), e, dim,
                          np.zeros((3, dim), np.float32))


def time_query(store, text: str, repeat: int, cold: bool) -> dict:
    out = {"query": text}
    with Timer() as t:
        store.query("EXPLAIN " + text)
    out["plan_s"] = t.s
    if cold:
        out["evicted"] = evict(store.path)
        out["cached_before_cold"] = cached_fraction(store.path)
        with Timer() as t:
            res = store.query(text)
        out["cold_s"], out["cold_cpu_s"] = t.s, t.cpu
    best, best_cpu = math.inf, math.inf
    for _ in range(repeat):
        with Timer() as t:
            res = store.query(text)
        best, best_cpu = min(best, t.s), min(best_cpu, t.cpu)
    out["warm_s"], out["warm_cpu_s"] = best, best_cpu
    out["loadavg"] = list(os.getloadavg())
    out["cached_after"] = cached_fraction(store.path)
    out["plan"] = res.plan.to_dict()
    return out, res


def breakdown(store, encoding: str, ckpts) -> dict:
    """Where a sign1 symmetric scan spends its time: LMDB scan alone, kernel alone."""
    res = store.query(f"EXPLAIN {QUERY} ENCODING {encoding}")
    task = res.tasks[0]
    sides = []
    for c in ckpts:
        p = store.read("mmlu", c, encoding).payload
        sides.append(np.ascontiguousarray(p[np.asarray(task.order)]))
    starts = np.asarray(task.starts, np.int64)
    with Timer() as t_scan:
        nbytes = 0
        for _, blocks, _ in store.scan("train", ckpts, encoding):
            nbytes += sum(b.payload.nbytes for b in blocks)  # pages not touched
    t_kernel = 0.0
    with Timer() as t_all:
        for _, blocks, _ in store.scan("train", ckpts, encoding):
            for blk, side in zip(blocks, sides):
                t = time.perf_counter()
                kernels.sign_subtask_means(blk.payload, side, starts, store.dim)
                t_kernel += time.perf_counter() - t
    n = store.n_rows("train", ckpts)
    pairs = n * len(ckpts) * task.n_rows
    return {"scan_only_s": t_scan.s, "scan_bytes": nbytes, "kernel_s": t_kernel,
            "scan_plus_kernel_s": t_all.s,
            "gword_ops_per_s": pairs * (store.dim // 64) / t_kernel / 1e9}


def profile_query(store, text: str, top: int = 15) -> str:
    pr = cProfile.Profile()
    pr.enable()
    store.query(text)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


# ---- the two sign1 subtask kernels side by side ----------------------------------------------


def bench_sign_kernels(store, ckpts, rows: int = 16384) -> dict:
    """CPU seconds of sign_subtask_means (bit-sliced counts) vs sign_subtask_weighted (one
    XOR-popcount pass per task row, what centered scoring uses) on the same rows."""
    plan = store.query(f"EXPLAIN {QUERY} ENCODING sign1")
    task = plan.tasks[0]
    starts = np.asarray(task.starts, np.int64)
    vals = np.ascontiguousarray(store.read("mmlu", ckpts[0], "sign1").payload[np.asarray(task.order)])
    parts = [np.array(blk.payload) for _, (blk,), _ in store.scan("train", [ckpts[0]], "sign1", limit=rows)]
    a = np.concatenate(parts)
    dim = store.dim
    counts = kernels.SignSubtasks(vals, starts, dim)
    weights = np.repeat(1.0 / (np.diff(starts) * dim), np.diff(starts))
    out = {"rows": len(a), "equal": bool(np.allclose(
        counts.means(a), kernels.sign_subtask_weighted(a, vals, weights, starts, dim), rtol=0, atol=1e-6))}
    for name, fn in (("bitsliced_means", lambda: counts.means(a)),
                     ("xor_weighted", lambda: kernels.sign_subtask_weighted(a, vals, weights, starts, dim))):
        best = math.inf
        for _ in range(5):
            with Timer() as t:
                fn()
            best = min(best, t.cpu)
        out[name + "_cpu_s"] = best
    out["speedup_cpu"] = out["xor_weighted_cpu_s"] / out["bitsliced_means_cpu_s"]
    return out


# ---- main ------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30,000 rows (a few minutes)")
    ap.add_argument("--rows", type=int, default=None, help="train rows (default 270,679)")
    ap.add_argument("--encodings", default=None,
                    help="stored train encodings (default: full sign1,absmax8; quick adds f16)")
    ap.add_argument("--ref-rows", type=int, default=None,
                    help="rows for the timed numpy references (default: all in --quick, else 32768)")
    ap.add_argument("--repeat", type=int, default=2, help="warm runs (best is reported)")
    ap.add_argument("--reuse", action="store_true", help="reuse the store if it exists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-dir", type=Path, default=STORES_DIR)
    args = ap.parse_args(argv)
    quick = args.quick
    n = args.rows or (30_000 if quick else 270_679)
    encs = tuple((args.encodings or ("sign1,absmax8,f16" if quick else "sign1,absmax8")).split(","))
    ref_rows = args.ref_rows or (n if quick else 32_768)
    shape = Shape(n_train=n, seed=args.seed)
    info = machine()
    print_machine(info)
    print(f"shape: {n:,} rows x {shape.dim} dims x {len(shape.lrs)} ckpts (lr {shape.lrs}); "
          f"mmlu {shape.n_val} rows in {shape.n_sub} subtasks; encodings {encs}", flush=True)
    results: dict = {"machine": info, "quick": quick, "rows": n, "dim": shape.dim,
                     "lrs": shape.lrs, "encodings": encs, "query": QUERY}

    g = Generator(shape)
    sample = g.train(0, 0, 1000)
    results["mean_pairwise_cosine"] = mean_pairwise_cosine(sample)
    results["mean_pairwise_cosine_sign"] = mean_pairwise_cosine(np.where(sample > 0, 1.0, -1.0))
    print(f"synthetic rows: mean pairwise cosine {results['mean_pairwise_cosine']:.3f} "
          f"(of their signs {results['mean_pairwise_cosine_sign']:.3f})", flush=True)

    path = args.store_dir / f"query-{n}-{'-'.join(encs)}"
    if args.reuse and (path / "data.mdb").exists():
        print(f"reusing {path}", flush=True)
        results["build"] = "reused"
    else:
        print(f"building {path} ...", flush=True)
        rep = build_stores([(str(path), encs)], shape, task_encodings_extra=("f16",))
        results["build"] = rep.to_dict()
        print(f"built in {rep.seconds_total:.0f} s", flush=True)
    store = gradstore.open(path)
    ckpts = store.checkpoint_names()
    lrs = [c["lr"] for c in store.checkpoints()]
    weights = [lr / sum(lrs) for lr in lrs]
    prewarm(store.dim)

    # -- gradstore queries
    queries = []
    for e in encs:
        queries.append((f"{e} (symmetric)" if e == "sign1" else f"{e} (vs f16 task)",
                        f"{QUERY} ENCODING {e}"))
    if "sign1" in encs:
        queries.append(("sign1 asymmetric (vs f16 task)", f"{QUERY} ENCODING sign1 MODE asymmetric"))
    timed, results_by = {}, {}
    for label, text in queries:
        print(f"query: {text}", flush=True)
        t, res = time_query(store, text, args.repeat, cold=True)
        timed[label], results_by[label] = t, res
        print(f"  cold {t['cold_s']:.3f} s, warm {t['warm_s']:.3f} s", flush=True)
    results["gradstore"] = timed

    # -- references
    refs = {}
    if "sign1" in encs:
        print(f"(a) QLESS's way on {ref_rows:,} rows ...", flush=True)
        s_a, t_a, c_a = reference_scores(store, "sign1", "sign1", weights, ref_rows, collapse=False)
        refs["qless_sign1_blas"] = {"rows_timed": len(s_a), "seconds": t_a, "cpu_s": c_a,
                                    "seconds_all_rows": t_a * n / len(s_a),
                                    "cpu_s_all_rows": c_a * n / len(s_a),
                                    "extrapolated": len(s_a) < n}
        if len(s_a) == n:
            s_exact, t_exact, c_exact = s_a, t_a, c_a
        else:
            print("exact sign1 reference (collapsed, all rows) ...", flush=True)
            s_exact, t_exact, c_exact = reference_scores(store, "sign1", "sign1", weights, None,
                                                         collapse=True)
            refs["qless_sign1_blas"]["equal_to_exact_on_subset"] = bool(
                np.allclose(s_a, s_exact[:len(s_a)], rtol=0, atol=1e-12))
        refs["exact_sign1_collapsed"] = {"rows": n, "seconds": t_exact, "cpu_s": c_exact}
        results["check_sign1"] = compare_top(results_by["sign1 (symmetric)"], s_exact)
        print(f"  check sign1: {results['check_sign1']}", flush=True)
    f16_path = None
    if "f16" in encs:
        f16_store = store
    else:
        f16_path = args.store_dir / f"query-f16-side-{ref_rows}"
        print(f"side store with the f16 master of the first {ref_rows:,} rows ...", flush=True)
        build_stores([(str(f16_path), ("f16",))], shape, n_rows=ref_rows, progress=False)
        f16_store = gradstore.open(f16_path)
    print(f"(b) numpy over the f16 master on {ref_rows:,} rows ...", flush=True)
    s_b, t_b, c_b = reference_scores(f16_store, "f16", "f16", weights, ref_rows, collapse=False)
    refs["numpy_f16_blas"] = {"rows_timed": len(s_b), "seconds": t_b, "cpu_s": c_b,
                              "seconds_all_rows": t_b * n / len(s_b),
                              "cpu_s_all_rows": c_b * n / len(s_b), "extrapolated": len(s_b) < n}
    if len(s_b) == n and "f16 (vs f16 task)" in results_by:
        results["check_f16"] = compare_top(results_by["f16 (vs f16 task)"], s_b)
        print(f"  check f16: {results['check_f16']}", flush=True)
    if "absmax8" in encs and (quick or len(s_b) == n):
        s8, _, _ = reference_scores(store, "absmax8", "f16", weights, None, collapse=True)
        results["check_absmax8"] = compare_top(results_by["absmax8 (vs f16 task)"], s8)
        print(f"  check absmax8: {results['check_absmax8']}", flush=True)
    if len(s_b) == n:  # how much of the f16 top 5% each encoding keeps
        k = len(next(iter(results_by.values())).rows)
        f16_top = {int(r) for r in top_rows(s_b, k)}
        results["overlap_with_f16_top"] = {
            label: len(f16_top & {int(r) for r in res.rows}) / k for label, res in results_by.items()}
    results["references"] = refs
    if f16_path is not None:
        f16_store.close()
        from common import remove_store
        remove_store(f16_path)

    # -- where the sign1 time goes
    if "sign1" in encs:
        results["sign1_breakdown"] = breakdown(store, "sign1", ckpts)
        print(f"sign1 breakdown: {results['sign1_breakdown']}", flush=True)
        results["sign_kernels"] = bench_sign_kernels(store, ckpts)
        print(f"sign1 kernels: {results['sign_kernels']}", flush=True)
        prof = profile_query(store, f"{QUERY} ENCODING sign1")
        results["sign1_profile"] = prof
        print(prof, flush=True)

    # -- table: wall seconds (shared box: see loadavg) and process CPU seconds
    rows = []
    qa = refs.get("qless_sign1_blas")
    fb = refs["numpy_f16_blas"]

    def ratio(ref_key, x):
        return (qa[ref_key] / x) if qa and x else None

    for label, t in timed.items():
        rows.append([f"gradstore {label}", t["cold_s"], t["warm_s"], t["warm_cpu_s"],
                     ratio("seconds_all_rows", t["warm_s"]), ratio("cpu_s_all_rows", t["warm_cpu_s"]),
                     "all", "measured"])
    if qa:
        rows.append(["(a) QLESS's way: unpackbits + BLAS vs 285 (sign1)", None,
                     qa["seconds_all_rows"], qa["cpu_s_all_rows"], 1.0, 1.0, qa["rows_timed"],
                     "extrapolated" if qa["extrapolated"] else "measured"])
        ex = refs["exact_sign1_collapsed"]
        if qa["extrapolated"]:  # else (a) itself was the exact reference over every row
                rows.append(["numpy exact sign1 reference, collapsed per subtask", None,
                         ex["seconds"], ex["cpu_s"], ratio("seconds_all_rows", ex["seconds"]),
                         ratio("cpu_s_all_rows", ex["cpu_s"]), ex["rows"], "measured"])
    rows.append(["(b) numpy: f16 master -> f32 + BLAS vs 285", None, fb["seconds_all_rows"],
                 fb["cpu_s_all_rows"], ratio("seconds_all_rows", fb["seconds_all_rows"]),
                 ratio("cpu_s_all_rows", fb["cpu_s_all_rows"]), fb["rows_timed"],
                 "extrapolated" if fb["extrapolated"] else "measured"])
    results["table"] = print_table(
        ["method", "cold s", "warm s", "warm CPU s", "x (a) wall", "x (a) CPU", "rows timed",
         "note"], rows,
        title=f"\n{QUERY}: {n:,} rows x {shape.dim} x {len(ckpts)} ckpts (cold = page cache "
              f"dropped via fadvise; warm = best of {args.repeat}; loadavg {os.getloadavg()[0]:.1f})")
    t_sign = timed.get("sign1 (symmetric)")
    if t_sign and qa:
        print(f"sign1 symmetric: {t_sign['warm_s']:.2f} s wall, {t_sign['warm_cpu_s']:.2f} CPU s "
              f"(target <= 2.5 s at 270,679 rows on 2 cores); vs QLESS's way "
              f"{qa['seconds_all_rows'] / t_sign['warm_s']:.1f}x wall, "
              f"{qa['cpu_s_all_rows'] / t_sign['warm_cpu_s']:.1f}x CPU (target >= 50x)")
        print(f"sign1 symmetric vs (b) f16 numpy: {fb['seconds_all_rows'] / t_sign['warm_s']:.1f}x wall, "
              f"{fb['cpu_s_all_rows'] / t_sign['warm_cpu_s']:.1f}x CPU")
    results["loadavg_at_end"] = list(__import__("os").getloadavg())
    store.close()
    write_json("query_quick" if quick else "query" if n == 270_679 else f"query_{n}", results)
    return results


if __name__ == "__main__":
    main()

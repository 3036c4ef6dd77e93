"""Benchmark gradstore.kernels against FAISS, numpy and float32 BLAS.

    python benchmarks/bench_kernels.py            # N = 200,000 rows, d = 8192
    python benchmarks/bench_kernels.py --quick    # N = 50,000 (about a minute)

Prints the machine and a table of seconds and ratios; writes benchmarks/results/kernels.json.
Data generation (`make_*`) and timing (`bench_*`) are separate functions taking packed rows,
so rows read from a store can be passed in place of the random ones.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from common import machine as common_machine

from gradstore import kernels

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


def machine() -> dict:
    import llvmlite.binding as llvm

    return {**common_machine(), "llvm_cpu": llvm.get_host_cpu_name()}


# ---- data --------------------------------------------------------------------------------


def make_sign_rows(n: int, dim: int, seed: int) -> np.ndarray:
    """Random packed sign1 rows (n, dim / 8) (dim a multiple of 64: no padding bits)."""
    return np.random.default_rng(seed).integers(0, 256, (n, dim // 8), dtype=np.uint8)


def make_int8_rows(n: int, dim: int, seed: int, block: int = 65536) -> np.ndarray:
    """Random packed absmax8 rows: stored bytes level + 128, levels in -127..127."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.uint8)
    for i0 in range(0, n, block):
        m = min(block, n - i0)
        out[i0:i0 + m] = rng.integers(1, 256, (m, dim), dtype=np.uint8)
    return out


def mmlu_starts(n_vals: int = 285, n_sub: int = 57) -> np.ndarray:
    """Offsets of n_sub subtasks of unequal sizes over n_vals vals (MMLU: 285 in 57)."""
    sizes = np.full(n_sub, n_vals // n_sub)
    sizes[: n_sub // 2] -= 1
    sizes[n_sub // 2: 2 * (n_sub // 2)] += 1
    sizes[-1] += n_vals - sizes.sum()
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


# ---- timing ------------------------------------------------------------------------------


def best_of(fn, repeat: int = 3):
    """(best seconds, last result) over `repeat` calls after one warm-up call."""
    out = fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def topk_from_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """Per query (column), the k best scores, sorted descending: (q, k)."""
    neg = -np.ascontiguousarray(scores.T)
    part = np.argpartition(neg, k - 1, axis=1)[:, :k]
    return -np.sort(np.take_along_axis(neg, part, axis=1), axis=1)


def bench_sign_topk(rows, queries, dim: int, k: int, repeat: int) -> dict:
    """sign1 exact top-k: sign_dot + argpartition vs FAISS IndexBinaryFlat.search."""
    t_ours, top = best_of(lambda: topk_from_scores(kernels.sign_dot(rows, queries, dim), k),
                          repeat)
    t_dot, _ = best_of(lambda: kernels.sign_dot(rows, queries, dim), repeat)
    res = {"n": len(rows), "q": len(queries), "dim": dim, "k": k,
           "gradstore_topk_s": t_ours, "gradstore_sign_dot_s": t_dot,
           "gradstore_mpairs_per_s": len(rows) * len(queries) / t_dot / 1e6}
    try:
        import faiss
    except ImportError:
        res["faiss"] = "not installed"
        return res
    index = faiss.IndexBinaryFlat(dim)
    index.add(np.ascontiguousarray(rows))
    t_faiss, (dist, _) = best_of(lambda: index.search(queries, k), repeat)
    faiss_top = dim - 2 * dist.astype(np.int64)  # Hamming distance -> +/-1 dot
    res.update(faiss_search_s=t_faiss, speedup_vs_faiss=t_faiss / t_ours,
               faiss_mpairs_per_s=len(rows) * len(queries) / t_faiss / 1e6,
               topk_agree=bool((faiss_top == top).all()))
    return res


def build_sign_store(path, rows: np.ndarray, dim: int):
    """A store holding `rows` (packed sign1) as set "train", copied as stored (no requantizing)."""
    import gradstore
    from gradstore.quant import QuantizedRows
    from gradstore.staging import Staging

    store = gradstore.create(path, dim=dim)
    store.add_checkpoint("e1", lr=1.0)
    for lo in range(0, len(rows), 65536):
        part = rows[lo:lo + 65536]
        n = len(part)
        Staging(store).write_quantized("train", "e1", {"sign1": QuantizedRows(
            part, np.ones(n, np.float32), np.full(n, np.sqrt(dim), np.float32))},
            [f"r{i}" for i in range(lo, lo + n)])
    return store


def store_topk(store, queries, dim: int, k: int) -> np.ndarray:
    """Exact sign1 top-k scores per query, streaming the store's blocks: (q, k) descending."""
    best = np.full((len(queries), 0), np.iinfo(np.int32).min, np.int64)
    for _, (blk,), _ in store.scan("train", ["e1"], "sign1"):
        scores = kernels.sign_dot(blk.payload, queries, dim).T.astype(np.int64)  # (q, rows)
        both = np.concatenate([best, scores], axis=1)
        if both.shape[1] > k:
            both = -np.partition(-both, k - 1, axis=1)[:, :k]
        best = both
    return -np.sort(-best, axis=1)


def _anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def peak_anon_during(fn) -> tuple[float, int]:
    """(seconds, peak growth of anonymous memory in KiB) while fn runs; the store's mapped
    file pages are page cache, not anonymous memory, so this is what a scan allocates."""
    import threading

    base = _anon_kib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anon_kib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t
    done.set()
    sampler.join()
    return seconds, max(peak[0], _anon_kib()) - base


def bench_store_topk(rows, queries, dim: int, k: int, repeat: int, t_faiss: float | None) -> dict:
    """sign1 top-k read from an LMDB store, and the scan's peak memory at N/4 and N rows."""
    import tempfile

    res = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as tmp:
        for label, n in (("quarter", len(rows) // 4), ("full", len(rows))):
            store = build_sign_store(f"{tmp}/{label}", rows[:n], dim)
            store_topk(store, queries, dim, k)  # warm: pages cached, kernels compiled
            seconds, peak = min(peak_anon_during(lambda s=store: store_topk(s, queries, dim, k))
                                for _ in range(repeat))
            res[label] = {"n": n, "seconds": seconds, "peak_anon_mib": peak / 1024,
                          "store_mib": os.path.getsize(f"{tmp}/{label}/data.mdb") / 2**20}
            if label == "full":
                expect = topk_from_scores(kernels.sign_dot(rows, queries, dim), k)
                res["topk_agree_with_in_memory"] = bool((store_topk(store, queries, dim, k) == expect).all())
                if t_faiss is not None:
                    res["speedup_vs_faiss"] = t_faiss / seconds
            store.close()
    return res


def bench_sign_numpy(rows, queries, dim: int, n_sample: int, t_ours: float) -> dict:
    """numpy bitwise_count on a sample of rows, extrapolated to all rows (vs t_ours, all rows)."""
    a = np.ascontiguousarray(rows[:n_sample]).view(np.uint64)
    b = np.ascontiguousarray(queries).view(np.uint64)

    def run():
        out = np.empty((len(a), len(b)), np.int64)
        for i0 in range(0, len(a), 64):
            x = np.bitwise_count(a[i0:i0 + 64, None, :] ^ b[None]).sum(-1, dtype=np.int64)
            out[i0:i0 + 64] = dim - 2 * x
        return out

    t, out = best_of(run, 1)
    assert (out == kernels.sign_dot(rows[:n_sample], queries, dim)).all()
    t_all = t * len(rows) / len(a)
    return {"n_sample": len(a), "numpy_s": t, "numpy_mpairs_per_s": len(a) * len(b) / t / 1e6,
            "numpy_s_all_rows": t_all, "speedup_vs_numpy": t_all / t_ours}


def bench_alignment(rows, queries, dim: int, repeat: int) -> dict:
    """sign_dot on aligned writable rows vs read-only rows at an odd address."""
    raw = np.empty(rows.nbytes + 1, np.uint8)
    odd = raw[1:].reshape(rows.shape)
    odd[...] = rows
    ro = np.frombuffer(memoryview(odd).toreadonly(), np.uint8).reshape(rows.shape)
    t_al, r1 = best_of(lambda: kernels.sign_dot(rows, queries, dim), repeat)
    t_un, r2 = best_of(lambda: kernels.sign_dot(ro, queries, dim), repeat)
    t_cp, _ = best_of(lambda: ro.copy(), repeat)
    assert (r1 == r2).all()
    return {"n": len(rows), "aligned_s": t_al, "unaligned_readonly_s": t_un,
            "copy_to_aligned_s": t_cp, "unaligned_over_aligned": t_un / t_al}


def bench_int8(rows, queries, dim: int, block: int, repeat: int) -> dict:
    """absmax8 int_dot vs float32 BLAS (sgemm) over the dequantized matrix.

    The dequantized float32 block is made outside the timed region (so BLAS is timed on
    its input already in memory, 4x the bytes of the packed rows).
    """
    qf = (queries.astype(np.float32) - 128.0).T.copy()
    blk = rows[:block]
    deq = blk.astype(np.float32) - 128.0
    t_blas_blk, ref = best_of(lambda: deq @ qf, repeat)
    t_int_blk, got = best_of(lambda: kernels.int_dot(blk, queries, 8, dim), repeat)
    assert (got == ref.astype(np.int64)).all()
    t_blas_all = 0.0
    for i0 in range(0, len(rows), block):
        d = rows[i0:i0 + block].astype(np.float32) - 128.0
        t = time.perf_counter()
        d @ qf
        t_blas_all += time.perf_counter() - t
    t_int_all, _ = best_of(lambda: kernels.int_dot(rows, queries, 8, dim), 1)
    return {"n": len(rows), "q": len(queries), "dim": dim, "block": block,
            "blas_block_s": t_blas_blk, "int_dot_block_s": t_int_blk,
            "speedup_block": t_blas_blk / t_int_blk,
            "blas_all_rows_s": t_blas_all, "int_dot_all_rows_s": t_int_all,
            "speedup_all_rows": t_blas_all / t_int_all,
            "int_dot_gmacs": len(rows) * len(queries) * dim / t_int_all / 1e9}


def bench_subtask_means(sign_rows, int_rows, dim: int, repeat: int, seed: int) -> dict:
    """Fused LESS kernels for MMLU's shape (285 vals in 57 subtasks), per 100k rows."""
    starts = mmlu_starts()
    nv = int(starts[-1])
    sv = make_sign_rows(nv, dim, seed + 1)
    t_sign, _ = best_of(lambda: kernels.sign_subtask_means(sign_rows, sv, starts, dim), repeat)
    w = np.random.default_rng(seed + 3).standard_normal(nv).astype(np.float32)
    t_wsign, _ = best_of(
        lambda: kernels.sign_subtask_weighted(sign_rows, sv, w, starts, dim), repeat)
    iv = make_int8_rows(nv, dim, seed + 2)
    rn = np.ones(len(int_rows), np.float32)
    vn = np.ones(nv, np.float32)
    t_int, _ = best_of(
        lambda: kernels.int_subtask_means(int_rows, rn, iv, vn, starts, 8, dim), repeat)
    return {"vals": nv, "subtasks": len(starts) - 1,
            "sign1_s_per_100k_rows": t_sign * 1e5 / len(sign_rows),
            "sign1_weighted_s_per_100k_rows": t_wsign * 1e5 / len(sign_rows),
            "absmax8_s_per_100k_rows": t_int * 1e5 / len(int_rows)}


# ---- main --------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 50,000 rows (about a minute)")
    ap.add_argument("--n", type=int, default=None, help="rows (default 200,000; --quick 50,000)")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    n = args.n or (50_000 if args.quick else 200_000)
    repeat = 2 if args.quick else 3
    dim, nq = args.dim, args.queries

    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"rows N={n:,}  dim={dim}  queries={nq}  k={args.k}")

    sign_rows = make_sign_rows(n, dim, args.seed)
    sign_q = make_sign_rows(nq, dim, args.seed + 10)
    results = {"machine": info, "args": {"n": n, "dim": dim, "queries": nq, "k": args.k,
                                         "quick": args.quick}}
    results["sign_topk"] = bench_sign_topk(sign_rows, sign_q, dim, args.k, repeat)
    results["sign_store_topk"] = bench_store_topk(sign_rows, sign_q, dim, args.k, repeat,
                                                  results["sign_topk"].get("faiss_search_s"))
    results["sign_numpy"] = bench_sign_numpy(sign_rows, sign_q, dim, min(n, 2000),
                                             results["sign_topk"]["gradstore_sign_dot_s"])
    results["alignment"] = bench_alignment(sign_rows[: min(n, 20_000)], sign_q, dim, repeat)
    int_rows = make_int8_rows(n, dim, args.seed + 20)
    int_q = make_int8_rows(nq, dim, args.seed + 30)
    results["int8"] = bench_int8(int_rows, int_q, dim, 4096, repeat)
    results["subtask_means"] = bench_subtask_means(sign_rows, int_rows, dim, repeat, args.seed)

    st, sn, al = results["sign_topk"], results["sign_numpy"], results["alignment"]
    i8, sm = results["int8"], results["subtask_means"]
    rows = [
        ("sign1 top-k: gradstore sign_dot + top-k", st["gradstore_topk_s"], ""),
        ("sign1: gradstore sign_dot only", st["gradstore_sign_dot_s"],
         f"{st['gradstore_mpairs_per_s']:.0f} M pairs/s"),
    ]
    if "faiss_search_s" in st:
        rows.append(("sign1 top-k: FAISS IndexBinaryFlat.search", st["faiss_search_s"],
                     (f"{st['speedup_vs_faiss']:.2f}x slower than gradstore; "
                      f"top-k agree: {st['topk_agree']}")))
    ss = results["sign_store_topk"]
    rows += [
        (f"sign1 top-k read from the store, {ss['full']['n']:,} rows", ss["full"]["seconds"],
         (f"{ss.get('speedup_vs_faiss', float('nan')):.2f}x faster than FAISS; agrees with in-memory:"
          f" {ss['topk_agree_with_in_memory']}; peak scan memory {ss['full']['peak_anon_mib']:.1f} MiB"
          f" for a {ss['full']['store_mib']:.0f} MiB store")),
        (f"sign1 top-k read from the store, {ss['quarter']['n']:,} rows", ss["quarter"]["seconds"],
         f"peak scan memory {ss['quarter']['peak_anon_mib']:.1f} MiB for a {ss['quarter']['store_mib']:.0f} MiB store"),
        (f"sign1: numpy bitwise_count (from {sn['n_sample']} rows)", sn["numpy_s_all_rows"],
         f"{sn['speedup_vs_numpy']:.1f}x slower than gradstore"),
        (f"sign1: unaligned read-only rows ({al['n']:,})", al["unaligned_readonly_s"],
         (f"{al['unaligned_over_aligned']:.2f}x aligned ({al['aligned_s']:.4f} s); "
          f"copy would cost {al['copy_to_aligned_s']:.4f} s")),
        ("absmax8: gradstore int_dot, all rows", i8["int_dot_all_rows_s"],
         f"{i8['int_dot_gmacs']:.0f} G MAC/s"),
        ("absmax8: float32 BLAS on dequantized, all rows", i8["blas_all_rows_s"],
         f"{i8['speedup_all_rows']:.2f}x slower than int_dot"),
        (f"absmax8: int_dot, block of {i8['block']} rows", i8["int_dot_block_s"], ""),
        (f"absmax8: float32 BLAS, block of {i8['block']} rows", i8["blas_block_s"],
         f"{i8['speedup_block']:.2f}x slower than int_dot"),
        ("sign_subtask_means, MMLU 285/57, per 100k rows", sm["sign1_s_per_100k_rows"], ""),
        ("sign_subtask_weighted, MMLU 285/57, per 100k rows",
         sm["sign1_weighted_s_per_100k_rows"],
         (f"{sm['sign1_weighted_s_per_100k_rows'] / sm['sign1_s_per_100k_rows']:.2f}x "
          "sign_subtask_means")),
        ("int_subtask_means absmax8, MMLU, per 100k rows", sm["absmax8_s_per_100k_rows"], ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'benchmark':<{width}}  {'seconds':>9}  notes")
    for name, sec, note in rows:
        print(f"{name:<{width}}  {sec:9.4f}  {note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

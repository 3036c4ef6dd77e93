"""The paper's memory table: bytes on disk per encoding at LESS's full shape.

    python benchmarks/bench_memory.py --quick     # 20,000 rows (a couple of minutes)
    python benchmarks/bench_memory.py             # 270,679 rows x 8192 dims x 4 checkpoints

One store per encoding (f16, absmax8, absmax4, absmax2, sign1) holding the train set with the
row metadata the real ingest writes (id, source, category, tokens, source_file, offset, line).
Synthetic vectors are streamed in batches of 4096 rows per write transaction, generated once
per batch for all the quantized stores; f16 (17.7 GB at full shape) is built last, on its own.
For each store: du and apparent size of data.mdb, the raw packed bits
(rows x dims x ckpts x bits / 8), the ratio, the pages per named database (branch, leaf,
overflow) and the free pages; then the same after `gradstore.compact` (what ingest, merge and
requantize leave), then the store is deleted. The issue-14 check:

    python benchmarks/bench_memory.py --rows 100000 --batch 10000 --encodings sign1 QLESS's reported sizes sit beside
them. Writes benchmarks/results/memory.json (memory_quick.json with --quick).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lmdb

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    STORES_DIR,
    Shape,
    build_stores,
    disk_usage,
    machine,
    print_machine,
    print_table,
    remove_store,
    write_json,
)

import gradstore

ENCODINGS = ("absmax8", "absmax4", "absmax2", "sign1", "f16")
BITS = {"f16": 16, "absmax8": 8, "absmax4": 4, "absmax2": 2, "sign1": 1}
# QLESS (Ananta et al. 2025), the datastore for LESS's 270,679 x 8192 x 4 pool. Quoted: the
# 16-bit LESS store and the 1-bit store. Their "GB" match GiB of the raw packed bits.
PAPER_GB = {"f16": 16.54, "sign1": 1.03}


def page_stats(path) -> dict:
    """Pages per named database and the free pages (last page + 1 minus pages in use)."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=32, subdir=True)
    try:
        info, main = env.info(), env.stat()
        psize = main["psize"]
        out = {"psize": psize, "last_pgno": info["last_pgno"], "dbs": {}}
        used = 2 + main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]  # 2 meta pages
        with env.begin() as txn:
            names = [bytes(k).decode() for k, _ in txn.cursor()]  # named dbs: keys of the main db
        with env.begin() as txn:
            for name in names:
                st = txn.stat(env.open_db(name.encode(), txn=txn, create=False))
                pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
                used += pages
                out["dbs"][name] = {k: st[k] for k in ("entries", "depth", "branch_pages",
                                                        "leaf_pages", "overflow_pages")}
                out["dbs"][name]["bytes"] = pages * psize
        out["main_db_pages"] = main["branch_pages"] + main["leaf_pages"] + main["overflow_pages"]
        out["free_pages"] = info["last_pgno"] + 1 - used
        out["free_bytes"] = out["free_pages"] * psize
        return out
    finally:
        env.close()


def measure(path, enc: str, shape: Shape, n: int, build_s: float) -> dict:
    du = disk_usage(path)
    raw = n * shape.dim * len(shape.lrs) * BITS[enc] // 8
    pages = page_stats(path)
    blocks = pages["dbs"]["blocks"]["bytes"]
    # row metadata: the rows db (and the ids db of stores that have one)
    meta = sum(pages["dbs"][d]["bytes"] for d in ("rows", "ids") if d in pages["dbs"])
    return {"encoding": enc, "bits": BITS[enc], "rows": n, **du, "raw_bytes": raw,
            "ratio_du": du["du_bytes"] / raw, "ratio_apparent": du["apparent_bytes"] / raw,
            "blocks_bytes": blocks, "ratio_blocks": blocks / raw,
            "row_metadata_bytes": meta, "side_values_bytes": n * len(shape.lrs) * 8,
            "build_seconds": build_s, "pages": pages}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20,000 rows")
    ap.add_argument("--rows", type=int, default=None, help="train rows (default 270,679)")
    ap.add_argument("--encodings", default=",".join(ENCODINGS))
    ap.add_argument("--keep", action="store_true", help="do not delete the stores")
    ap.add_argument("--batch", type=int, default=4096,
                    help="rows per write transaction (not a multiple of the block rows: "
                         "every write rewrites the last partial block)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--store-dir", type=Path, default=STORES_DIR)
    args = ap.parse_args(argv)
    n = args.rows or (20_000 if args.quick else 270_679)
    shape = Shape(n_train=n, seed=args.seed, batch=args.batch)
    encs = [e for e in args.encodings.split(",") if e]
    info = machine()
    print_machine(info)
    print(f"shape: {n:,} rows x {shape.dim} dims x {len(shape.lrs)} ckpts, batches of "
          f"{shape.batch}; row metadata as the real ingest writes it", flush=True)
    groups = [[e for e in encs if e != "f16"], [e for e in encs if e == "f16"]]
    results = {"machine": info, "quick": args.quick, "rows": n, "dim": shape.dim, "batch": shape.batch,
               "ckpts": len(shape.lrs), "stores": {}}
    for group in groups:
        if not group:
            continue
        paths = {e: args.store_dir / f"memory-{n}-{shape.batch}-{e}" for e in group}
        print(f"building {', '.join(group)} in one pass ...", flush=True)
        t0 = time.perf_counter()
        rep = build_stores([(str(paths[e]), (e,)) for e in group], shape, with_task=False)
        wall = time.perf_counter() - t0
        print(f"built in {wall:.0f} s (generation {rep.seconds_generate:.0f} s)", flush=True)
        for e in group:
            m = measure(paths[e], e, shape, n, rep.seconds_write[str(paths[e])])
            m["pass_wall_seconds"] = wall
            t0 = time.perf_counter()
            gradstore.compact(paths[e], min_free=0)
            c = measure(paths[e], e, shape, n, m["build_seconds"])
            m["compacted"] = {"seconds": time.perf_counter() - t0, "du_bytes": c["du_bytes"],
                              "apparent_bytes": c["apparent_bytes"], "ratio_du": c["ratio_du"],
                              "free_pages": c["pages"]["free_pages"]}
            results["stores"][e] = m
            print(f"  {e}: du {m['du_bytes']:,} B, raw {m['raw_bytes']:,} B, ratio {m['ratio_du']:.4f}"
                  f" (blocks alone {m['ratio_blocks']:.4f}; row metadata {m['row_metadata_bytes']:,} B;"
                  f" free pages {m['pages']['free_pages']:,}); compacted in {m['compacted']['seconds']:.1f} s:"
                  f" du {c['du_bytes']:,} B, ratio {c['ratio_du']:.4f}", flush=True)
            if not args.keep:
                remove_store(paths[e])

    rows = []
    full = n == 270_679
    for e in sorted(results["stores"], key=lambda e: -BITS[e]):
        m = results["stores"][e]
        paper = PAPER_GB.get(e)
        rows.append([e, m["bits"], m["du_bytes"] / 1e9, m["du_bytes"] / 2**30,
                     m["apparent_bytes"] / 2**30, m["raw_bytes"] / 2**30, m["ratio_du"],
                     m["ratio_blocks"], m["row_metadata_bytes"] / 2**20,
                     m["pages"]["free_bytes"] / 2**20, m["compacted"]["ratio_du"],
                     (f"{paper:.2f}" if paper else "-") if full else "(n/a: not full shape)",
                     m["build_seconds"]])
    results["table"] = print_table(
        ["encoding", "bits", "du GB", "du GiB", "apparent GiB", "raw GiB", "du/raw",
         "blocks/raw", "row meta MiB", "free MiB", "compacted du/raw", "QLESS GB", "write s"], rows,
        title=f"\nStore size: {n:,} rows x {shape.dim} x {len(shape.lrs)} ckpts "
              "(raw = rows x dims x ckpts x bits / 8; target du/raw <= 1.03)")
    name = "memory_quick" if args.quick else "memory" if n == 270_679 else f"memory_{n}"
    write_json(name if args.batch == 4096 else f"{name}_batch{args.batch}", results)
    return results


if __name__ == "__main__":
    main()

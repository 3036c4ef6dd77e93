"""Where ingest's packing gains, by row length: the batch-1 loop and the packed path on the long
rows alone and on the rest alone, side by side in one run.

The rows, model, adapter, Adam state and projection are `bench_ingest`'s (SmolLM2-135M bf16, 96
real Dolly / Flan v2 CoT rows truncated to `--max-length`, LoRA r on q,k,v,o); the rows are split
at `--long` tokens and each part runs alone: packed into its own batches of at most
`--token-budget` tokens, the two paths interleaved batch by batch, each path's best of
`--repeat` rounds. Each part's ratio, and its share of the batch-1 loop's time, say how far
packing can take the whole: a row of ~1,000 tokens is already a large matrix product for the
batch-1 loop, so what the long rows gain bounds the pool's ratio from above.

    .venv/bin/python benchmarks/bench_ingest_lengths.py                      # 1,024 tokens, r=8
    .venv/bin/python benchmarks/bench_ingest_lengths.py --r 128 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from bench_ingest import (DIM, adapter, batch1_vectors, fake_adam_state, interleaved, pool_rows,
                          projected_batches)
from common import machine, print_machine, print_table, write_json

from qless.config import IngestConfig
from qless.gradients import GradientComputer
from qless.model import load_model, load_tokenizer
from qless.projection import SparseRademacher


def timed_part(computer, sparse, part: list, repeat: int) -> dict:
    """Best seconds of each path over `part`, interleaved per packed batch."""
    paths = {"batch1": lambda rows: batch1_vectors(computer, sparse, rows),
             "packed": lambda rows: projected_batches(computer, sparse, rows)}
    return interleaved(part, computer.batches(part, capped=False), paths, repeat)[0]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=96, help="rows (half Dolly, half Flan)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--long", type=int, default=512, help="rows over this many tokens are 'long'")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--token-budget", type=int, default=IngestConfig.token_budget)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    info = machine()
    info["torch_threads"] = torch.get_num_threads()
    print_machine(info)
    tokenizer = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m", dtype="bf16")
    rows = pool_rows(tokenizer, args.rows, args.max_length)
    model = adapter(base, args.r)
    dim = GradientComputer(model, mode="sgd").dim
    computer = GradientComputer(model, fake_adam_state(dim, args.r), mode="adam",
                                token_budget=args.token_budget)
    sparse = SparseRademacher(dim, DIM, seed=0)
    timed_part(computer, sparse, rows[:2], 1)  # warm up both paths
    parts = {"long": [ex for ex in rows if len(ex.input_ids) > args.long],
             "rest": [ex for ex in rows if len(ex.input_ids) <= args.long]}
    results = {}
    for name, part in parts.items():
        best = timed_part(computer, sparse, part, args.repeat)
        results[name] = {"rows": len(part), "tokens": sum(len(ex.input_ids) for ex in part),
                         "lengths": sorted(len(ex.input_ids) for ex in part) if name == "long" else None,
                         "batch1_s": best["batch1"], "packed_s": best["packed"],
                         "speedup": best["batch1"] / best["packed"]}
    batch1 = sum(res["batch1_s"] for res in results.values())
    packed = sum(res["packed_s"] for res in results.values())
    for res in results.values():
        res["share_of_batch1_time"] = res["batch1_s"] / batch1
    long = results["long"]
    # What the rest would have to gain for 2x overall, the long rows staying as they are.
    rest_needed = (results["rest"]["batch1_s"] / (batch1 / 2 - long["packed_s"])
                   if batch1 / 2 > long["packed_s"] else None)
    out = {"command": "benchmarks/bench_ingest_lengths.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": info, "max_length": args.max_length, "long_over": args.long, "r": args.r,
           "token_budget": args.token_budget, "repeat": args.repeat, "parts": results,
           "overall_speedup": batch1 / packed, "rest_speedup_needed_for_2x": rest_needed,
           "loadavg_at_end": os.getloadavg()}
    write_json(f"ingest_lengths_{args.max_length}_r{args.r}", out)
    print_table(["rows", "count", "tokens", "batch-1 s", "packed s", "packed vs batch-1", "share of batch-1 time"],
                [[f"> {args.long} tokens" if name == "long" else f"<= {args.long} tokens", res["rows"], res["tokens"],
                  res["batch1_s"], res["packed_s"], f"{res['speedup']:.2f}x", f"{res['share_of_batch1_time']:.0%}"]
                 for name, res in results.items()],
                title=f"ingest by row length (SmolLM2-135M bf16, r={args.r}, {args.max_length} tokens, "
                      f"each part batched alone; long rows {long['lengths']})")
    print(f"both parts: {batch1 / packed:.2f}x; for 2x the rest would need "
          + (f"{rest_needed:.2f}x" if rest_needed else "more than any speed-up"))
    return out


if __name__ == "__main__":
    main()

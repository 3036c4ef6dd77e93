"""Ingest throughput on SmolLM2-135M: seconds per example per stage, and a LESS-style reference.

Stages of one training example, as `qless.ingest` runs them: tokenize, gradient (LESS's Adam
direction at batch 1, logits only where labels are), projection (sparse Rademacher to 8192),
quantize (f16, absmax8, sign1) and write (one LMDB transaction per batch). At 64 / 128 / 512
tokens and LoRA r = 8 and r = 128. Beside it, in the same run, the LESS/TRAK-style reference:
the same gradients projected by a dense Rademacher matrix (TRAK's CPU projector generates the
matrix chunk by chunk), reported as examples/s and the ratio.

    .venv/bin/python benchmarks/bench_ingest.py            # full: 64/128/512 tokens, r=8 and r=128
    .venv/bin/python benchmarks/bench_ingest.py --quick    # 64/128 tokens, r=8, a few examples
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from common import machine, print_machine, print_table, write_json

import gradstore
from gradstore import quant
from qless.data import Example
from qless.gradients import GradientComputer
from qless.model import attach_lora, load_model, load_tokenizer
from qless.projection import DenseRademacher, SparseRademacher

DIM = 8192
ENCODINGS = ("f16", "absmax8", "sign1")


def examples(tokenizer, n: int, length: int, seed: int) -> tuple[list[Example], float]:
    """n examples of exactly `length` tokens, the second half the response; and s/example to tokenize."""
    rng = np.random.default_rng(seed)
    words = ["gradient", "store", "select", "data", "task", "model", "answer", "question", "reason", "step"]
    out, seconds = [], 0.0
    for i in range(n):
        text = " ".join(rng.choice(words, size=length * 2))
        t0 = time.perf_counter()
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        seconds += time.perf_counter() - t0
        labels = [-100] * (length // 2) + ids[length // 2:]
        out.append(Example(f"x{length}-{i}", ids, labels, "/bench", 0, i + 1, None, {}))
    return out, seconds / n


def fake_adam_state(computer: GradientComputer, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(computer.dim, generator=g) * 1e-4
    v = torch.rand(computer.dim, generator=g) * 1e-8
    return m, v


def run_config(model_base, tokenizer, r: int, length: int, n: int, dense_n: int) -> dict:
    model = attach_lora(model_base, r=r, alpha=4 * r, dropout=0.1)
    probe = GradientComputer(model, (torch.zeros(1), torch.zeros(1)), mode="sgd")
    computer = GradientComputer(model, fake_adam_state(probe, r), mode="adam")
    exs, tokenize_s = examples(tokenizer, n, length, seed=length)
    sparse = SparseRademacher(computer.dim, DIM, seed=0)
    computer.gradient_tensor(exs[0])  # warm up autograd and the kernels
    sparse.project(computer.gradient_tensor(exs[0])[None])
    grads, vectors = [], []
    t_grad = t_proj = 0.0
    for ex in exs:
        t0 = time.perf_counter()
        g = computer.gradient_tensor(ex)
        t1 = time.perf_counter()
        vectors.append(sparse.project(g[None]).numpy()[0])
        t2 = time.perf_counter()
        t_grad += t1 - t0
        t_proj += t2 - t1
        if len(grads) < dense_n:
            grads.append(g)
    x = np.stack(vectors)
    for enc in ENCODINGS:  # load the compiled quantizers before timing them
        quant.quantize(x[:1], enc)
    t0 = time.perf_counter()
    for enc in ENCODINGS:
        quant.quantize(x, enc)
    t_quant = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        store = gradstore.create(f"{tmp}/s", dim=DIM)
        store.add_checkpoint("e1", lr=1e-5)
        t0 = time.perf_counter()
        store.write("train", "e1", x, [e.id for e in exs], encodings=ENCODINGS)
        t_write_all = time.perf_counter() - t0  # quantize + write, as ingest does it
        store.close()
    t_write = max(t_write_all - t_quant, 0.0)
    dense = DenseRademacher(computer.dim, DIM, seed=0)
    t0 = time.perf_counter()
    for g in grads:
        dense.project(g[None])
    t_dense = (time.perf_counter() - t0) / max(len(grads), 1)
    model.unload()  # give the base model back without LoRA for the next config
    per = {"tokenize": tokenize_s, "gradient": t_grad / n, "projection": t_proj / n,
           "quantize": t_quant / n, "write": t_write / n}
    ours = sum(per.values())
    less = per["tokenize"] + per["gradient"] + t_dense
    return {"r": r, "tokens": length, "examples": n, "lora_params": computer.dim, "per_example_s": per,
            "overhead_vs_gradient": (per["projection"] + per["quantize"] + per["write"]) / per["gradient"],
            "dense_projection_s": t_dense, "dense_examples": len(grads),
            "examples_per_s": 1 / ours, "less_style_examples_per_s": 1 / less, "speedup_vs_less_style": less / ours}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    info = machine()
    info["torch_threads"] = torch.get_num_threads()
    print_machine(info)
    tokenizer = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m", dtype="bf16")
    configs = [(8, 64, 4, 1), (8, 128, 4, 1)] if args.quick else \
        [(8, 64, 16, 2), (8, 128, 16, 2), (8, 512, 8, 1), (128, 64, 8, 1), (128, 128, 8, 1), (128, 512, 4, 1)]
    results = []
    for r, length, n, dense_n in configs:
        res = run_config(base, tokenizer, r, length, n, dense_n)
        results.append(res)
        p = res["per_example_s"]
        print(f"r={r} tokens={length}: gradient {p['gradient']:.3f} s, projection {p['projection']:.4f} s,"
              f" quantize {p['quantize']:.5f} s, write {p['write']:.5f} s, dense {res['dense_projection_s']:.2f} s",
              flush=True)
    rows = [[res["r"], res["tokens"], f"{res['per_example_s']['tokenize']:.4f}",
             f"{res['per_example_s']['gradient']:.3f}", f"{res['per_example_s']['projection']:.4f}",
             f"{res['per_example_s']['quantize']:.5f}", f"{res['per_example_s']['write']:.5f}",
             f"{res['overhead_vs_gradient']:.1%}", f"{res['examples_per_s']:.2f}",
             f"{res['dense_projection_s']:.2f}", f"{res['less_style_examples_per_s']:.3f}",
             f"{res['speedup_vs_less_style']:.1f}x"] for res in results]
    print_table(["r", "tokens", "tokenize s", "gradient s", "projection s", "quantize s", "write s",
                 "proj+quant+write / grad", "ex/s", "dense proj s", "LESS-style ex/s", "ratio"], rows,
                title="ingest, seconds per example (SmolLM2-135M, bf16, batch 1)")
    out = {"machine": info, "quick": args.quick, "dim": DIM, "encodings": ENCODINGS, "results": results}
    write_json("ingest_quick" if args.quick else "ingest", out)
    return out


if __name__ == "__main__":
    main()

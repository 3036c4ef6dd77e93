"""Ingest throughput, side by side in one run: LESS's batch-1 loop, qless's batched path, bergson.

The same real pool rows (Dolly and Flan v2 CoT from ../shared/data/train, tokenized once as
ingest does: tulu format, truncated to 512 or 1,024 tokens), the same model (SmolLM2-135M, bf16),
the same LoRA adapter (q,k,v,o; r = 8 and 128, B drawn non-zero as after a warmup) and the same
token budget; the qless paths run interleaved batch by batch (each packed batch's rows through
every one), each path's best round of `--repeat`. What each computes per example:
- batch-1 (`GradientComputer.gradient_tensor`, the reference): one forward (logits only where a
  label is predicted) and backward per example, the full LoRA gradient, LESS's Adam direction,
  the sparse projection to 8192 dims;
- filed: the batch-1 loop issue 13 measured and set its 2x target against, ingest's as of commit
  FILED_COMMIT (`git archive`, imported as the package `qless_filed`): the same forward and
  backward, then its unchunked Adam direction and projection (batch-1 above shares the chunked
  ones the batched path uses, so it is the stricter comparison); its min cosine to batch-1 too
  (`--no-filed` leaves it out, e.g. on a copy of the tree without git history);
- packed (`GradientComputer.batched(rows, projection)`, what ingest runs): the same vectors from
  length-sorted batches of at most `--token-budget` tokens, packed into one sequence each
  (attention kept inside each example), per-example gradients from each LoRA layer's recorded
  inputs and output gradients (`qless.lora_update`), the same Adam
  direction and projection, module by module (the full-length gradients never formed); its min
  cosine to batch-1's projected vectors is reported;
- padded (`GradientComputer(pack=False)`, the path for models packing cannot serve): the same,
  batches padded to their longest example;
- bergson (`benchmarks/bergson_run.py`, in `.bench-venv`, never a dependency): `bergson build`'s
  collection on the same token ids, labels and adapter: length-grouped padded batches of the same
  budget, logits at every position, per-example LoRA gradients from hooks, each module projected
  to 16 x 16 by its own two-sided random matrices (no Adam direction), written to disk.
Model loading is outside every timed part. Also reported: the share of batched time spent forming
per-example gradients from the recorded tensors (the most that projecting per layer before summing
over tokens could save), quantize + write of the vectors (what overlapping writes could hide), and
each path's peak RSS over its batches (untimed pass, heap trimmed before each batch).

    .venv/bin/python benchmarks/bench_ingest.py                # 24 rows per config, r=8/128 x 512/1024
    .venv/bin/python benchmarks/bench_ingest.py --quick        # 6 rows, r=8, 512 tokens
    .venv/bin/python benchmarks/bench_ingest.py --rows 8 --config 1024:128   # one configuration
    .venv/bin/python benchmarks/bench_ingest.py --rows 48 --config 512:8 --repeat 3 --no-bergson
    .venv/bin/python benchmarks/bench_ingest.py --device cuda --rows 256 --token-budget 16384 --no-bergson --no-filed
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import itertools
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR, machine, print_machine, print_table, write_json
from rss import PeakRSS

import gradstore
from qless.config import IngestConfig
from qless.data import iter_pool
from qless.gradients import GradientComputer
from qless.model import attach_lora, load_model, load_tokenizer
from qless.projection import SparseRademacher

HERE = Path(__file__).resolve().parent
TRAIN = (HERE.parent / ".." / "shared" / "data" / "train").resolve()
FILES = (TRAIN / "dolly" / "dolly_00.jsonl", TRAIN / "flan_v2_cot" / "flan_v2_cot_00.jsonl")
BERGSON_PYTHON = HERE.parent / ".bench-venv" / "bin" / "python"
DIM = 8192
ENCODINGS = ("f16", "absmax8", "sign1-centered")
FILED_COMMIT = "542e8a3"  # main when issue 13 was filed: its ingest ran the batch-1 loop


def filed_qless(tmp: Path):
    """(gradients, projection) modules of qless as of FILED_COMMIT, as the package `qless_filed`."""
    got = subprocess.run(["git", "-C", str(HERE.parent), "archive", FILED_COMMIT, "qless"], capture_output=True)
    if got.returncode != 0:
        raise SystemExit(f"git archive {FILED_COMMIT} qless: {got.stderr.decode().strip()} "
                         "(no git history here?); pass --no-filed")
    tar = got.stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(tmp, filter="data")
    root = tmp / "qless"
    spec = importlib.util.spec_from_file_location("qless_filed", root / "__init__.py",
                                                  submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["qless_filed"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("qless_filed.gradients"), importlib.import_module("qless_filed.projection")


def pool_rows(tokenizer, n: int, max_length: int, seed: int = 0) -> list:
    """n rows, half from each file, drawn from each file's first 400 rows with a response."""
    rng = np.random.default_rng(seed)
    out = []
    for path in FILES:
        head = list(itertools.islice(iter_pool([path], tokenizer, max_length, skip_invalid=True,
                                               chat_format="tulu"), 400))
        out += [head[i] for i in sorted(rng.choice(len(head), size=n // 2, replace=False))]
    return out


def adapter(base, r: int):
    """LoRA on q,k,v,o with B drawn as after a warmup (a fresh B = 0 gives A no gradient)."""
    model = attach_lora(base, r=r, alpha=4 * r, dropout=0.1, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return model


def fake_adam_state(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, generator=g) * 1e-4, torch.rand(dim, generator=g) * 1e-8


def run_bergson(adapter_dir: Path, rows: list, budget: int, tmp: Path) -> dict:
    data = tmp / "rows.jsonl"
    with open(data, "w") as f:
        for ex in rows:
            f.write(json.dumps({"input_ids": ex.input_ids, "labels": ex.labels}) + "\n")
    out = subprocess.run([str(BERGSON_PYTHON), str(HERE / "bergson_run.py"), str(adapter_dir), str(data),
                          str(tmp / "bergson-index"), str(budget), "16"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bergson_run.py failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def projected_batches(computer, sparse, rows: list) -> np.ndarray:
    """The batched path's projected vectors of `rows`, in row order, as ingest runs it
    (projected per module)."""
    got = np.zeros((len(rows), DIM), dtype=np.float32)
    for idx, projected in computer.batched(rows, projection=sparse):
        got[idx] = projected.cpu().numpy()
    return got


def batch1_vectors(computer, projection, rows: list) -> np.ndarray:
    """The batch-1 loop's projected vectors of `rows` (one forward and backward per example)."""
    return np.stack([projection.project(computer.gradient_tensor(ex)[None]).cpu().numpy()[0] for ex in rows])


def interleaved(rows: list, plan: list[list[int]], paths: dict, repeat: int, sync=lambda: None,
                before_round=lambda: None) -> tuple[dict, dict]:
    """Each path's best seconds over `repeat` rounds, and its last round's outputs per batch: in
    each round every batch of `plan` (indices into `rows`) runs through every path in turn, so
    the paths see the same rows within seconds of each other."""
    best = dict.fromkeys(paths, np.inf)
    outputs: dict = {}
    for _ in range(repeat):
        before_round()
        seconds = dict.fromkeys(paths, 0.0)
        outputs = {name: [] for name in paths}
        for idx in plan:
            part = [rows[i] for i in idx]
            for name, run in paths.items():
                t0 = time.perf_counter()
                outputs[name].append(run(part))
                sync()
                seconds[name] += time.perf_counter() - t0
        best = {name: min(best[name], seconds[name]) for name in best}
    return best, outputs


def run_config(base, rows: list, r: int, budget: int, bergson: bool, device: torch.device,
               repeat: int, filed) -> dict:
    model = adapter(base, r)
    dim = GradientComputer(model, mode="sgd").dim
    state = fake_adam_state(dim, r)
    packed = GradientComputer(model, state, mode="adam", token_budget=budget)
    padded = GradientComputer(model, state, mode="adam", token_budget=budget, pack=False)
    sparse = SparseRademacher(dim, DIM, seed=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    paths = {"batch1": lambda part: batch1_vectors(packed, sparse, part),
             "packed": lambda part: projected_batches(packed, sparse, part),
             "padded": lambda part: projected_batches(padded, sparse, part)}
    if filed is not None:
        filed_computer = filed[0].GradientComputer(model, state, mode="adam")
        filed_sparse = filed[1].SparseRademacher(dim, DIM, seed=0)
        paths["filed"] = lambda part: batch1_vectors(filed_computer, filed_sparse, part)
    for run in paths.values():  # warm up every path
        run(rows[:2])
    tokens = sum(len(ex.input_ids) for ex in rows)

    # Timed interleaved per packed batch, each path's best round of `repeat`: the paths run
    # on the same rows within seconds of each other. This shared host's speed drifts by up to ~30%
    # over minutes (batch-1 at r=8 ran the same rows at 1.64 and 1.15 ex/s in one run of whole-path
    # rounds), and drift within seconds moves them all together.
    plan = packed.batches(rows, capped=False)
    # Memory first, untimed: each batch's peak RSS through each path, from a trimmed heap (the
    # trim makes the next batch fault its pages in afresh, which the timed rounds do not pay).
    peaks = dict.fromkeys(paths, 0.0)
    for idx in plan:
        for name, run in paths.items():
            with PeakRSS() as peak:
                run([rows[i] for i in idx])
            peaks[name] = max(peaks[name], peak.mib)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def reset_counters():  # the batched computers' own timers and token counts: the last round's
        for computer in (packed, padded):
            computer.seconds = dict.fromkeys(computer.seconds, 0.0)
            computer.tokens = {"run": 0, "real": 0}
    best, outputs = interleaved(rows, plan, paths, repeat, sync, reset_counters)
    vectors = {name: np.zeros((len(rows), DIM), dtype=np.float32) for name in paths}
    for name, per_batch in outputs.items():
        for idx, out in zip(plan, per_batch):
            vectors[name][idx] = out
    got, ref = vectors["packed"], vectors["batch1"]
    cuda_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    def min_cosine(a, b):
        return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
    t_batched = best["packed"]

    with tempfile.TemporaryDirectory() as tmp:
        store = gradstore.create(f"{tmp}/s", dim=DIM)
        store.add_checkpoint("e1", lr=1e-5)
        t0 = time.perf_counter()
        store.write("train", "e1", got, [ex.id for ex in rows], encodings=ENCODINGS)
        t_write = time.perf_counter() - t0
        store.close()
        berg = None
        if bergson:
            model.save_pretrained(Path(tmp) / "adapter")
            berg = run_bergson(Path(tmp) / "adapter", rows, budget, Path(tmp))
    model.unload()  # give the base model back without LoRA for the next config
    n = len(rows)
    res = {"r": r, "lora_params": dim, "rows": n, "tokens": tokens, "repeat": repeat,
           "max_tokens": max(len(ex.input_ids) for ex in rows), "token_budget": budget,
           "packed": packed.packed, "padding_when_padded": 1 - padded.tokens["real"] / padded.tokens["run"],
           "batches": len(packed.batches(rows, capped=False)),
           "batch1_examples_per_s": n / best["batch1"], "batched_examples_per_s": n / t_batched,
           "padded_examples_per_s": n / best["padded"], "speedup_vs_batch1": best["batch1"] / t_batched,
           "padded_speedup_vs_batch1": best["batch1"] / best["padded"],
           "batched_model_s": packed.seconds["model"], "batched_per_example_s": packed.seconds["per_example"],
           "per_example_share": packed.seconds["per_example"] / t_batched,
           "quantize_write_share": t_write / t_batched,
           "min_cosine_batched_vs_batch1": min_cosine(got, ref),
           "peak_rss_mib": peaks, "cuda_peak_mib": cuda_peak}
    if filed is not None:
        res.update(filed_commit=FILED_COMMIT, filed_examples_per_s=n / best["filed"],
                   speedup_vs_filed=best["filed"] / t_batched,
                   min_cosine_filed_vs_batch1=min_cosine(vectors["filed"], ref))
    if berg is not None:
        res["bergson_examples_per_s"] = n / berg["seconds"]
        res["batched_vs_bergson"] = berg["seconds"] / t_batched
        res["peak_rss_mib"]["bergson"] = berg["peak_mib"]
    return res


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=24, help="rows per configuration (half Dolly, half Flan)")
    parser.add_argument("--token-budget", type=int, default=IngestConfig.token_budget)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bergson", action="store_true")
    parser.add_argument("--no-filed", action="store_true", help="leave out the loop issue 13 was filed against")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, interleaved per batch; each path's best")
    parser.add_argument("--config", action="append", type=lambda t: tuple(int(x) for x in t.split(":")),
                        help="MAX_TOKENS:R, repeatable (default: 512:8 512:128 1024:8 1024:128)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    bergson = not args.no_bergson and not args.quick
    if bergson and not BERGSON_PYTHON.exists():
        raise SystemExit(f"{BERGSON_PYTHON}: no bergson environment (see benchmarks/bergson_run.py), "
                         "or pass --no-bergson")
    info = machine()
    info["torch_threads"] = torch.get_num_threads()
    info["device"] = str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)
    print_machine(info)
    tokenizer = load_tokenizer("smollm2-135m")
    base = load_model("smollm2-135m", dtype="bf16", device=device)
    n = 6 if args.quick else args.rows
    filed_dir = None if args.no_filed else tempfile.TemporaryDirectory()  # removed at exit
    filed = None if filed_dir is None else filed_qless(Path(filed_dir.name))
    configs = [(512, 8)] if args.quick else args.config or [(512, 8), (512, 128), (1024, 8), (1024, 128)]
    name = "ingest_quick" if args.quick else f"ingest_{device.type}"
    # Each run is appended to the file's history: runs on other days and loads stay comparable.
    previous = RESULTS_DIR / f"{name}.json"
    runs = json.loads(previous.read_text()).get("runs", []) if previous.exists() else []
    out = {"command": "benchmarks/bench_ingest.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": info, "quick": args.quick, "results": [],
           "timing": "interleaved per packed batch; peak RSS per batch from a trimmed heap, untimed pass"}
    runs.append(out)
    for max_length, r in configs:
        rows = pool_rows(tokenizer, n, max_length)
        res = run_config(base, rows, r, args.token_budget, bergson, device, args.repeat, filed)
        res["max_length"] = max_length
        out["results"].append(res)
        print(json.dumps(res), flush=True)
        # After every configuration: a long run stopped early keeps its results.
        write_json(name, {"runs": runs, "dim": DIM, "encodings": ENCODINGS})
    results = out["results"]
    rows = [[res["max_length"], res["r"], res["rows"], f"{res['tokens'] / res['rows']:.0f}",
             f"{res['filed_examples_per_s']:.2f}" if "filed_examples_per_s" in res else "-",
             f"{res['batch1_examples_per_s']:.2f}", f"{res['padded_examples_per_s']:.2f}",
             f"{res['padded_speedup_vs_batch1']:.2f}x", f"{res['padding_when_padded']:.0%}",
             f"{res['batched_examples_per_s']:.2f}", f"{res['speedup_vs_filed']:.2f}x" if "speedup_vs_filed" in res else "-",
             f"{res['speedup_vs_batch1']:.2f}x",
             f"{res['bergson_examples_per_s']:.2f}" if "bergson_examples_per_s" in res else "-",
             f"{res['batched_vs_bergson']:.2f}x" if "batched_vs_bergson" in res else "-",
             f"{res['per_example_share']:.0%}", f"{res['quantize_write_share']:.1%}",
             " / ".join(f"{v:.0f}" for v in res["peak_rss_mib"].values()),
             f"{res['min_cosine_batched_vs_batch1']:.5f}"] for res in results]
    print_table(["max tokens", "r", "rows", "mean tokens", "filed ex/s", "batch-1 ex/s", "padded ex/s",
                 "vs batch-1", "padding", "packed ex/s", "vs filed", "vs batch-1", "bergson ex/s", "vs bergson", "per-example share",
                 "quant+write share", "peak MiB (" + "/".join(results[0]["peak_rss_mib"]) + ")", "min cos"], rows,
                title=f"ingest examples/s (SmolLM2-135M bf16, token budget {args.token_budget}, {info['device']})")
    return out


if __name__ == "__main__":
    main()

"""Does a selection help? The QLESS paper's main table at small scale: train on the top 5% chosen
by each method, evaluate on the target task, compare with random 5% slices.

    nice -n 10 python benchmarks/bench_selection.py          # resumes from benchmarks/stores/

Design, fixed before any arm was run (issue 12; sizes chosen to fit ~60-70 minutes on this
2-core box, which runs SmolLM2-135M at ~6 ms per token forward and ~17 ms forward+backward with
one torch thread under the usual load of 4-6):

Gradients (phases 1-3): bench_fidelity's run `fidelity-n1000-s0-e1`, reused from
benchmarks/stores/ when present (else computed by bench_fidelity's own phases, ~50 min):
- pool: 1,000 rows drawn with numpy RandomState(0) from every file of ../shared/data/train
  (dolly 297, flan_v2_cot 703; read at max_length 1024, tulu format);
- warmup: `qless.warmup` on 5% of the pool (50 rows), LoRA r=8 alpha=32 dropout 0.1 on
  q,k,v,o, lr 2e-4, grad_accum 8, 1 epoch: one checkpoint (LESS: r=128 and 4 checkpoints;
  the r and the single checkpoint are what made the ingest fit on this CPU);
- ingest: Adam directions of the pool and gradients of mmlu (dev, 285 rows) and bbh (81 rows),
  d=8192 sparse Rademacher, f32 master requantized to every encoding.
Selections (k = 5% = 50 rows of the 1,000):
- random: numpy RandomState(seed).permutation(1000)[:50], seeds 0, 1, 2 (one selection serves
  both tasks);
- f32 (LESS):      TOP 5% FROM train BY <task> ENCODING f32                  (AGG max)
- absmax8:         TOP 5% FROM train BY <task> ENCODING absmax8              (asymmetric, AGG max)
- sign1-qless:     TOP 5% FROM train BY <task> ENCODING sign1 MODE symmetric AGG mean
                   (QLESS's code: sign bits on both sides, mean over subtasks; a global scale
                   changes nothing for sign1)
- sign1-centered:  TOP 5% FROM train BY <task> ENCODING sign1-centered       (symmetric, AGG max)
- default plan:    TOP 5% FROM train BY <task> RERANK absmax8 OVERSAMPLE 6   (what a store with
                   ingest's default encodings runs: a sign1-centered shortlist of 300, absmax8)
- base: SmolLM2-135M without fine-tuning.
Training (every arm the same budget): `qless.train` (the warmup's loop), the 50 rows in pool
order, max_length 512, the warmup's LoRA (r=8, alpha=32, dropout 0.1; LESS also trains step 4
with its warmup's LoRA), lr 2e-4 linear with 3% warmup, grad_accum 8 (7 steps an epoch),
2 epochs, seed 0, bf16. Identical selections share one run (keyed by the selected ids).
Evaluation (`qless.evaluate`; each arm on the task that selected it, base and random on both):
- MMLU: the test split (never dev: it is the selection's target), 0-shot (5-shot prompts are
  5x the tokens), the first 114 questions of the round robin over the 57 subjects (2 each);
  accuracy of the answer letter and NLL of the correct letter.
- BBH: the 3 tasks with the shortest prompts (sports_understanding, boolean_expressions,
  object_counting), 12 examples each (36) with the 3-shot CoT prompt; NLL of the target answer
  only: chain-of-thought generation costs ~20 s an example here, so no exact match.
- TyDiQA: not evaluated: LESS's data has no held-out split for it here (only the 9 one-shot
  examples that are the selection's target).
Statistics: per arm the mean over evaluation examples; random: mean and sd over the 3 seeds;
difference to random: per example, arm minus the mean of the 3 random runs, mean over examples
with a 95% paired bootstrap interval (10,000 resamples of the evaluation examples, seed 0).
An interval that holds 0 is reported as no significant difference. Added after the random arms
had run (before any method's): that interval ignores which rows a draw picks, and single random
seeds already fall outside it, so each row also says whether its difference lies beyond the
range of the 3 random seeds' own differences to their mean (`beyond_random_seeds`).

Writes benchmarks/results/selection.json after every arm and selection.png at the end; every
phase's outputs (selections, runs, per-example evaluations) stay under
benchmarks/stores/selection-n1000-s0-e1/, so a re-run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_fidelity import (
    Config,
    RunDir,
    build_variants,
    export_master,
    master_complete,
    read_data,
    run_ingest,
    run_warmup,
)
from common import RESULTS_DIR, STORES_DIR, Timer, machine, print_machine, print_table, write_json

import gradstore
from qless.config import EvalConfig, LoraConfig, ReadConfig, WarmupConfig

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = (ROOT / ".." / "shared" / "data").resolve()
MODEL = "smollm2-135m"
GRADIENTS = Config(n=1000, seed=0, epochs=1)
K = "5%"
RANDOM_SEEDS = (0, 1, 2)
METHODS = {  # arm -> query suffix after "TOP 5% FROM train BY <task>"
    "f32 (LESS)": "ENCODING f32",
    "absmax8": "ENCODING absmax8",
    "sign1-qless": "ENCODING sign1 MODE symmetric AGG mean",
    "sign1-centered": "ENCODING sign1-centered",
    "default plan": "RERANK absmax8 OVERSAMPLE 6",
}
DTYPE = "bf16"
TRAIN = WarmupConfig(epochs=2, lr=2e-4, grad_accum=8)
LORA = LoraConfig(r=8, alpha=32.0)
READ = ReadConfig(max_length=512)  # training; evaluation keeps the default max_length (bbh's 3-shot
EVAL_READ = ReadConfig(chat_format=READ.chat_format)  # prompts pass 512), with the same chat format
EVAL = {
    "mmlu": EvalConfig(k_shot=0, limit=114),
    "bbh": EvalConfig(subtasks=("sports_understanding", "boolean_expressions", "object_counting"), limit=36,
                      max_new_tokens=0),
}
TASKS = tuple(EVAL)
BOOTSTRAP = 10_000


# ---- phases ------------------------------------------------------------------------------------


def gradients(state: dict) -> Path:
    """bench_fidelity's phases 1-4 (pool, warmup, ingest, requantized variants), resumable."""
    run = RunDir(STORES_DIR, GRADIENTS, fresh=False)
    if not master_complete(run, GRADIENTS.epochs):
        with Timer() as t:
            pool, tasks = read_data(GRADIENTS, run.state)
            infos = run_warmup(GRADIENTS, run, pool)
            run_ingest(GRADIENTS, run, pool, tasks, infos)
            export_master(run.master, run.export)
            run.state["ingest_complete"] = True
            run.save()
        state["phases"]["gradients"] = {"seconds": round(t.s, 1), "cpu_seconds": round(t.cpu, 1)}
    build_variants(run.master, run.variants, run)
    fid = run.state
    state["gradients"] = {"run": str(run.path), "pool_sources": fid["data"]["pool_sources"],
                          "warmup": fid["warmup"], "ingest_seconds": {k: round(v["seconds"], 1)
                                                                      for k, v in fid["ingest"].items()}}
    return run.variants


def selections(store_path: Path, folder: Path, state: dict) -> dict:
    """arm -> (task or None) -> selected row indices in pool order; the selected lines as JSONL."""
    from qless.selection import write_selected

    folder.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    with Timer() as t, gradstore.open(store_path) as store:
        rows = store.rows("train")
        index = {r["id"]: i for i, r in enumerate(rows)}
        k = len(store.query(f"TOP {K} FROM train BY mmlu ENCODING f32").ids)
        for seed in RANDOM_SEEDS:
            picked = np.sort(np.random.RandomState(seed).permutation(len(rows))[:k])
            out[f"random-{seed}"] = {None: picked.tolist()}
        plans = {}
        for arm, suffix in METHODS.items():
            out[arm] = {}
            for task in TASKS:
                text = f"TOP {K} FROM train BY {task} {suffix}"
                plans[f"{arm}/{task}"] = str(store.query("EXPLAIN " + text))
                out[arm][task] = sorted(index[i] for i in store.query(text).ids)
        for arm, by_task in out.items():
            for task, picked in by_task.items():
                file = folder / f"{_key(rows, picked)}.jsonl"
                if not file.exists():
                    write_selected([rows[i] for i in picked], file)
        state["selections"] = {arm: {str(task): {"key": _key(rows, p), "n": len(p),
                                                 "sources": _counts(rows[i].get("source") for i in p),
                                                 "categories": _counts(rows[i].get("category") for i in p)}
                                     for task, p in by_task.items()} for arm, by_task in out.items()}
        state["plans"] = plans
        state["overlap_with_f32"] = {
            arm: {task: len(set(out[arm][task]) & set(out["f32 (LESS)"][task])) / k for task in TASKS}
            for arm in METHODS}
    state["phases"]["selection"] = {"seconds": round(t.s, 1)}
    return {arm: {task: _key(rows, p) for task, p in by_task.items()} for arm, by_task in out.items()}


def _key(rows: list[dict], picked) -> str:
    return hashlib.sha1("\n".join(rows[i]["id"] for i in picked).encode()).hexdigest()[:12]


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def train(key: str, folder: Path, state: dict) -> Path:
    """Fine-tune on one selection (resumes; returns at once when done)."""
    from qless.model import ModelSource
    from qless.train import final_adapter, train_files
    from qless.warmup import completed_checkpoints

    run_dir = folder / "runs" / key
    times = state["phases"].setdefault("train", {})
    if len(completed_checkpoints(run_dir)) < TRAIN.epochs:
        with Timer() as t:
            _, infos = train_files([str(folder / "selections" / f"{key}.jsonl")], run_dir, ModelSource(MODEL, DTYPE),
                                   TRAIN, lora=LORA, read=READ, progress=False)
        times[key] = {"seconds": round(t.s, 1), "cpu_seconds": round(t.cpu, 1),
                      "train_loss": [i["train_loss"] for i in infos], "steps": infos[-1]["step"]}
        print(f"  trained {key}: {t.s:.0f} s, loss by epoch "
              + ", ".join(f"{i['train_loss']:.3f}" for i in infos), flush=True)
    return final_adapter(run_dir)


def evaluate(key: str, adapter: Path | None, task: str, folder: Path, state: dict) -> list[dict]:
    """Per-example records of one model on one task, cached as JSONL."""
    from qless.evaluate import evaluate_files
    from qless.model import ModelSource

    file = folder / "evals" / f"{key}-{task}.jsonl"
    if file.exists():
        return [json.loads(line) for line in file.read_text().splitlines()]
    with Timer() as t:
        records, skipped = evaluate_files(task, ModelSource(MODEL, DTYPE), adapter, EVAL[task], EVAL_READ,
                                          data_dir=DATA_DIR, progress=False)
    if skipped:
        raise SystemExit(f"{task}: {len(skipped)} examples did not fit: {skipped[0]}")
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, file)
    state["phases"].setdefault("eval", {})[f"{key}-{task}"] = {"seconds": round(t.s, 1), "n": len(records)}
    print(f"  evaluated {key} on {task}: {len(records)} examples, {t.s:.0f} s", flush=True)
    return records


# ---- statistics --------------------------------------------------------------------------------


def metrics(task: str) -> list[str]:
    return ["nll", "accuracy"] if task == "mmlu" else ["nll"]


def values(records: list[dict], metric: str) -> np.ndarray:
    key = "correct" if metric == "accuracy" else metric
    return np.array([float(r[key]) for r in records])


def paired_bootstrap(diff: np.ndarray, n: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of per-example differences, examples resampled."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def table_for(task: str, evals: dict) -> list[dict]:
    """One row per arm: mean metrics, difference to random with its interval."""
    randoms = [evals[f"random-{s}"] for s in RANDOM_SEEDS if f"random-{s}" in evals]
    ids = [r["id"] for r in evals["base"]]
    for name, recs in evals.items():
        if [r["id"] for r in recs] != ids:
            raise SystemExit(f"{task}: {name} was evaluated on other examples than the base model")
    rows = []
    for name, recs in evals.items():
        row: dict = {"arm": name, "n": len(recs)}
        for m in metrics(task):
            v = values(recs, m)
            row[m] = float(v.mean())
            if len(randoms) == len(RANDOM_SEEDS):
                ref = np.mean([values(r, m) for r in randoms], axis=0)
                lo, hi = paired_bootstrap(v - ref)
                row[f"{m}_vs_random"] = float((v - ref).mean())
                row[f"{m}_vs_random_ci95"] = [lo, hi]
                row[f"{m}_significant"] = not lo <= 0 <= hi
        rows.append(row)
    if len(randoms) == len(RANDOM_SEEDS):
        summary = {"arm": "random (mean of 3)", "n": len(ids)}
        for m in metrics(task):
            per_seed = np.array([float(values(r, m).mean()) for r in randoms])
            summary[m] = float(per_seed.mean())
            summary[f"{m}_sd_over_seeds"] = float(np.std(per_seed, ddof=1))
            # The interval above is over evaluation examples only; which 50 rows a random draw
            # picks moves a run too. An arm counts as apart from random only when it also lies
            # outside the range of the random seeds' own differences to their mean.
            spread = [float(per_seed.min() - per_seed.mean()), float(per_seed.max() - per_seed.mean())]
            summary[f"{m}_seed_range_vs_random"] = spread
            for row in rows:
                d = row[f"{m}_vs_random"]  # a tie (accuracy moves in steps of 1/n) is not beyond
                row[f"{m}_beyond_random_seeds"] = not spread[0] - 1e-9 <= d <= spread[1] + 1e-9
        rows.append(summary)
    return rows


def plot(tables: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(task, m) for task in TASKS for m in metrics(task)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    for ax, (task, m) in zip(np.atleast_1d(axes), panels):
        rows = [r for r in tables.get(task, []) if f"{m}_vs_random" in r and not r["arm"].startswith("random-")]
        names = [r["arm"] for r in rows]
        mean = np.array([r[f"{m}_vs_random"] for r in rows])
        lo = mean - np.array([r[f"{m}_vs_random_ci95"][0] for r in rows])
        hi = np.array([r[f"{m}_vs_random_ci95"][1] for r in rows]) - mean
        ax.barh(names, mean, xerr=[lo, hi], color=["#999" if n == "base" else "#4878a8" for n in names],
                capsize=3, zorder=2)
        ax.axvline(0, color="k", lw=0.8)
        seeds = next((r[f"{m}_seed_range_vs_random"] for r in tables.get(task, [])
                      if f"{m}_seed_range_vs_random" in r), None)
        if seeds is not None:
            ax.axvspan(*seeds, color="#e8a33d", alpha=0.3, zorder=0, label="range of the 3 random seeds")
            ax.legend(fontsize=8, loc="lower right")
        ax.invert_yaxis()
        better = "lower is better" if m == "nll" else "higher is better"
        ax.set_title(f"{task}: {m} minus random ({better})", fontsize=10)
        ax.set_xlabel("difference, 95% paired bootstrap interval")
    fig.suptitle("SmolLM2-135M fine-tuned on the top 5% of a 1,000-row pool, by selection method", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on this busy box)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    info = machine()
    info["torch_threads"] = torch.get_num_threads()
    print_machine(info)
    folder = STORES_DIR / f"selection-n{GRADIENTS.n}-s{GRADIENTS.seed}-e{GRADIENTS.epochs}"
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    state.setdefault("phases", {})
    results = {"machine": info, "design": {"gradients": GRADIENTS.name, "k": K, "random_seeds": RANDOM_SEEDS,
                                           "methods": METHODS, "bootstrap": BOOTSTRAP,
                                           "train": {"dtype": DTYPE, **asdict(TRAIN), **asdict(LORA), **asdict(READ)},
                                           "eval": {task: asdict(c) for task, c in EVAL.items()}},
               "state": state}

    def save():
        state_file.write_text(json.dumps(state, indent=1) + "\n")
        results["loadavg_now"] = os.getloadavg()
        write_json("selection", results)

    t0 = time.perf_counter()
    store = gradients(state)
    keys = selections(store, folder / "selections", state)
    save()
    # Runs in an order that makes every partial result usable: base, random, then each method.
    order = ["base"] + [f"random-{s}" for s in RANDOM_SEEDS] + list(METHODS)
    evals: dict = {task: {} for task in TASKS}
    for arm in order:
        print(f"{arm}:", flush=True)
        for task in TASKS:
            key = "base" if arm == "base" else keys[arm].get(task, keys[arm].get(None))
            adapter = None if arm == "base" else train(key, folder, state)
            evals[task][arm] = evaluate(key, adapter, task, folder, state)
            results["tables"] = {t: table_for(t, e) for t, e in evals.items() if "base" in e}
            save()
    results["wall_seconds_this_run"] = round(time.perf_counter() - t0, 1)
    for task, rows in results["tables"].items():
        ms = metrics(task)
        print_table(["arm", "n"] + ms + [f"{m} - random [95% CI]" for m in ms],
                    [[r["arm"], r["n"]] + [f"{r[m]:.4f}" + (f" (sd {r[m + '_sd_over_seeds']:.4f})"
                                                          if m + "_sd_over_seeds" in r else "") for m in ms]
                     + [f"{r[m + '_vs_random']:+.4f} [{r[m + '_vs_random_ci95'][0]:+.4f}, "
                        f"{r[m + '_vs_random_ci95'][1]:+.4f}]" if m + "_vs_random" in r else "" for m in ms]
                     for r in rows], title=task)
    plot(results["tables"], RESULTS_DIR / "selection.png")
    save()
    return results


if __name__ == "__main__":
    main()

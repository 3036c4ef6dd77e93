"""Fidelity on real gradients: does quantization keep LESS's selection?

    python benchmarks/bench_fidelity.py --quick   # N=200, tydiqa + 20 mmlu rows, 1 epoch (minutes)
    python benchmarks/bench_fidelity.py           # N=2,000, mmlu + bbh + tydiqa, 2 epochs (30-60 min)
    python benchmarks/bench_fidelity.py --analyze-only   # re-score the stored gradients only

Pipeline (every stage resumes from what benchmarks/stores/fidelity-*/ already holds):
1. Pool: every JSONL file of ../shared/data/train (dolly and flan_v2_cot) read with
   `qless.data.read_pool` (chat_format "tulu" as LESS, max_length 1024: the pool is truncated at
   1024 tokens to bound CPU time, and lines left without a response token are skipped and
   counted), then N examples drawn with `numpy.random.RandomState(seed).permutation` (kept in
   file order).
2. Warmup: SmolLM2-135M (built-in, bf16) with LoRA r=8, alpha=32, dropout 0.1 on q,k,v,o (LESS
   uses r=128, alpha=512; r=8 keeps a CPU run to minutes), `qless.warmup.warmup` on 5% of the
   pool for 2 epochs, lr 2e-4 (10x LESS's: a handful of steps must move the adapters), batch 1 x
   grad_accum 8, linear decay, 3% warmup steps. One checkpoint per epoch, with its mean lr.
3. Ingest (`qless.ingest.ingest`): the pool as Adam directions, the tasks mmlu, bbh, tydiqa
   (`qless.tasks.load_task` from ../shared/data, tulu, max_length 2048 as LESS) as plain
   gradients, at every checkpoint, projected to d=8192 (sparse Rademacher, seed 0), stored ONLY
   as f32: the master store. Its vectors are also saved as .npy (master-f32/), from which the
   master is rebuilt if a later engine no longer opens it (a store format change).
4. Variants (no model): per checkpoint, `store.vectors(set, ckpt, "f32")` of the master is written
   to a second store with the same checkpoints, ids and metadata in f32, f16, absmax8/4/2,
   absmean8/4/2, sign1 and the -centered form of each quantized one (train set only: the centroid
   is the whole pool's mean, written in one batch), then `gradstore.ops.requantize` adds the
   -global absmax/absmean encodings of every set. Task sets hold f32 and the plain quantized
   encodings (symmetric scoring reads the task side in the train side's encoding; centered
   scoring reads the task's f32 and, when symmetric, quantizes it itself).
5. Scoring: `SCORE FROM train BY <task> AGG max ENCODING <e> MODE <m>` for every encoding, scale
   mode (per-row, global), centering and mode (symmetric, asymmetric), against the same query with
   ENCODING f32: Spearman over all N rows (`gradstore.ops.spearman`) and the overlap of the top 5%
   (ties to the lower row, as `gradstore.ops.compare`). Plus the composition of the top 5% (by
   source and category) under f32, absmax8, sign1 and sign1-centered (asymmetric) against the
   pool's base rate and a random 5% (seeded).

Diagnostics: the share of stored levels at +/-L and at 0 per encoding with the cosine of the
levels to the f32 row; the row norms of each set; `--time-gradients K` times K pool gradients
alone (the ingest's own timings include whatever else ran on the box meanwhile).

Writes benchmarks/results/fidelity.json (fidelity_quick.json with --quick) after every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import STORES_DIR, Timer, machine, print_machine, print_table, write_json

import gradstore
from gradstore import quant
from gradstore.encodings import QUANT_BITS, QUANT_KINDS
from gradstore.ops import compare, parse_k, requantize, spearman

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = (ROOT / ".." / "shared" / "data").resolve()
MODEL = "smollm2-135m"
TASKS = ("mmlu", "bbh", "tydiqa")
TOP = "5%"
AGG = "max"  # LESS
MODES = ("symmetric", "asymmetric")
# What the composition table looks at (asymmetric; f32 is the reference).
COMPOSITION = ("f32", "absmax8", "sign1", "sign1-centered")


@dataclass(frozen=True)
class Config:
    """Everything that fixes the gradients; a run folder holding another config is refused."""

    n: int = 2000
    seed: int = 0
    tasks: tuple[str, ...] = TASKS
    mmlu_rows: int | None = None  # quick: only the first rows of mmlu
    pool_max_length: int = 1024
    task_max_length: int = 2048
    chat_format: str = "tulu"
    dtype: str = "bf16"
    lora_r: int = 8
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    warmup_fraction: float = 0.05
    epochs: int = 2
    lr: float = 2e-4
    grad_accum: int = 8
    dim: int = 8192
    projection: str = "sparse-rademacher"

    @property
    def name(self) -> str:
        quick = "" if self.mmlu_rows is None else "-quick"
        return f"fidelity{quick}-n{self.n}-s{self.seed}-e{self.epochs}"


# ---- variants ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One scoring of the train set: a stored encoding and a mode."""

    encoding: str  # as stored, e.g. absmax4-global
    mode: str  # symmetric | asymmetric | "-" (float: the two coincide)

    @property
    def kind(self) -> str:
        base = self.encoding.split("-")[0]
        return base.rstrip("0123456789") if base not in ("f32", "f16") else base

    @property
    def bits(self) -> int:
        base = self.encoding.split("-")[0]
        return {"f32": 32, "f16": 16, "sign1": 1}.get(base) or int(base[-1])

    @property
    def scale(self) -> str:
        if self.kind in ("f32", "f16", "sign"):
            return "-"
        return "global" if "-global" in self.encoding else "row"

    @property
    def centered(self) -> bool:
        return "-centered" in self.encoding

    @property
    def label(self) -> str:
        return self.encoding if self.mode == "-" else f"{self.encoding} {self.mode[:4]}"


def train_encodings() -> list[str]:
    """What the variants store writes for the train set (the -global ones come from requantize)."""
    quant = [f"{k}{b}" for b in QUANT_BITS for k in QUANT_KINDS] + ["sign1"]
    return ["f32", "f16", *quant, *(f"{e}-centered" for e in quant)]


def task_encodings() -> list[str]:
    return [e for e in train_encodings() if not e.endswith("-centered")]


def global_encodings() -> list[str]:
    return [f"{k}{b}-global" for b in QUANT_BITS for k in QUANT_KINDS]


def variants() -> list[Variant]:
    """Every (encoding, mode) scored, most precise first."""
    out = [Variant("f16", "-")]
    for b in QUANT_BITS:
        for k in QUANT_KINDS:
            for enc in (f"{k}{b}", f"{k}{b}-global", f"{k}{b}-centered"):
                out += [Variant(enc, m) for m in MODES]
    out += [Variant(e, m) for e in ("sign1", "sign1-centered") for m in MODES]
    return out


# ---- run state ---------------------------------------------------------------------------------


class RunDir:
    """benchmarks/stores/<config name>/: warmup/, master/, variants/ and state.json (timings)."""

    def __init__(self, root: Path, cfg: Config, fresh: bool):
        self.path = root / cfg.name
        if fresh and self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.warmup = self.path / "warmup"
        self.master = self.path / "master"
        self.variants = self.path / "variants"
        self.export = self.path / "master-f32"  # .npy copy of the master (survives format changes)
        self.file = self.path / "state.json"
        self.state = json.loads(self.file.read_text()) if self.file.exists() else {}
        want = asdict(cfg)
        want["tasks"] = list(want["tasks"])
        have = self.state.get("config")
        if have is not None and have != want:
            diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
            raise SystemExit(f"{self.path} holds another run ({diff}); pass --fresh to start over")
        self.state["config"] = want

    def save(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.file)


def master_complete(run: RunDir, n_ckpts: int) -> bool:
    """The ingest ran to its end and the master holds every row of every set at every checkpoint.

    A master the engine can no longer open (its store format changed) is rebuilt from the f32
    export written after the ingest, or, without one, removed so the ingest runs again.
    """
    if (run.master / "data.mdb").exists():
        try:
            gradstore.open(run.master).close()
        except gradstore.GradstoreError as exc:
            print(f"master: {exc}", flush=True)
            shutil.rmtree(run.master)
            if run.state.get("ingest_complete") and (run.export / "manifest.json").exists():
                import_master(run.export, run.master)
            else:
                run.state.pop("ingest", None)
                run.state.pop("ingest_complete", None)
                run.save()
    if not run.state.get("ingest_complete") or not (run.master / "data.mdb").exists():
        return False
    with gradstore.open(run.master) as st:
        if len(st.checkpoint_names()) != n_ckpts:
            return False
        for s in ["train", *run.state["config"]["tasks"]]:
            if s not in st.sets():
                return False
            info = st.set_info(s)
            if any(info["written"].get(c, 0) != info["n_rows"] for c in st.checkpoint_names()):
                return False
    return True


def export_master(master_path: Path, out: Path) -> None:
    """The master's f32 vectors as .npy files plus a manifest (meta, checkpoints, rows).

    The gradients are the expensive part; this copy outlives a change of the store format.
    """
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with gradstore.open(master_path) as st:
        manifest = {"meta": {k: st.meta[k] for k in ("dim", "projection", "model", "lora")},
                    "checkpoints": st.checkpoints(), "sets": {}}
        for i, s in enumerate(st.sets()):
            info = st.set_info(s)
            manifest["sets"][s] = {"kind": info["kind"], "rows": st.rows(s), "files": {}}
            for j, c in enumerate(st.checkpoint_names()):
                name = f"{i:02d}-{j:02d}.npy"
                np.save(tmp / name, st.vectors(s, c, "f32"))
                manifest["sets"][s]["files"][c] = name
    (tmp / "manifest.json").write_text(json.dumps(manifest) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def import_master(export: Path, master_path: Path) -> None:
    """Rebuild the f32 master from `export_master`'s files with the current engine."""
    manifest = json.loads((export / "manifest.json").read_text())
    meta = manifest["meta"]
    print(f"master: rebuilding {master_path} from {export}", flush=True)
    st = gradstore.create(master_path, dim=meta["dim"], projection=meta["projection"],
                          model=meta["model"], lora=meta["lora"])
    try:
        for c in manifest["checkpoints"]:
            st.add_checkpoint(c["name"], lr=c["lr"], step=c["step"], epoch=c["epoch"],
                              optimizer=c["optimizer"], source=c["source"])
        for s, rec in manifest["sets"].items():
            rows = rec["rows"]
            meta_rows = [{k: v for k, v in r.items() if k not in ("id", "subtask")} for r in rows]
            for c, name in rec["files"].items():
                x = np.load(export / name)
                for lo in range(0, len(x), 1000):
                    hi = min(len(x), lo + 1000)
                    st.write(s, c, x[lo:hi], [r["id"] for r in rows[lo:hi]], kind=rec["kind"],
                             encodings=("f32",), metadata=meta_rows[lo:hi],
                             subtasks=[r["subtask"] for r in rows[lo:hi]]
                             if rec["kind"] == "task" else None)
    finally:
        st.close()


# ---- stages 1-3: data, warmup, ingest (torch) ---------------------------------------------------


def read_data(cfg: Config, state: dict):
    from qless.data import read_pool
    from qless.model import load_tokenizer
    from qless.tasks import load_task

    tokenizer = load_tokenizer(MODEL)
    files = sorted((DATA_DIR / "train").glob("*/*.jsonl"))
    with Timer() as t:
        examples, report = read_pool(files, tokenizer, max_length=cfg.pool_max_length,
                                     skip_invalid=True, chat_format=cfg.chat_format)
    print(f"read pool: {report.summary(limit=5)} ({t.s:.0f} s)", flush=True)
    index = np.sort(np.random.RandomState(cfg.seed).permutation(len(examples))[:cfg.n])
    pool = [examples[i] for i in index]
    del examples
    tasks = {}
    for name in cfg.tasks:
        ex = load_task(name, tokenizer, data_dir=DATA_DIR, max_length=cfg.task_max_length,
                       chat_format=cfg.chat_format)
        if name == "mmlu" and cfg.mmlu_rows is not None:
            ex = ex[:cfg.mmlu_rows]
        tasks[name] = ex
    state["data"] = {
        "files": [str(f.relative_to(DATA_DIR)) for f in files],
        "records": report.n_records, "examples": report.n_examples, "skipped": report.n_skipped,
        "skipped_first": [str(s) for s in report.skipped[:5]],
        "read_seconds": round(t.s, 1), "pool": len(pool),
        "pool_tokens_mean": float(np.mean([len(e.input_ids) for e in pool])),
        "pool_sources": _counts(e.metadata.get("source") for e in pool),
        "tasks": {k: {"rows": len(v), "subtasks": len({e.subtask for e in v}),
                      "tokens_mean": float(np.mean([len(e.input_ids) for e in v]))}
                  for k, v in tasks.items()},
    }
    return pool, tasks


def run_warmup(cfg: Config, run: RunDir, pool) -> list[dict]:
    from qless.config import WarmupConfig
    from qless.data import sample_fraction
    from qless.model import ModelSource, attach_lora
    from qless.warmup import completed_checkpoints, warmup

    trained = len(completed_checkpoints(run.warmup)) < cfg.epochs  # else it returns at once
    subset = sample_fraction(pool, cfg.warmup_fraction, cfg.seed)
    source = ModelSource(MODEL, cfg.dtype)
    model = attach_lora(source.load(), r=cfg.lora_r, alpha=cfg.lora_alpha,
                        dropout=cfg.lora_dropout, seed=cfg.seed)
    with Timer() as t:
        infos = warmup(model, subset, run.warmup,
                       WarmupConfig(epochs=cfg.epochs, lr=cfg.lr, grad_accum=cfg.grad_accum, seed=cfg.seed),
                       source=source)
    del model
    prev = run.state.get("warmup", {})
    run.state["warmup"] = {
        "examples": len(subset),
        "seconds": round(t.s, 1) if trained else prev.get("seconds"),
        "cpu_seconds": round(t.cpu, 1) if trained else prev.get("cpu_seconds"),
        "checkpoints": [{k: i[k] for k in ("name", "epoch", "step", "lr", "lr_first", "lr_last",
                                             "steps_in_epoch", "train_loss")} for i in infos],
    }
    run.save()
    print("warmup: " + "; ".join(f"{i['name']} step {i['step']} lr {i['lr']:.3g} loss "
                                 f"{i['train_loss']:.4f}" for i in infos)
          + (f" ({t.s:.0f} s)" if trained else " (reused)"), flush=True)
    return infos


def run_ingest(cfg: Config, run: RunDir, pool, tasks, infos) -> None:
    from qless.checkpoint import read_checkpoints
    from qless.config import IngestConfig
    from qless.ingest import ingest
    from qless.model import ModelSource

    ckpts = read_checkpoints([i["path"] for i in infos])
    jobs = [("train", pool, "train")] + [(name, ex, "task") for name, ex in tasks.items()]
    stats = run.state.setdefault("ingest", {})
    config = IngestConfig(encodings=("f32",), dim=cfg.dim, projection=cfg.projection, seed=cfg.seed)
    for name, examples, kind in jobs:
        with Timer() as t:
            rep = ingest(run.master, examples, name, ckpts, ModelSource(MODEL, cfg.dtype), config, kind=kind)
        s = stats.setdefault(name, {"rows": len(examples), "written": 0, "no_response": 0,
                                    "seconds": 0.0, "cpu_seconds": 0.0, "gradient": 0.0,
                                    "projection": 0.0, "write": 0.0})
        s["written"] += rep.written
        s["no_response"] = rep.no_response
        s["seconds"] += t.s
        s["cpu_seconds"] += t.cpu
        for k in ("gradient", "projection", "write"):
            s[k] += rep.seconds[k]
        if s["written"]:
            s["gradient_s_per_example"] = s["gradient"] / s["written"]
            s["projection_s_per_example"] = s["projection"] / s["written"]
        run.save()
        print(f"ingest {name}: {rep.summary()} ({t.s:.0f} s"
              + (f", gradient {rep.seconds['gradient'] / rep.written:.3f} s/example"
                 if rep.written else "") + ")", flush=True)


def time_gradients(cfg: Config, run: RunDir, k: int) -> dict:
    """Time k pool gradients (Adam directions) at the first checkpoint, alone on the box.

    The ingest's own timings add up whatever else ran meanwhile; this one is taken when asked.
    """
    import torch

    from qless.gradients import GradientComputer
    from qless.model import load_adapter, load_model
    from qless.optimizer_state import load_optimizer_state
    from qless.projection import make_projection

    pool, _ = read_data(cfg, {})
    examples = pool[:k + 1]
    ckpt = run.state["warmup"]["checkpoints"][0]["name"]
    path = run.warmup / ckpt
    model = load_adapter(load_model(MODEL, dtype=cfg.dtype), path)
    computer = GradientComputer(model, load_optimizer_state(path, model), mode="adam")
    with gradstore.open(run.master) as st:
        project = make_projection(st.meta["projection"])
    project.project(computer.gradient_tensor(examples[0])[None])  # warm up
    grad = proj = 0.0
    with Timer() as t:
        for ex in examples[1:]:
            t0 = time.perf_counter()
            g = computer.gradient_tensor(ex)
            t1 = time.perf_counter()
            project.project(g[None])
            grad += t1 - t0
            proj += time.perf_counter() - t1
    n = len(examples) - 1
    out = {"examples": n, "checkpoint": ckpt, "torch_threads": torch.get_num_threads(),
           "tokens_mean": float(np.mean([len(e.input_ids) for e in examples[1:]])),
           "gradient_s_per_example": grad / n, "projection_s_per_example": proj / n,
           "cpu_s_per_example": t.cpu / n, "loadavg": os.getloadavg()}
    print(f"gradient timing: {out['gradient_s_per_example']:.3f} s/example "
          f"(+{out['projection_s_per_example']:.4f} s projection), {n} examples of "
          f"{out['tokens_mean']:.0f} tokens, {out['torch_threads']} threads", flush=True)
    return out


# ---- stage 4: variants (no model) -------------------------------------------------------------


def build_variants(master_path: Path, out: Path, run: RunDir) -> None:
    """Write every encoding of every set from the master's f32 into a fresh store at `out`."""
    with gradstore.open(master_path) as master:
        fingerprint = {s: master.set_info(s)["written"] for s in master.sets()}
        if out.exists() and run.state.get("variants", {}).get("master") == fingerprint:
            try:
                gradstore.open(out).close()
                print("variants: reused", flush=True)
                return
            except gradstore.GradstoreError as exc:  # e.g. written in an older store format
                print(f"variants: {exc}; rebuilding", flush=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        timings = {}
        with Timer() as t_all:
            st = gradstore.create(tmp, dim=master.dim, projection=master.meta["projection"],
                                  model=master.meta["model"], lora=master.meta["lora"])
            try:
                for c in master.checkpoints():
                    st.add_checkpoint(c["name"], lr=c["lr"], step=c["step"], epoch=c["epoch"],
                                      optimizer=c["optimizer"], source=c["source"])
                with Timer() as t:
                    for s in master.sets():
                        info = master.set_info(s)
                        rows = master.rows(s)
                        ids = [r["id"] for r in rows]
                        meta = [{k: v for k, v in r.items() if k not in ("id", "subtask")}
                                for r in rows]
                        encs = train_encodings() if info["kind"] == "train" else task_encodings()
                        for c in master.checkpoint_names():
                            x = master.vectors(s, c, "f32")
                            n = len(x)  # rows stored at this checkpoint (a prefix of the set)
                            # One batch: the centroid the centered encodings freeze is the mean
                            # of the whole set at this checkpoint.
                            st.write(s, c, x, ids[:n], kind=info["kind"], encodings=encs,
                                     metadata=meta[:n],
                                     subtasks=[r["subtask"] for r in rows[:n]]
                                     if info["kind"] == "task" else None)
                timings["write_seconds"] = round(t.s, 1)
                with Timer() as t:
                    requantize(st, to=global_encodings(), source="f32")
                timings["requantize_seconds"] = round(t.s, 1)
            finally:
                st.close()
            os.replace(tmp, out)
        timings["seconds"] = round(t_all.s, 1)
        run.state["variants"] = {"master": fingerprint, **timings}
        run.save()
        print(f"variants: written in {timings['write_seconds']} s, -global by requantize in "
              f"{timings['requantize_seconds']} s", flush=True)


# ---- stage 5: scoring -------------------------------------------------------------------------


def query_text(task: str, encoding: str, mode: str | None) -> str:
    text = f"SCORE FROM train BY {task} AGG {AGG} ENCODING {encoding}"
    return text + (f" MODE {mode}" if mode and mode != "-" else "")


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best rows, ties to the lower row (as gradstore's query and compare)."""
    rows = np.arange(len(scores))
    return np.sort(rows[np.lexsort((rows, -scores.astype(np.float64)))[:k]])


def score_all(store, tasks, master_path: Path) -> tuple[dict, dict, list[dict], dict]:
    """Reference scores per task; per variant and task: Spearman and top-5% overlap."""
    n = store.n_rows("train")
    k = parse_k(TOP, n)
    ref, copy_gap = {}, {}
    for task in tasks:
        ref[task] = store.query(query_text(task, "f32", None)).scores
        with gradstore.open(master_path) as master:  # the copy scores as the master itself
            m = master.query(query_text(task, "f32", None)).scores
        # Not bit-equal: vectors() dequantizes (u * |x|) and write normalizes again.
        gap = float(np.max(np.abs(m.astype(np.float64) - ref[task]))) if len(m) else 0.0
        if gap > 1e-6:
            raise AssertionError(f"{task}: f32 scores of the variants store differ from the "
                                 f"master's by up to {gap:.3g}")
        copy_gap[task] = gap
    cross = compare(store, "f32", "absmax8", tasks=[tasks[0]], k=TOP)  # the engine's own compare
    table = []
    seconds = {}
    for v in variants():
        entry = {"encoding": v.encoding, "kind": v.kind, "bits": v.bits, "scale": v.scale,
                 "centered": v.centered, "mode": v.mode, "tasks": {}}
        for task in tasks:
            with Timer() as t:
                s = store.query(query_text(task, v.encoding, v.mode)).scores
            seconds[f"{v.label} {task}"] = t.s
            overlap = len(np.intersect1d(top_rows(s, k), top_rows(ref[task], k))) / k
            entry["tasks"][task] = {"spearman": spearman(ref[task], s), "overlap": overlap}
        entry["mean_overlap"] = float(np.mean([r["overlap"] for r in entry["tasks"].values()]))
        entry["mean_spearman"] = float(np.mean([r["spearman"] for r in entry["tasks"].values()]))
        table.append(entry)
    # The engine's compare must agree with the numbers above for the same pair.
    mine = next(e for e in table if e["encoding"] == "absmax8" and e["mode"] == "asymmetric")
    if cross.k != k or abs(cross.overlap - mine["tasks"][tasks[0]]["overlap"]) > 1e-12:
        raise AssertionError(f"ops.compare disagrees: {cross} vs {mine['tasks'][tasks[0]]}")
    check = {"compare": cross.to_dict(), "agrees": True, "master_vs_copy_max_abs": copy_gap}
    return ref, {"k": k, "rows": n, "query_seconds_total": round(sum(seconds.values()), 2)}, table, check


OVERSAMPLES = (1, 1.5, 2, 3, 4, 6, 8, 12, 16)
SHORTLISTS = ("sign1-centered", "sign1")  # symmetric, XOR + popcount


def two_stage(store, tasks, ref: dict, k: int) -> dict:
    """The default plan and its parts against f32's top k, per task.

    - recall: the share of f32's top k inside a shortlist of m x k rows by each 1-bit
      encoding (symmetric), for each m in OVERSAMPLES;
    - plan: the share the two-stage plan keeps (shortlist by sign1-centered, rerank in
      absmax8) for each m, and the default plan (no ENCODING, MODE, RERANK);
    - int_dot: absmax8 asymmetric as the engine scores it (the collapsed task vectors rounded
      to 15 bits, VNNI) against the same formula in float64 numpy: top-k overlap, max |diff|;
    - gain: sign1-centered with and without the arcsine gain that puts the sign term on the
      cosine's scale (executor._SIGN_GAIN), per mode.
    """
    from gradstore.query import executor

    out = {}
    for task in tasks:
        truth = top_rows(ref[task], k)
        r: dict = {"recall": {}, "plan": {}}
        for enc in SHORTLISTS:
            s1 = store.query(query_text(task, enc, "symmetric")).scores
            r["recall"][enc] = {str(m): len(np.intersect1d(top_rows(s1, math.ceil(m * k)), truth)) / k
                                for m in OVERSAMPLES}
        for m in OVERSAMPLES:
            res = store.query(f"TOP {k} FROM train BY {task} AGG {AGG} RERANK absmax8 OVERSAMPLE {m}")
            r["plan"][str(m)] = len(np.intersect1d(res.rows, truth)) / k
        default = store.query(f"TOP {TOP} FROM train BY {task} AGG {AGG}")
        r["default"] = {"overlap": len(np.intersect1d(default.rows, truth)) / k,
                        "stages": [st.to_dict() for st in default.plan.stages]}
        engine = store.query(query_text(task, "absmax8", "asymmetric")).scores
        exact = float_scores(store, task, "absmax8")
        r["int_dot"] = {"overlap_with_float": len(np.intersect1d(top_rows(engine, k), top_rows(exact, k))) / k,
                        "max_abs_diff": float(np.max(np.abs(engine - exact))),
                        "spearman": spearman(exact, engine)}
        gain = dict(executor._SIGN_GAIN)
        r["gain"] = {}
        for mode in MODES:
            with_gain = store.query(query_text(task, "sign1-centered", mode)).scores
            executor._SIGN_GAIN[mode] = 1.0
            try:
                without = store.query(query_text(task, "sign1-centered", mode)).scores
            finally:
                executor._SIGN_GAIN.update(gain)
            r["gain"][mode] = {"with": len(np.intersect1d(top_rows(with_gain, k), truth)) / k,
                               "without": len(np.intersect1d(top_rows(without, k), truth)) / k}
        out[task] = r
    return out


def float_scores(store, task: str, encoding: str) -> np.ndarray:
    """LESS's score of every train row in float64 numpy: the stored levels of `encoding` (unit
    rows) against the task's f32 rows (unit), mean per subtask, lr-weighted sum, max."""
    lrs = {c["name"]: c["lr"] for c in store.checkpoints()}
    ckpts = store.checkpoint_names()
    subs = np.array([r["subtask"] for r in store.rows(task)])
    acc = 0.0
    for c in ckpts:
        g = quant.unpack_levels(store.read("train", c, encoding).payload, encoding, store.dim).astype(np.float64)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        v = store.vectors(task, c, "f32").astype(np.float64)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        q = np.stack([v[subs == s].mean(axis=0) for s in dict.fromkeys(subs)])
        acc = acc + lrs[c] / sum(lrs[x] for x in ckpts) * (g @ q.T)
    return acc.max(axis=1)


def print_two_stage(res: dict, k: int) -> list[str]:
    lines = [f"\nTwo stages: share of f32's top {k} kept, by oversample m (shortlist m x k)"]
    ms = [str(m) for m in OVERSAMPLES]
    head = f"{'task':<7} {'what':<34}" + "".join(f"{m:>6}" for m in ms)
    lines.append(head)
    for task, r in res.items():
        for enc, rec in r["recall"].items():
            lines.append(f"{task:<7} {'recall of ' + enc + ' shortlist':<34}"
                         + "".join(f"{rec[m]:>6.2f}" for m in ms))
        lines.append(f"{task:<7} {'plan: sign1-centered -> absmax8':<34}"
                     + "".join(f"{r['plan'][m]:>6.2f}" for m in ms))
        lines.append(f"{task:<7} default plan {r['default']['overlap']:.3f}; absmax8 int-dot vs float:"
                     f" overlap {r['int_dot']['overlap_with_float']:.3f}, max |diff|"
                     f" {r['int_dot']['max_abs_diff']:.2g}; sign1-centered gain on/off:"
                     + "".join(f" {m[:4]} {g['with']:.2f}/{g['without']:.2f}" for m, g in r["gain"].items()))
    print("\n".join(lines), flush=True)
    return lines


def composition(store, tasks, k: int, seed: int) -> dict:
    """Shares (percent) of each source and category in each top 5% vs the pool and a random 5%."""
    rows = store.rows("train")
    source = np.array([r.get("source") for r in rows])
    category = np.array([r.get("category") for r in rows])
    n = len(rows)
    rand = np.sort(np.random.RandomState(seed).choice(n, k, replace=False))

    def shares(idx):
        return {"source": _shares(source[idx]), "category": _shares(category[idx])}

    out = {"pool": shares(np.arange(n)), "random": shares(rand), "tasks": {}}
    for task in tasks:
        sel = {}
        for enc in COMPOSITION:
            mode = "-" if enc == "f32" else "asymmetric"
            s = store.query(query_text(task, enc, mode)).scores
            sel[enc] = shares(top_rows(s, k))
        out["tasks"][task] = sel
    return out


def level_stats(store, checkpoint: str) -> list[dict]:
    """How each encoding holds the train rows at one checkpoint (explains the fidelity table).

    Per encoding, over all rows and coordinates: the share of levels at +/-L (for absmean,
    mostly coordinates clipped there; for sign1 all of them), the share at 0, and the mean cosine
    of the stored levels with what they encode (the f32 row; its residual from the centroid for
    a -centered encoding).
    """
    from gradstore.encodings import parse_encoding
    from gradstore.quant import unpack_levels

    x = store.vectors("train", checkpoint, "f32").astype(np.float64)
    c = store.centroid("train", checkpoint)
    out = []
    for name in train_encodings()[1:] + global_encodings():
        enc = parse_encoding(name)
        target = x - c.astype(np.float64) if enc.centered else x
        lv = unpack_levels(store.read("train", checkpoint, name).payload, enc, store.dim)
        lv = lv.astype(np.float64)
        num = np.einsum("ij,ij->i", lv, target)
        den = np.linalg.norm(lv, axis=1) * np.linalg.norm(target, axis=1)
        cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        full = np.abs(lv) == enc.levels if not enc.is_float else np.zeros(lv.shape, bool)
        out.append({"encoding": name, "bits": enc.bits, "at_max_level": float(full.mean()),
                    "at_zero": float((lv == 0).mean()), "cos_to_f32": float(cos.mean()),
                    "cos_to_f32_min": float(cos.min())})
    return out


def norms(store) -> dict:
    """Mean row norm of each set and the train centroid's norm, per checkpoint.

    Centered symmetric scoring quantizes each task row's residual from the *train* centroid;
    when task rows are much shorter than the centroid (plain gradients vs Adam directions), that
    residual is almost -c for every task row.
    """
    out = {}
    for ckpt in store.checkpoint_names():
        row = {s: float(np.linalg.norm(store.vectors(s, ckpt, "f32"), axis=1).mean())
               for s in store.sets()}
        row["train_centroid"] = float(np.linalg.norm(store.centroid("train", ckpt)))
        out[ckpt] = row
    return out


def print_level_stats(stats: list[dict], checkpoint: str) -> str:
    rows = [[s["encoding"], s["bits"], f"{100 * s['at_max_level']:.1f}", f"{100 * s['at_zero']:.1f}",
             round(s["cos_to_f32"], 4), round(s["cos_to_f32_min"], 4)] for s in stats]
    return print_table(["encoding", "bits", "% at +/-L", "% at 0", "cos(levels, f32)", "min"],
                       rows, title=f"\nStored levels of the train rows at {checkpoint} "
                                   "(-centered: against the residual from the centroid)")


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], str(kv[0]))))


def _shares(values) -> dict:
    c = _counts(values)
    total = sum(c.values())
    return {k: 100.0 * v / total for k, v in c.items()}


# ---- report ------------------------------------------------------------------------------------


def print_fidelity(table: list[dict], tasks, k: int, n: int) -> str:
    headers = ["variant", "bits", "scale", "mode"]
    for t in tasks:
        headers += [f"{t} rho", f"{t} top"]
    headers += ["mean top"]
    rows = []
    for e in table:
        row = [e["encoding"], e["bits"], e["scale"], e["mode"]]
        for t in tasks:
            row += [round(e["tasks"][t]["spearman"], 4), round(e["tasks"][t]["overlap"], 3)]
        rows.append(row + [round(e["mean_overlap"], 3)])
    return print_table(headers, rows, title=f"\nFidelity to f32 (SCORE ... AGG max): Spearman over "
                       f"{n:,} rows, overlap of the top {TOP} ({k} rows; chance {k / n:.2f})")


def print_composition(comp: dict, tasks) -> list[str]:
    texts = []
    for task in tasks:
        sel = comp["tasks"][task]
        cols = ["pool", "random"] + list(COMPOSITION)
        keys = [("source", s) for s in comp["pool"]["source"]]
        keys += [("category", c) for c in comp["pool"]["category"]]
        rows = []
        for kind, key in keys:
            label = f"{key} (CoT)" if key == "flan_v2_cot" else key
            label = f"[{label}]" if kind == "source" else f"  {label}"
            vals = [comp["pool"][kind].get(key, 0.0), comp["random"][kind].get(key, 0.0)]
            vals += [sel[e][kind].get(key, 0.0) for e in COMPOSITION]
            rows.append([label] + [f"{v:.1f}" for v in vals])
        texts.append(print_table(["% of rows"] + cols, rows,
                                 title=f"\nComposition of the top {TOP} for {task} (asymmetric; "
                                       "[source], then category)"))
    return texts


def best_per_width(table: list[dict]) -> dict:
    """The highest mean top-5% overlap at each width (ties: the higher mean Spearman)."""
    out = {}
    for bits in sorted({e["bits"] for e in table}, reverse=True):
        cands = [e for e in table if e["bits"] == bits]
        best = max(cands, key=lambda e: (round(e["mean_overlap"], 6), e["mean_spearman"]))
        out[str(bits)] = {"encoding": best["encoding"], "mode": best["mode"],
                          "mean_overlap": best["mean_overlap"], "mean_spearman": best["mean_spearman"],
                          "ranking": [(e["encoding"], e["mode"], round(e["mean_overlap"], 4),
                                       round(e["mean_spearman"], 4))
                                      for e in sorted(cands, key=lambda e: (-e["mean_overlap"],
                                                                            -e["mean_spearman"]))]}
    return out


def targets(table: list[dict], tasks) -> list[dict]:
    """The issue's targets, checked per task and mode (reported whatever they show)."""
    goals = [("absmax8", 0.98), ("absmax4-centered", 0.95), ("sign1-centered", 0.70)]
    out = []
    for enc, goal in goals:
        for e in (e for e in table if e["encoding"] == enc):
            for t in tasks:
                got = e["tasks"][t]["overlap"]
                out.append({"encoding": enc, "mode": e["mode"], "task": t, "target": goal,
                            "overlap": got, "met": got >= goal})
    return out


def timings(state: dict) -> dict:
    """Seconds of each stage, from the run folder's state (summed over resumed runs)."""
    out = {"read_pool_seconds": state.get("data", {}).get("read_seconds"),
           "warmup_seconds": state.get("warmup", {}).get("seconds"),
           "warmup_cpu_seconds": state.get("warmup", {}).get("cpu_seconds"),
           "ingest": {}}
    n_ckpts = len(state.get("warmup", {}).get("checkpoints", [])) or 1
    for name, s in state.get("ingest", {}).items():
        w = s.get("written") or 0
        out["ingest"][name] = {
            # partial: a killed run lost the timings of what it wrote of this set
            "rows": s["rows"], "rows_x_checkpoints": w, "partial": w < s["rows"] * n_ckpts,
            "wall_seconds": round(s["seconds"], 1),
            "cpu_seconds": round(s["cpu_seconds"], 1),
            "gradient_s_per_example": s["gradient"] / w if w else None,
            "cpu_s_per_example": s["cpu_seconds"] / w if w else None,
            "projection_s_per_example": s["projection"] / w if w else None}
    out["ingest_wall_seconds"] = round(sum(s["seconds"] for s in state.get("ingest", {}).values()), 1)
    v = state.get("variants", {})
    out["variants_write_seconds"] = v.get("write_seconds")
    out["requantize_seconds"] = v.get("requantize_seconds")
    return out


def engine_version() -> dict:
    """The git commit the engine ran at, and whether gradstore/ or qless/ differed from it."""
    import subprocess

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    dirty = git("status", "--porcelain", "--", "gradstore", "qless")
    return {"commit": git("rev-parse", "HEAD"), "gradstore_qless_modified": bool(dirty),
            "modified": dirty.splitlines() if dirty else []}


# ---- main --------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="N=200, tydiqa + the first 20 mmlu rows, 1 epoch (development)")
    ap.add_argument("--n", type=int, default=None, help="pool size (default 2,000; quick 200)")
    ap.add_argument("--epochs", type=int, default=None, help="warmup epochs (default 2; quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads (2-core box, idle: 0.24 s/example with 2, 0.36 with 1; "
                         "under load 1 can be faster)")
    ap.add_argument("--store-dir", type=Path, default=STORES_DIR)
    ap.add_argument("--fresh", action="store_true", help="delete this config's run folder first")
    ap.add_argument("--analyze-only", action="store_true",
                    help="score the stored gradients; fail if they are incomplete")
    ap.add_argument("--time-gradients", type=int, default=0, metavar="K",
                    help="also time K pool gradients at the first checkpoint (run on an idle box)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    quick = args.quick
    cfg = Config(n=args.n or (200 if quick else 2000), seed=args.seed,
                 tasks=("mmlu", "tydiqa") if quick else TASKS,
                 mmlu_rows=20 if quick else None,
                 epochs=args.epochs or (1 if quick else 2))
    info = machine()
    info["torch_threads"] = torch.get_num_threads()
    info["torch"] = torch.__version__
    print_machine(info)
    run = RunDir(args.store_dir, cfg, args.fresh)
    out_name = "fidelity_quick" if quick else "fidelity"
    results: dict = {"machine": info, "engine": engine_version(), "quick": quick,
                     "config": asdict(cfg), "model": MODEL,
                     "run_dir": str(run.path), "state": run.state}

    def save():
        results["state"] = run.state
        write_json(out_name, results)

    t0 = time.perf_counter()
    if not master_complete(run, cfg.epochs):
        if args.analyze_only:
            raise SystemExit(f"{run.master}: the gradients are incomplete; run without --analyze-only")
        pool, tasks = read_data(cfg, run.state)
        run.save()
        infos = run_warmup(cfg, run, pool)
        save()
        run_ingest(cfg, run, pool, tasks, infos)
        export_master(run.master, run.export)
        run.state["ingest_engine"] = engine_version()
        run.state["ingest_complete"] = True
        run.save()
        del pool, tasks
        save()
    build_variants(run.master, run.variants, run)
    if args.time_gradients:
        run.state["gradient_timing"] = time_gradients(cfg, run, args.time_gradients)
        run.save()

    with gradstore.open(run.variants) as store:
        results["store"] = {"model": store.meta["model"], "lora": store.meta["lora"],
                            "projection": store.meta["projection"], "dim": store.dim,
                            "checkpoints": store.checkpoints(),
                            "sets": {s: store.set_info(s)["n_rows"] for s in store.sets()},
                            "global_scales": {s: store.set_info(s).get("scales", {})
                                              for s in store.sets()}}
        tasks = [t for t in TASKS if t in cfg.tasks]
        with Timer() as t:
            ref, meta, table, check = score_all(store, tasks, run.master)
            stages = two_stage(store, tasks, ref, meta["k"])
            comp = composition(store, tasks, meta["k"], cfg.seed)
        meta["seconds"] = round(t.s, 1)
        first = store.checkpoint_names()[0]
        levels = level_stats(store, first)
        row_norms = norms(store)
    results.update(scoring=meta, compare_check=check, fidelity=table, composition=comp, two_stage=stages,
                   best_per_width=best_per_width(table), targets=targets(table, tasks))
    results["timings"] = timings(run.state)
    results["timings"]["scoring_seconds"] = meta["seconds"]
    results["timings"]["gradient_timing_idle"] = run.state.get("gradient_timing")
    results["levels"] = {"checkpoint": first, "encodings": levels}
    results["norms"] = row_norms
    results["tables"] = {"levels": print_level_stats(levels, first),
                         "fidelity": print_fidelity(table, tasks, meta["k"], meta["rows"]),
                         "composition": print_composition(comp, tasks),
                         "two_stage": print_two_stage(stages, meta["k"])}
    print("\nBest per width (mean top-5% overlap over tasks, then Spearman):")
    for bits, b in results["best_per_width"].items():
        print(f"  {bits:>2} bits: {b['encoding']} {b['mode']}  overlap {b['mean_overlap']:.3f}"
              f"  rho {b['mean_spearman']:.4f}")
    print("\nTargets:")
    for g in results["targets"]:
        print(f"  {g['encoding']:<17} {g['mode']:<10} {g['task']:<7} overlap {g['overlap']:.3f}"
              f" (target {g['target']}): {'met' if g['met'] else 'NOT met'}")
    tm = results["timings"]
    print(f"\nTimings: read pool {tm['read_pool_seconds']} s, warmup {tm['warmup_seconds']} s, "
          f"ingest {tm['ingest_wall_seconds']} s, variants {tm['variants_write_seconds']} s "
          f"+ requantize {tm['requantize_seconds']} s, scoring {tm['scoring_seconds']} s")
    for name, g in tm["ingest"].items():
        if g["gradient_s_per_example"] is not None:
            print(f"  {name:<7} {g['rows_x_checkpoints']:>5} gradients: "
                  f"{g['gradient_s_per_example']:.3f} s/example wall, "
                  f"{g['cpu_s_per_example']:.3f} CPU s/example"
                  + (" (timed part of them only)" if g["partial"] else ""))
    idle = tm.get("gradient_timing_idle")
    if idle:
        print(f"  timed alone: {idle['gradient_s_per_example']:.3f} s/example "
              f"({idle['examples']} pool examples of {idle['tokens_mean']:.0f} tokens, "
              f"{idle['torch_threads']} threads)")
    results["total_seconds_this_run"] = round(time.perf_counter() - t0, 1)
    save()
    return results


if __name__ == "__main__":
    main()

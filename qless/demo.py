"""The end-to-end demo on the embedded SmolLM2-135M: warmup, ingest, select, report.

A 300-row pool of six skills (qless/demo_data/pool.jsonl) and three small target tasks, each
written to need one of those skills. The demo trains a short LoRA warmup on 10% of the pool,
ingests every row's Adam direction (and the tasks' gradients) at the default encodings (f16,
absmax8, sign1-centered), then
selects the top 5% for each task and reports how strongly the matching skill is enriched over
the pool's base rate, and how well the quantized selections agree with f16's.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gradstore
from gradstore.format import DATA_FILE
from gradstore.ops import compare

from .checkpoint import Checkpoint
from .config import IngestConfig, LoraConfig, ReadConfig, WarmupConfig
from .data import load_line, read_pool, sample_fraction
from .ingest import ingest
from .model import ModelSource, attach_lora, load_tokenizer
from .selection import read_record_line
from .tasks import DEMO_POOL_FILE, DEMO_TASKS, load_task
from .warmup import warmup

# The pool category each demo task was written to need.
TASK_SKILL = {"demo-mmlu": "multiple_choice", "demo-bbh": "logic", "demo-tydiqa": "reading_comprehension"}


@dataclass(frozen=True)
class DemoSettings:
    source: ModelSource = ModelSource()
    read: ReadConfig = ReadConfig(max_length=512)
    lora: LoraConfig = LoraConfig(r=8, alpha=32)  # LESS's alpha = 4 r
    warmup_fraction: float = 0.1
    # A few steps only, so a larger lr than LESS's 2e-5.
    warmup: WarmupConfig = WarmupConfig(epochs=2, lr=2e-4, grad_accum=4)
    ingest: IngestConfig = IngestConfig()
    k: str = "5%"


@dataclass
class TaskReport:
    task: str
    skill: str
    selected: int
    skill_share: float  # of the f16 selection
    base_rate: float  # of the pool
    top: list = field(default_factory=list)  # (id, category, score, prompt preview)
    agreement: dict = field(default_factory=dict)  # encoding -> {overlap, spearman}

    @property
    def enrichment(self) -> float:
        return self.skill_share / self.base_rate if self.base_rate else float("nan")


def run_demo(store_path: str | Path = "gradstore-demo", settings: DemoSettings = DemoSettings(),
             echo: Callable[[str], None] = print, progress: bool = True) -> list[TaskReport]:
    """Run the whole pipeline; leaves the store at `store_path` (warmup checkpoints beside it)."""
    store_path = Path(store_path)
    if (store_path / DATA_FILE).exists():
        raise gradstore.StoreExistsError(f"{store_path}: a store is already there; remove it or pick another path")
    started = time.perf_counter()
    s = settings
    echo(f"[1/4] loading {s.source.name_or_path} and the demo pool")
    tokenizer = load_tokenizer(s.source.name_or_path)
    pool, _ = read_pool([DEMO_POOL_FILE], tokenizer, max_length=s.read.max_length, chat_format=s.read.chat_format)
    tasks = {t: load_task(t, tokenizer, max_length=s.read.max_length, chat_format=s.read.chat_format)
             for t in DEMO_TASKS}

    echo(f"[2/4] warmup: LoRA r={s.lora.r} on {s.warmup_fraction:.0%} of {len(pool)} rows,"
         f" {s.warmup.epochs} epochs")
    model = attach_lora(s.source.load(), r=s.lora.r, alpha=s.lora.alpha, dropout=s.lora.dropout, seed=s.warmup.seed)
    infos = warmup(model, sample_fraction(pool, s.warmup_fraction, s.warmup.seed), f"{store_path}-warmup",
                   s.warmup, source=s.source, progress=progress)
    checkpoints = [Checkpoint.from_info(i, str(Path(f"{store_path}-warmup", i["name"]).resolve()))
                   for i in infos]
    del model

    echo(f"[3/4] ingest: gradients of {len(pool)} rows and {sum(map(len, tasks.values()))} task rows"
         f" at {len(checkpoints)} checkpoints -> {', '.join(s.ingest.encodings)}")
    report = ingest(store_path, pool, "train", checkpoints, s.source, s.ingest, progress=progress)
    for name, examples in tasks.items():
        ingest(store_path, examples, name, checkpoints, s.source, s.ingest, kind="task", progress=progress)
    echo(f"      {report.summary()}")

    echo(f"[4/4] select the top {s.k} for each task")
    reports = []
    with gradstore.open(store_path) as store:
        categories = [r.get("category") for r in store.rows("train")]
        for task, skill in TASK_SKILL.items():
            result = store.query(f"TOP {s.k} FROM train BY {task} ENCODING f16")
            picked = Counter(r.get("category") for r in result.records)
            rep = TaskReport(task, skill, len(result), picked[skill] / len(result),
                             categories.count(skill) / len(categories))
            rep.top = [(r["id"], r.get("category"), float(score), _prompt_preview(r))
                       for r, score in zip(result.records[:3], result.scores[:3])]
            for enc in s.ingest.encodings[1:]:
                c = compare(store, "f16", enc, tasks=[task], k=s.k)
                rep.agreement[enc] = {"overlap": c.overlap, "spearman": c.spearman}
            reports.append(rep)
    for rep in reports:
        echo(format_report(rep))
    echo(f"done in {time.perf_counter() - started:.0f} s; the store is at {store_path}. Try:\n"
         f"  gradstore query --store {store_path} --task demo-bbh --k 5% --table\n"
         f"  gradstore info --store {store_path} --table")
    return reports


def format_report(rep: TaskReport) -> str:
    lines = [f"\n{rep.task}: top {rep.selected} rows; {rep.skill} is {rep.skill_share:.0%} of them"
             f" vs {rep.base_rate:.0%} of the pool ({rep.enrichment:.1f}x)"]
    for rid, category, score, preview in rep.top:
        lines.append(f"  {score:+.4f}  {rid:<10} {category:<22} {preview}")
    for enc, a in rep.agreement.items():
        lines.append(f"  {enc} vs f16: top-{rep.selected} overlap {a['overlap']:.0%},"
                     f" Spearman {a['spearman']:.3f}")
    return "\n".join(lines)


def _prompt_preview(row: dict, width: int = 60) -> str:
    """The first line of the row's user turn, read back (and verified) from its source line."""
    with open(row["source_file"], "rb") as f:
        raw = read_record_line(f, row["source_file"], row["offset"], row["id"], row.get("line_sha1"))
    record = load_line(raw)
    text = next((m["content"] for m in record.get("messages", []) if m.get("role") == "user"), "")
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first if len(first) <= width else first[: width - 3] + "..."

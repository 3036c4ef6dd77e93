"""Ingest: examples -> per-example gradients at each checkpoint -> projection -> gradstore.

One checkpoint at a time; the base model is loaded once and each checkpoint's LoRA weights are
loaded into it (examples are tokenized once, by the caller, for every checkpoint). Projected
gradients come from length-sorted batches, packed or padded, projected module by module
(`GradientComputer.batched(window, projection)`: no full-length gradient is ever formed), over a
window of `WINDOW` rows; the window's vectors are then written in input order, `batch_size` rows
per store transaction:
- resumable: ids a (set, checkpoint) already holds are skipped, so a killed run loses at most
  its open window and a re-run finishes the rest;
- shardable: shard i of n takes the i-th contiguous slice of the examples, so merging the shard
  stores in order gives the unsharded row order;
- the store's projection, model and LoRA config are fixed at creation; a later ingest with
  different ones is refused before anything is written.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

import gradstore
from gradstore.errors import SchemaMismatchError
from gradstore.format import DATA_FILE

from .checkpoint import Checkpoint, read_checkpoints
from .config import IngestConfig, ReadConfig
from .gradients import GradientComputer
from .model import ModelSource, load_adapter, lora_config_dict, reload_adapter
from .optimizer_state import load_optimizer_state
from .projection import make_projection

# Rows whose gradients are computed together: a wider window groups lengths better (fuller
# batches, less padding) and costs only its projected vectors (32 KiB a row at 8192 dims) in memory.
WINDOW = 512


@dataclass
class IngestReport:
    written: int = 0
    already_stored: int = 0
    no_response: int = 0
    seconds: dict = field(default_factory=lambda: {"gradient": 0.0, "projection": 0.0, "write": 0.0})
    padding: float = 0.0  # the share of padded tokens in the gradient batches

    def summary(self) -> str:
        parts = [f"{self.written} rows written", f"{self.already_stored} already stored"]
        if self.no_response:
            parts.append(f"{self.no_response} skipped: no response tokens (their gradient is zero;"
                         " as Adam directions they would all tie)")
        return "; ".join(parts)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n); None -> rank/world size from torchrun or accelerate, else (0, 1)."""
    if text is None:
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK"))
        world = os.environ.get("WORLD_SIZE")
        return (int(rank), int(world)) if rank is not None and world is not None else (0, 1)
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


def shard_slice(items: Sequence, shard: tuple[int, int]) -> Sequence:
    i, n = shard
    size = len(items)
    return items[i * size // n:(i + 1) * size // n]


def open_or_create(store_path, dim: int, projection: dict, model: dict, lora: dict) -> gradstore.Store:
    """The store at `store_path`, created if absent; refuses a different projection/model/LoRA."""
    if not Path(store_path, DATA_FILE).exists():
        return gradstore.create(store_path, dim=dim, projection=projection, model=model, lora=lora)
    store = gradstore.open(store_path, readonly=False)
    try:
        _check_fits(store, dim, projection, model, lora)
    except SchemaMismatchError:
        store.close()
        raise
    return store


def _check_fits(store: gradstore.Store, dim: int, projection: dict, model: dict, lora: dict) -> None:
    for key, want in (("dim", dim), ("projection", projection), ("model", model), ("lora", lora)):
        have = store.meta.get(key)
        if have != want:
            raise SchemaMismatchError(
                f"{store.path}: the store's {key} is {have}, this ingest's is {want}; use another store")


def ingest(store, examples: Sequence, set_name: str, checkpoints: Sequence[Checkpoint],
           source: ModelSource, config: IngestConfig = IngestConfig(), *, kind: str = "train",
           shard: tuple[int, int] = (0, 1), progress: bool = True) -> IngestReport:
    """Write the projected gradients of `examples` at every checkpoint into the store.

    `store` is a path (the store is created there if absent, and closed at the end) or an open
    writable `gradstore.Store` (left open); `source` is the base model the checkpoints' adapters
    were trained on. Train sets (`kind`) get LESS's Adam directions (the checkpoint's optimizer
    state), task sets plain gradients. `shard` (i, n): only the i-th of n contiguous slices of
    `examples`. Returns what was written and skipped.

    Example:
        ingest("gradstore", examples, "train", read_checkpoints(["warmup/epoch-1"]),
               ModelSource("smollm2-135m"), IngestConfig(dim=8192, token_budget=8192))
    """
    from tqdm import tqdm

    if kind not in ("train", "task"):
        raise ValueError(f"kind must be 'train' or 'task', got {kind!r}")
    if not checkpoints:
        raise ValueError("at least one checkpoint is needed")
    examples = shard_slice(list(examples), shard)
    report = IngestReport()
    given = store if isinstance(store, gradstore.Store) else None
    if given is not None and given.readonly:
        raise gradstore.ReadOnlyError(f"{given.path}: ingest needs the store open with readonly=False")
    store_path, store = (None, None) if given is not None else (store, None)
    model = None
    padded = real = 0
    try:
        for ckpt in checkpoints:
            if model is None:
                model = load_adapter(source.load(), ckpt.path)
            else:
                model = reload_adapter(model, ckpt.path)
            state = load_optimizer_state(ckpt.path, model) if kind == "train" else None
            computer = GradientComputer(model, state, mode="adam" if kind == "train" else "sgd",
                                        token_budget=config.token_budget, betas=ckpt.betas, eps=ckpt.eps)
            spec = {"kind": config.projection, "seed": config.seed, "dim": config.dim,
                    "input_dim": computer.dim}
            if store is None:
                identity = (make_projection(spec).spec(), source.identity(), lora_config_dict(model))
                if given is not None:
                    _check_fits(given, config.dim, *identity)
                    store = given
                else:
                    store = open_or_create(store_path, config.dim, *identity)
            project = make_projection(store.meta["projection"])
            if project.input_dim != computer.dim:
                raise SchemaMismatchError(
                    f"{ckpt.path}: {computer.dim} LoRA parameters, the store's projection takes"
                    f" {project.input_dim}")
            store.add_checkpoint(ckpt.name, lr=ckpt.lr, step=ckpt.step, epoch=ckpt.epoch,
                                 optimizer="adamw" if kind == "train" else None, source=ckpt.path)
            done = store.written_ids(set_name, ckpt.name)
            todo = [ex for ex in examples if ex.id not in done]
            report.already_stored += len(examples) - len(todo)
            bar = tqdm(total=len(todo), desc=f"{set_name}@{ckpt.name}", unit="row", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True)
            batches_s = 0.0
            for start in range(0, len(todo), WINDOW):
                window = todo[start:start + WINDOW]
                vectors: dict[int, np.ndarray] = {}
                t0 = time.perf_counter()
                for idx, rows in computer.batched(window, projection=project):
                    for i, row in zip(idx, rows.cpu().numpy()):
                        vectors[i] = row
                    bar.update(len(idx))
                batches_s += time.perf_counter() - t0
                report.no_response += len(window) - len(vectors)
                bar.update(len(window) - len(vectors))
                keep = [i for i in range(len(window)) if i in vectors]
                for b in range(0, len(keep), config.batch_size):
                    rows = keep[b:b + config.batch_size]
                    report.written += _write(store, set_name, ckpt.name, kind, config.encodings,
                                             [window[i] for i in rows], [vectors[i] for i in rows], report)
            bar.close()
            # The projection runs inside the batches (per module), which time it themselves.
            report.seconds["projection"] += computer.seconds["projection"]
            report.seconds["gradient"] += batches_s - computer.seconds["projection"]
            padded, real = padded + computer.tokens["run"], real + computer.tokens["real"]
            del computer, state
    finally:
        if store is not None and given is None:
            store.close()
    report.padding = 1 - real / padded if padded else 0.0
    return report


def _write(store, set_name, ckpt_name, kind, encodings, batch, vectors, report) -> int:
    t0 = time.perf_counter()
    n = store.write(set_name, ckpt_name, np.stack(vectors), [ex.id for ex in batch], kind=kind,
                    encodings=encodings, metadata=[ex.to_row() for ex in batch],
                    subtasks=[ex.subtask for ex in batch] if kind == "task" else None)
    report.seconds["write"] += time.perf_counter() - t0
    return n


def ingest_files(store_path, checkpoint_dirs: Sequence[str], source: ModelSource,
                 config: IngestConfig = IngestConfig(), *, data: Sequence[str] = (), set_name: str = "train",
                 task: str | None = None, data_dir: str | None = None, lrs: Sequence[float] | None = None,
                 read: ReadConfig = ReadConfig(), shard: tuple[int, int] = (0, 1), ray_workers: int = 0,
                 progress: bool = True):
    """Read a training pool (`data`) or a target task (`task`), then `ingest` it.

    A task is a built-in (mmlu, bbh, tydiqa from `data_dir`), a packaged demo task, or any name
    with `data` naming its JSONL file; its set is named after the task. Pools and tasks are read
    with the same `read` settings so their gradients are comparable. `ray_workers` > 0: spread it
    over that many Ray workers, `store_path` a folder of shard stores and their manifest
    (`qless.ray_ingest`). Returns the data read report (None for tasks) and the ingest report.
    """
    from functools import partial

    from .data import read_pool
    from .model import load_tokenizer
    from .tasks import load_task

    if ray_workers:
        from .ray_ingest import ingest_on_ray

        run = partial(ingest_on_ray, workers=ray_workers)
    else:
        run = partial(ingest, shard=shard, progress=progress)
    checkpoints = read_checkpoints(checkpoint_dirs, lrs)
    tokenizer = load_tokenizer(source.name_or_path)
    if task is not None:
        if len(data) > 1:
            raise ValueError(f"task {task!r}: give one --data file, not {len(data)}")
        examples = load_task(task, tokenizer, data_dir=data_dir, path=data[0] if data else None,
                             max_length=read.max_length, chat_format=read.chat_format)
        return None, run(store_path, examples, task, checkpoints, source, config, kind="task")
    if not data:
        raise ValueError("give the training pool's JSONL files (--data) or a --task")
    examples, read_report = read_pool(data, tokenizer, max_length=read.max_length,
                                      skip_invalid=read.skip_invalid, chat_format=read.chat_format)
    return read_report, run(store_path, examples, set_name, checkpoints, source, config)

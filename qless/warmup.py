"""LESS step 1, the warmup: train LoRA adapters and keep one checkpoint per epoch.

The training loop follows what LESS gets from the HF Trainer with its scripts
(`less/scripts/train/base_training_args.sh`): AdamW (torch, betas 0.9/0.999, eps 1e-8),
lr 2e-5, linear decay with `ceil(3% of the steps)` warmup steps (the first step runs at lr 0,
as in the Trainer), weight decay 0, gradient clipping at norm 1.0 (the Trainer's default),
per-device batch 1 with 32 gradient accumulation steps, 4 epochs, seed 0.

Loss: response tokens only (labels -100 elsewhere). Each example's loss is the mean over its
response tokens, and a step's loss is the mean over the examples in the step, so batch 1 with
accumulation 32 is what LESS's Trainer computed; padded micro-batches (`batch_size > 1`) give
the same step up to float rounding.

Steps per epoch: `ceil(n / (batch_size * grad_accum))`, the last step of an epoch taking the
remainder (the Trainer since transformers 4.46). LESS ran an older Trainer whose accumulation ran
on across epoch boundaries and stopped at `epochs * floor(n / 32)` steps (its checkpoints 422,
845, 1268, 1688 for 13,533 examples; ours are 423, 846, 1269, 1692). The per-epoch remainder
keeps each epoch's checkpoint an exact training state, so a run can resume from it.

Checkpoint folder `out_dir/epoch-{i}/` (written as `.epoch-{i}.tmp-*` and renamed when whole, so
a killed warmup never leaves a folder that looks complete; `qless_checkpoint.json` is the last
file written):
    adapter_config.json, adapter_model.safetensors   the PEFT adapter (`model.save_pretrained`)
    optimizer_state.safetensors                      Adam moments keyed by parameter name
    qless_checkpoint.json                            name, epoch, step, lr (the mean lr of the
                                                     epoch's steps, LESS's checkpoint weight),
                                                     optimizer, lora, seed, n_examples, run, ...

Determinism: the data order of epoch e is `numpy.random.default_rng([seed, e]).permutation(n)`
and torch's generator (LoRA dropout) is re-seeded from (seed, e) at the start of each epoch, inside
`torch.random.fork_rng` so the caller's generators are left alone. So a run resumed after epoch
k follows the uninterrupted run exactly. A re-run in a folder that holds a different run (other
examples, hyperparameters, LoRA config or base model) is refused with the differing settings.
Temp folders of an interrupted write are removed when a run starts (one warmup per folder).

Threads: on a busy CPU, torch's default intra-op threads can thrash (measured on a 2-core box
under load: 24 s per SmolLM2-135M example with 2 threads, 2.2 s with `torch.set_num_threads(1)`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qless.checkpoint import (
    ADAM_BETAS,
    ADAM_EPS,
    FORMAT,
    INFO_FILE,
    CheckpointInfoError,
    read_checkpoint_info,
    warn_if_untrained,
)
from qless.config import SCHEDULERS, WARMUP_PERCENTAGE, LoraConfig, ReadConfig, WarmupConfig
from qless.data import IGNORE_INDEX
from qless.model import ModelSource, lora_config_dict
from qless.optimizer_state import (
    load_optimizer_state,
    save_optimizer_state,
    trainable_parameters,
)

log = logging.getLogger(__name__)

_NAME = re.compile(r"^epoch-(\d+)$")
_TMP_PREFIX = ".epoch-"
_TMP_MARK = ".tmp-"


class WarmupError(ValueError):
    "A warmup cannot start or resume: unusable examples or model, or an incompatible folder."


# ---------------------------------------------------------------------------------------------
# schedule


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """The Trainer's warmup length: `ceil(total_steps * warmup_ratio)`."""
    return math.ceil(total_steps * warmup_ratio)


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str = "linear") -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based), as transformers' schedules."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if scheduler == "constant":
        return 1.0
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    if scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise WarmupError(f"scheduler must be one of {SCHEDULERS}, not {scheduler!r}")


# ---------------------------------------------------------------------------------------------
# checkpoint folders


def completed_checkpoints(out_dir: str | os.PathLike) -> list[dict]:
    """The finished `epoch-{i}` checkpoints of a warmup folder, in epoch order (their infos).

    Temp folders of an interrupted write are not listed; an `epoch-{i}` folder without a valid
    `qless_checkpoint.json` raises CheckpointInfoError.
    """
    root = Path(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and child.is_dir():
            info = read_checkpoint_info(child)
            if info["epoch"] != int(m.group(1)) or info["name"] != child.name:
                raise CheckpointInfoError(
                    f"{child / INFO_FILE}: says {info['name']!r} (epoch {info['epoch']}), "
                    f"but the folder is {child.name}"
                )
            found.append(info)
    return sorted(found, key=lambda i: i["epoch"])


# ---------------------------------------------------------------------------------------------
# examples and batches


def _check_examples(examples: Sequence) -> str:
    """Validate the examples; return a sha1 over their tokens and labels (the run's data identity)."""
    if not examples:
        raise WarmupError("no examples to train on")
    h = hashlib.sha1()
    for i, ex in enumerate(examples):
        ids, labels = ex.input_ids, ex.labels
        name = f"example {i} ({getattr(ex, 'id', '?')})"
        if len(ids) == 0 or len(ids) != len(labels):
            raise WarmupError(
                f"{name}: input_ids ({len(ids)}) and labels ({len(labels)}) must be non-empty "
                "and of equal length"
            )
        if all(x == IGNORE_INDEX for x in labels[1:]):
            raise WarmupError(f"{name}: no response tokens to learn (every label after the first is -100)")
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(b"\n")
    return h.hexdigest()


def _collate(batch: Sequence, device: torch.device, pad_id: int = 0):
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.as_tensor(ex.input_ids, dtype=torch.long)
        labels[row, :n] = torch.as_tensor(ex.labels, dtype=torch.long)
        mask[row, :n] = 1
    return ids.to(device), mask.to(device), labels.to(device)


def example_losses(model, batch: Sequence, device: torch.device) -> torch.Tensor:
    """Per-example loss (mean cross-entropy over its response tokens), shape (len(batch),)."""
    ids, mask, labels = _collate(batch, device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(target.shape)
    counts = (target != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts


# ---------------------------------------------------------------------------------------------
# the run


def _derive_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 0x7E57]).generate_state(1, np.uint64)[0] >> 1)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` (1-based) visits the n examples."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _diff(a: dict, b: dict) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: folder has {a.get(k)!r}, this run has {b.get(k)!r}" for k in keys
            if a.get(k) != b.get(k)]


def _sweep_temp(root: Path) -> None:
    for child in root.iterdir():
        if child.name.startswith(_TMP_PREFIX) and _TMP_MARK in child.name and child.is_dir():
            log.info("removing %s (an interrupted checkpoint write)", child)
            shutil.rmtree(child, ignore_errors=True)


def _load_adapter_weights(model, folder: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise WarmupError(f"{file}: not found; cannot resume from {folder}")
    saved = load_file(str(file))
    expected = get_peft_model_state_dict(model)
    if set(saved) != set(expected):
        raise WarmupError(f"{file}: its tensors do not match the model's LoRA parameters")
    for k, t in saved.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise WarmupError(f"{file}: {k} has shape {tuple(t.shape)}, the model's is "
                              f"{tuple(expected[k].shape)}")
    set_peft_model_state_dict(model, saved)


def _load_optimizer(optimizer, model, folder: Path, step: int) -> None:
    state = load_optimizer_state(folder, model)
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for name, p in trainable_parameters(model):
        moments = state[name]
        optimizer.state[p] = {
            "step": torch.tensor(float(step), dtype=scalar),
            "exp_avg": moments["exp_avg"].to(p.device, p.dtype),
            "exp_avg_sq": moments["exp_avg_sq"].to(p.device, p.dtype),
        }


def _write_checkpoint(root: Path, name: str, model, optimizer, info: dict) -> Path:
    """Write `root/name` whole or not at all: a temp folder, the info file last, then a rename."""
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_MARK}", dir=root))
    try:
        model.save_pretrained(str(tmp))
        save_optimizer_state(tmp, model, optimizer)
        data = json.dumps(info, indent=1, sort_keys=True) + "\n"
        with open(tmp / INFO_FILE, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass(frozen=True)
class _Schedule:
    """How many optimizer steps a run takes and where its epochs end."""

    batch_size: int  # examples per forward/backward pass
    per_step: int  # examples per optimizer step (batch_size * grad_accum)
    total_steps: int
    n_epochs: int
    n_warmup: int
    last_epoch: int  # the last epoch this call trains (stop_after_epoch)

    @classmethod
    def of(cls, n: int, config: WarmupConfig, stop_after_epoch: int | None) -> "_Schedule":
        per_step = config.batch_size * config.grad_accum
        steps_per_epoch = math.ceil(n / per_step)
        if config.max_steps is not None:
            total, n_epochs = config.max_steps, math.ceil(config.max_steps / steps_per_epoch)
        else:
            total, n_epochs = config.epochs * steps_per_epoch, config.epochs
        last = n_epochs if stop_after_epoch is None else min(n_epochs, stop_after_epoch)
        return cls(config.batch_size, per_step, total, n_epochs,
                   warmup_steps_for(total, config.warmup_ratio), last)


def _finished_epochs(root: Path, run: dict) -> list[dict]:
    """The folder's finished checkpoints, refused unless they are epochs 1..k of this `run`."""
    root.mkdir(parents=True, exist_ok=True)
    _sweep_temp(root)
    try:
        done = completed_checkpoints(root)
    except CheckpointInfoError as e:
        raise WarmupError(f"{root}: holds a checkpoint folder that is not a finished qless "
                          f"warmup checkpoint: {e}") from None
    wanted = json.loads(json.dumps(run))
    for i, info in enumerate(done, 1):
        if info["epoch"] != i:
            raise WarmupError(f"{root}: epoch-{i} is missing but {info['name']} exists")
        stored = info.get("run")
        if stored != wanted:
            diffs = _diff(stored, wanted) if isinstance(stored, dict) else ["no run settings recorded"]
            raise WarmupError(
                f"{root}: holds a different training run ({info['name']}); use another folder. "
                + "; ".join(diffs)
            )
    return done


def _train_epoch(model, examples: list, order: np.ndarray, optimizer, params, sched: _Schedule,
                 config: WarmupConfig, step: int, device, on_step) -> tuple[int, list[float], list[float]]:
    """One epoch's optimizer steps in `order` (stopping at the schedule's end):
    (the step reached, each step's lr, each step's loss)."""
    lrs: list[float] = []
    losses: list[float] = []
    for start in range(0, len(examples), sched.per_step):
        if step >= sched.total_steps:
            break
        chunk = [examples[j] for j in order[start:start + sched.per_step]]
        lr_now = config.lr * lr_factor(step, sched.total_steps, sched.n_warmup, config.scheduler)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for b in range(0, len(chunk), sched.batch_size):
            loss = example_losses(model, chunk[b:b + sched.batch_size], device).sum() / len(chunk)
            loss.backward()
            step_loss += float(loss.detach())
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm)
        optimizer.step()
        step += 1
        lrs.append(lr_now)
        losses.append(step_loss)
        on_step(step_loss, lr_now)
    return step, lrs, losses


def warmup(
    model,
    examples: Iterable,
    out_dir: str | os.PathLike,
    config: WarmupConfig = WarmupConfig(),
    *,
    source: ModelSource | None = None,
    stop_after_epoch: int | None = None,
    progress: bool = True,
    desc: str = "warmup",
) -> list[dict]:
    """Train the LoRA adapters of `model` (a peft model from `attach_lora`) on `examples`.

    Writes `out_dir/epoch-{i}/` after each epoch and returns every finished checkpoint's info
    (see `read_checkpoint_info`), in epoch order. A re-run in the same folder resumes after the
    last finished epoch (adapter, Adam state and schedule position), or returns at once when the
    run is complete; either way `model` ends holding the last checkpoint's adapter, in eval mode.
    Each checkpoint records `config` with what the run derived from it; a re-run with another
    config, other examples, another LoRA or (`source`) another base model is refused.

    `config.max_steps` ends the run where training stops, possibly mid-epoch.
    `stop_after_epoch` stops after that epoch of the same schedule (a run in pieces); a later
    call without it carries on. `desc` labels the progress bar (`qless.train` runs this loop as
    LESS's step 4). `source` (a `qless.model.ModelSource`) is what the base model was loaded from.

    Example:
        source = ModelSource("smollm2-135m")
        model = attach_lora(source.load())
        infos = warmup(model, sample_fraction(examples, 0.05), "out/warmup", WarmupConfig(epochs=2),
                       source=source)
        [(i["name"], i["step"], i["lr"]) for i in infos]
    """
    from tqdm.auto import tqdm

    examples = list(examples)
    params = trainable_parameters(model)
    if not params or not hasattr(model, "peft_config"):
        raise WarmupError("the model has no trainable LoRA parameters (attach_lora first)")
    n = len(examples)
    sched = _Schedule.of(n, config, stop_after_epoch)
    run = {  # the config as given, and what it means for these examples, model and optimizer
        **asdict(config), "total_steps": sched.total_steps, "warmup_steps": sched.n_warmup,
        "betas": list(ADAM_BETAS), "eps": ADAM_EPS, "n_examples": n,
        "examples_sha1": _check_examples(examples), "lora": lora_config_dict(model),
        "model": source.record() if source is not None else None,
    }
    root = Path(out_dir)
    done = _finished_epochs(root, run)

    device = _model_device(model)
    optimizer = torch.optim.AdamW(
        [p for _, p in params], lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
        weight_decay=config.weight_decay
    )
    step = 0
    if done:
        last = done[-1]
        folder = Path(last["path"])
        _load_adapter_weights(model, folder)
        step = last["step"]
        if step < sched.total_steps and last["epoch"] < sched.last_epoch:
            _load_optimizer(optimizer, model, folder, step)
            log.info("resuming %s after %s (step %d of %d)", root, last["name"], step,
                     sched.total_steps)
    infos = [dict(i) for i in done]
    start_epoch = len(done) + 1
    if start_epoch > sched.last_epoch or step >= sched.total_steps:
        model.eval()
        return infos

    bar = tqdm(total=sched.total_steps, initial=step, desc=desc, unit="step", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    rng_devices = [device] if device.type == "cuda" else []
    lr_peak = 0.0
    try:
        with torch.random.fork_rng(devices=rng_devices):
            model.train()
            for epoch in range(start_epoch, sched.last_epoch + 1):
                torch.manual_seed(_derive_seed(config.seed, epoch))

                def on_step(loss: float, lr_now: float, epoch=epoch) -> None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr_now:.3g}", refresh=False)

                step, lrs, losses = _train_epoch(model, examples, epoch_order(n, config.seed, epoch),
                                                 optimizer, params, sched, config, step, device, on_step)
                lr_peak = max([lr_peak, *lrs])
                info = _epoch_info(epoch, step, lrs, losses, run)
                folder = _write_checkpoint(root, info["name"], model, optimizer, info)
                info["path"] = str(folder)
                infos.append(info)
                log.info("%s: step %d, mean lr %.4g, loss %.4f", folder, step, info["lr"],
                         info["train_loss"])
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    # Too few steps leave PEFT's zero B (a one-step run takes the schedule's first lr, 0): say so
    # now, not after an ingest whose lora_A gradients all come out zero.
    warn_if_untrained(infos[-1]["path"], f" after {step} optimizer step{'s' * (step != 1)} of "
                      f"{sched.per_step} examples"
                      + (" (each at lr 0: a schedule's first step is)" if lr_peak == 0 else ""))
    return infos


def _epoch_info(epoch: int, step: int, lrs: list[float], losses: list[float], run: dict) -> dict:
    """The checkpoint record of an epoch (qless.checkpoint's contract); `run` is the warmup's
    record, whose LoRA config, seed, example count and step count the checkpoint repeats."""
    return {
        "format": FORMAT,
        "name": f"epoch-{epoch}",
        "epoch": epoch,
        "step": step,
        "lr": float(np.mean(lrs)),
        "lr_first": lrs[0],
        "lr_last": lrs[-1],
        "steps_in_epoch": len(lrs),
        "train_loss": float(np.mean(losses)),
        "optimizer": "adamw",
        "lora": run["lora"],
        "seed": run["seed"],
        "n_examples": run["n_examples"],
        "total_steps": run["total_steps"],
        "run": run,
    }


def warmup_files(data: Sequence[str], out_dir: str | os.PathLike, source: ModelSource = ModelSource(),
                 config: WarmupConfig = WarmupConfig(), *, lora: LoraConfig = LoraConfig(),
                 read: ReadConfig = ReadConfig(), percentage: float = WARMUP_PERCENTAGE, progress: bool = True,
                 desc: str = "warmup"):
    """LESS step 1 from files: read the pool, sample `percentage` of it, attach LoRA, train.

    `config.seed` also draws the sample and initializes the adapters. Returns the data read
    report and the finished checkpoints' infos.

    Example:
        report, infos = warmup_files(["pool.jsonl"], "out/warmup", ModelSource("smollm2-135m"),
                                     WarmupConfig(epochs=2), lora=LoraConfig(r=8, alpha=32))
    """
    from .data import read_pool, sample_fraction
    from .model import attach_lora, load_tokenizer

    tokenizer = load_tokenizer(source.name_or_path)
    examples, report = read_pool(data, tokenizer, max_length=read.max_length,
                                 skip_invalid=read.skip_invalid, chat_format=read.chat_format)
    model = attach_lora(source.load(), r=lora.r, alpha=lora.alpha, dropout=lora.dropout, seed=config.seed)
    return report, warmup(model, sample_fraction(examples, percentage, config.seed), out_dir, config,
                          source=source, progress=progress, desc=desc)

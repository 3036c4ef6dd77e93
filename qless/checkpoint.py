"""The warmup -> ingest handoff: what a LoRA checkpoint folder holds and which lr weights it.

A checkpoint folder holds the PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`),
the Adam moments (`qless.optimizer_state`) and one of:
- `qless_checkpoint.json` (INFO_FILE), written last by `qless.warmup`: name, epoch, step, lr
  (the mean lr of the epoch's optimizer steps, LESS's checkpoint weight), optimizer, and the
  run (its `qless.config.WarmupConfig`, what that gives for these examples, LoRA and model);
- `trainer_state.json`, a Hugging Face Trainer's (LESS's own checkpoints): the lr is the mean of
  the learning rates it logged in the checkpoint's epoch;
- neither: the caller gives the lr.

A checkpoint whose LoRA B matrices are all zero never moved from PEFT's initialization, and
every lora_A gradient through it is exactly zero: half of each gradient vector carries nothing.
`untrained` says so; warmup and ingest warn on such a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

INFO_FILE = "qless_checkpoint.json"
FORMAT = "qless-warmup-checkpoint-v1"
TRAINER_STATE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
# AdamW's settings in warmup, recorded in INFO_FILE's run; ingest's Adam directions use a
# checkpoint's recorded ones, these for another trainer's checkpoint (LESS's are the same).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class CheckpointInfoError(ValueError):
    "A checkpoint folder's qless_checkpoint.json or trainer_state.json is invalid."


class CheckpointInfoMissing(CheckpointInfoError, FileNotFoundError):
    "A checkpoint folder has no qless_checkpoint.json."


@dataclass(frozen=True)
class Checkpoint:
    """A LoRA checkpoint folder, the learning rate that weights it, and its Adam settings."""

    name: str
    path: str
    lr: float
    step: int | None = None
    epoch: int | None = None
    betas: tuple[float, float] = ADAM_BETAS
    eps: float = ADAM_EPS

    @classmethod
    def from_info(cls, info: dict, path: str) -> Checkpoint:
        """The checkpoint an INFO_FILE record (`read_checkpoint_info`, or warmup's) describes."""
        run = info.get("run", {})
        return cls(info["name"], path, float(info["lr"]), info["step"], info["epoch"],
                   tuple(run.get("betas", ADAM_BETAS)), float(run.get("eps", ADAM_EPS)))


def read_checkpoint_info(directory: str | os.PathLike) -> dict:
    """The `qless_checkpoint.json` of a checkpoint folder, checked, plus `path` (the folder).

    Holds at least name, epoch, step, lr (the epoch's mean lr: the checkpoint's weight) and
    optimizer. Raises CheckpointInfoMissing / CheckpointInfoError naming the file.
    """
    folder = Path(directory)
    file = folder / INFO_FILE
    if not file.is_file():
        raise CheckpointInfoMissing(
            f"{file}: not found ({folder} is not a finished qless warmup checkpoint; "
            "for another trainer's checkpoint give its lr and step explicitly)"
        )
    info = _read_json(file)
    checks = {
        "name": lambda v: isinstance(v, str) and bool(v),
        "epoch": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "lr": _is_lr,
        "optimizer": lambda v: isinstance(v, str) and bool(v),
    }
    for key, ok in checks.items():
        if key not in info:
            raise CheckpointInfoError(f"{file}: missing {key!r}")
        if not ok(info[key]):
            raise CheckpointInfoError(f"{file}: invalid {key!r}: {info[key]!r}")
    info["path"] = str(folder)
    return info


def trainer_state_checkpoint(directory: str | os.PathLike) -> Checkpoint:
    """A Hugging Face Trainer checkpoint: its lr is the mean lr logged in the checkpoint's epoch.

    The epoch is the one the checkpoint's `epoch` falls in (LESS's old Trainer saved at
    fractional epochs such as 0.998), and a log entry belongs to it when its own `epoch` does.
    """
    folder = Path(directory)
    file = folder / TRAINER_STATE
    state = _read_json(file)
    step, at = state.get("global_step"), state.get("epoch")
    if not (isinstance(step, int) and step >= 0 and isinstance(at, (int, float)) and at > 0):
        raise CheckpointInfoError(f"{file}: needs a global_step and a positive epoch")
    epoch = _epoch_of(at)
    history = state.get("log_history")
    if not isinstance(history, list):
        raise CheckpointInfoError(f"{file}: no log_history")
    lrs = [e["learning_rate"] for e in history
           if isinstance(e, dict) and _is_lr(e.get("learning_rate"))
           and isinstance(e.get("epoch"), (int, float)) and _epoch_of(e["epoch"]) == epoch
           and isinstance(e.get("step"), int) and e["step"] <= step]
    if not lrs:
        raise CheckpointInfoError(f"{file}: logs no learning_rate in epoch {epoch}; give the lr explicitly")
    lr = math.fsum(lrs) / len(lrs)
    log.warning("%s: lr %.4g, the mean of the %d learning rates %s logged in epoch %d",
                folder, lr, len(lrs), TRAINER_STATE, epoch)
    return Checkpoint(folder.name, str(folder.resolve()), lr, step, epoch)


def read_checkpoints(paths: Sequence[str], lrs: Sequence[float] | None = None) -> list[Checkpoint]:
    """Checkpoints with their lr: `lrs` when given, else the folder's INFO_FILE or TRAINER_STATE.

    Warns (logging) on a checkpoint whose adapter never moved (`untrained`).
    """
    if lrs is not None and len(lrs) != len(paths):
        raise ValueError(f"{len(lrs)} learning rates for {len(paths)} checkpoints")
    out = []
    for i, path in enumerate(paths):
        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{path}: no such checkpoint folder")
        if lrs is not None:
            out.append(Checkpoint(p.name, str(p.resolve()), float(lrs[i])))
        elif (p / INFO_FILE).is_file():
            out.append(Checkpoint.from_info(read_checkpoint_info(p), str(p.resolve())))
        elif (p / TRAINER_STATE).is_file():
            out.append(trainer_state_checkpoint(p))
        else:
            raise ValueError(f"{path}: no {INFO_FILE} or {TRAINER_STATE}; give the checkpoints'"
                             " learning rates (--lr)")
        warn_if_untrained(p)
    return out


def untrained(directory: str | os.PathLike) -> bool:
    """Whether every LoRA B matrix of the folder's adapter is zero (PEFT's initialization)."""
    from safetensors import safe_open

    file = Path(directory) / ADAPTER_FILE
    if not file.is_file():
        return False  # no adapter file to judge by; loading it will say what is wrong
    with safe_open(str(file), framework="pt") as f:
        names = [k for k in f.keys() if "lora_B" in k]  # noqa: SIM118 (safe_open is no dict)
        return bool(names) and not any(f.get_tensor(k).any() for k in names)


def warn_if_untrained(directory: str | os.PathLike, why: str = "") -> bool:
    """Log a warning when `untrained(directory)`; returns whether it did."""
    if not untrained(directory):
        return False
    log.warning("%s: LoRA B is still all zero%s, so every lora_A gradient is exactly zero and half"
                " of each gradient vector carries nothing; warm up for more optimizer steps",
                directory, why)
    return True


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointInfoError(f"{file}: cannot read: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise CheckpointInfoError(f"{file}: not a JSON object")
    return data


def _is_lr(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _epoch_of(at: float) -> int:
    # Epoch k covers (k-1, k]; the tolerance absorbs the Trainer's rounding of a finished epoch.
    return max(1, math.ceil(at - 1e-6))

"""LESS step 4: fine-tune LoRA adapters on a selection, with the warmup's own training loop.

LESS trains the final model with the same script and settings as the warmup
(`less/scripts/train/base_training_args.sh`: LoRA r=128, alpha=512, dropout 0.1 on q/k/v/o;
AdamW, lr 2e-5, linear decay after 3% warmup; batch 1 x 32 accumulation; 4 epochs; seed 0), on
every selected example instead of a 5% sample. So training here is `qless.warmup.warmup` on the
whole file: the same `epoch-{i}` checkpoint folders (adapter + Adam state, written atomically),
the same resume after the last finished epoch, the same refusal of a folder that holds another
run. The trained adapter is the last epoch's folder (`final_adapter`), which `qless.evaluate`
loads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from qless.checkpoint import CheckpointInfoError
from qless.config import LoraConfig, ReadConfig, WarmupConfig
from qless.model import ModelSource


def train_files(data: Sequence[str], out_dir: str | os.PathLike, source: ModelSource = ModelSource(),
                config: WarmupConfig = WarmupConfig(), *, lora: LoraConfig = LoraConfig(),
                read: ReadConfig = ReadConfig(), progress: bool = True):
    """Fine-tune on every example of `data` (JSONL pools); returns (read report, checkpoint infos).

    The settings are the warmup's (`qless.warmup.warmup_files`), LESS's for both steps.
    """
    from qless.warmup import warmup_files

    return warmup_files(data, out_dir, source, config, lora=lora, read=read, percentage=1.0,
                        progress=progress, desc="train")


def final_adapter(path: str | os.PathLike) -> Path:
    """The adapter folder a run stands for: `path` itself when it holds an adapter, else its last
    finished `epoch-{i}` checkpoint. Raises FileNotFoundError when there is none."""
    from qless.warmup import completed_checkpoints

    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter folder")
    try:
        done = completed_checkpoints(folder)
    except CheckpointInfoError as e:
        raise FileNotFoundError(f"{folder}: holds an unfinished checkpoint folder: {e}") from None
    if not done:
        raise FileNotFoundError(f"{folder}: no adapter_config.json and no finished epoch-N checkpoint"
                                " (train first, or give a LoRA adapter folder)")
    return Path(done[-1]["path"])

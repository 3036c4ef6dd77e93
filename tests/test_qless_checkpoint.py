"""The warmup -> ingest checkpoint contract: where a checkpoint's lr comes from, untrained adapters."""

import json
import logging

import pytest
from test_qless_warmup import QUICK, make_examples, tiny_lora

from qless.checkpoint import ADAM_BETAS, ADAM_EPS, INFO_FILE, Checkpoint, CheckpointInfoError, read_checkpoints
from qless.config import WarmupConfig
from qless.warmup import warmup


def less_trainer_state(folder, step=845, n=13533, per_step=32):
    """A Trainer checkpoint as LESS's: logging every step, epochs ending at fractional values."""
    folder.mkdir()
    history = [{"epoch": round(s * per_step / n, 4), "learning_rate": 2e-5 * (1 - s / 1688),
                "loss": 1.0, "step": s} for s in range(1, step + 1)]
    history.append({"epoch": round(step * per_step / n, 4), "step": step, "train_runtime": 9.0})
    state = {"epoch": step * per_step / n, "global_step": step, "max_steps": 1688, "num_train_epochs": 4,
             "log_history": history}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return folder


def test_a_trainer_checkpoint_takes_the_mean_lr_logged_in_its_epoch(tmp_path, caplog):
    folder = less_trainer_state(tmp_path / "checkpoint-845")
    with caplog.at_level(logging.WARNING, "qless.checkpoint"):
        (ckpt,) = read_checkpoints([str(folder)])
    # epoch 2 of LESS's run: steps 423..845 (step 422 ends epoch 1 at 0.9979)
    want = sum(2e-5 * (1 - s / 1688) for s in range(423, 846)) / 423
    assert ckpt == Checkpoint("checkpoint-845", str(folder.resolve()), pytest.approx(want, rel=1e-12), 845, 2)
    assert caplog.messages == [(f"{folder}: lr {want:.4g}, the mean of the 423 learning rates"
                               " trainer_state.json logged in epoch 2")]
    assert read_checkpoints([str(folder)], lrs=[1e-5])[0].lr == 1e-5  # an explicit lr wins


def test_a_checkpoints_adam_settings_come_from_its_record(tmp_path):
    folder = tmp_path / "epoch-1"
    folder.mkdir()
    info = {"format": "qless-warmup-checkpoint-v1", "name": "epoch-1", "epoch": 1, "step": 3, "lr": 1e-5,
            "optimizer": "adamw", "run": {"betas": [0.8, 0.99], "eps": 1e-6}}
    (folder / INFO_FILE).write_text(json.dumps(info))
    (ckpt,) = read_checkpoints([str(folder)])
    assert (ckpt.betas, ckpt.eps) == ((0.8, 0.99), 1e-6)
    del info["run"]  # a record without them: warmup's defaults, which are LESS's
    (folder / INFO_FILE).write_text(json.dumps(info))
    assert read_checkpoints([str(folder)])[0].betas == ADAM_BETAS == (0.9, 0.999)
    assert read_checkpoints([str(folder)])[0].eps == ADAM_EPS == 1e-8


def test_a_trainer_checkpoint_without_logged_lrs_is_refused(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps(
        {"epoch": 1.0, "global_step": 3, "log_history": [{"epoch": 1.0, "step": 3, "loss": 1.0}]}))
    with pytest.raises(CheckpointInfoError) as e:
        read_checkpoints([str(folder)])
    assert str(e.value) == (f"{folder / 'trainer_state.json'}: logs no learning_rate in epoch 1;"
                            " give the lr explicitly")
    with pytest.raises(ValueError) as e:
        read_checkpoints([str(tmp_path)])
    assert str(e.value) == (f"{tmp_path}: no qless_checkpoint.json or trainer_state.json; give the"
                            " checkpoints' learning rates (--lr)")


def test_a_one_step_warmup_says_lora_b_never_moved_and_ingest_warns_again(tmp_path, caplog):
    # 4 examples at 32 per step: one optimizer step, at the schedule's first lr, 0
    with caplog.at_level(logging.WARNING, "qless.checkpoint"):
        (info,) = warmup(tiny_lora(), make_examples(4), tmp_path,
                         WarmupConfig(epochs=1, grad_accum=32), **QUICK)
        (ckpt,) = read_checkpoints([info["path"]])
    assert info["lr"] == 0.0 and ckpt.lr == 0.0
    said = (f"{tmp_path / 'epoch-1'}: LoRA B is still all zero{{}}, so every lora_A gradient is exactly"
            " zero and half of each gradient vector carries nothing; warm up for more optimizer steps")
    assert caplog.messages == [said.format(" after 1 optimizer step of 32 examples (each at lr 0:"
                                           " a schedule's first step is)"),
                               said.format("")]


def test_a_warmup_that_moved_says_nothing(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, "qless.checkpoint"):
        (info,) = warmup(tiny_lora(), make_examples(4), tmp_path,
                         WarmupConfig(epochs=1, grad_accum=2), **QUICK)
        read_checkpoints([info["path"]])
    assert info["lr"] > 0 and caplog.messages == []

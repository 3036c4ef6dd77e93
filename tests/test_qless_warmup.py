"""qless.warmup on a tiny random LLaMA (built in memory) and token-list examples."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace

import numpy as np
import pytest
import torch

from qless.checkpoint import (
    INFO_FILE,
    CheckpointInfoError,
    CheckpointInfoMissing,
    read_checkpoint_info,
)
from qless.config import WarmupConfig
from qless.model import ModelSource, attach_lora, load_adapter
from qless.optimizer_state import load_optimizer_state
from qless.warmup import WarmupError, completed_checkpoints, example_losses, warmup

VOCAB = 64
RESPONSE = [5, 6, 7, 8, 9]


@dataclass(frozen=True)
class Ex:
    id: str
    input_ids: list[int]
    labels: list[int]


def tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def tiny_lora(dropout=0.0):
    return attach_lora(tiny_base(), r=4, alpha=8, dropout=dropout, seed=0)


def make_examples(n, seed=0):
    """Prompts of varied length; every response is the same learnable token run."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = [1] + rng.integers(10, VOCAB, size=int(rng.integers(2, 7))).tolist()
        ids = prompt + RESPONSE
        labels = [-100] * len(prompt) + RESPONSE
        out.append(Ex(f"ex{i}", ids, labels))
    return out


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, t in a.items():
        assert torch.equal(t, b[k]), k


def mean_loss(model, examples):
    model.eval()
    with torch.no_grad():
        return float(example_losses(model, examples, torch.device("cpu")).mean())


QUICK = {"progress": False}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one intra-op thread is fastest, and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_loss_decreases(tmp_path):
    model = tiny_lora()
    examples = make_examples(8)
    before = mean_loss(model, examples)
    infos = warmup(model, examples, tmp_path,
                   WarmupConfig(epochs=4, lr=5e-2, batch_size=2, grad_accum=1), **QUICK)
    after = mean_loss(model, examples)
    assert [i["name"] for i in infos] == ["epoch-1", "epoch-2", "epoch-3", "epoch-4"]
    assert after < 0.5 * before
    assert infos[-1]["train_loss"] < infos[0]["train_loss"]
    assert not model.training


def test_lr_is_mean_of_schedule_per_epoch(tmp_path):
    from transformers import get_linear_schedule_with_warmup

    # 10 examples, 4 per step: 3 steps an epoch (the last takes 2), 9 in all, 2 warmup steps.
    infos = warmup(tiny_lora(), make_examples(10), tmp_path,
                   WarmupConfig(epochs=3, lr=1e-3, warmup_ratio=0.2, batch_size=2, grad_accum=2),
                   **QUICK)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=9)
    lrs = []
    for _ in range(9):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0  # the Trainer's first step runs at lr 0
    for e, info in enumerate(infos):
        assert info["step"] == 3 * (e + 1)
        assert info["steps_in_epoch"] == 3
        assert info["lr"] == pytest.approx(np.mean(lrs[3 * e:3 * e + 3]), rel=1e-12, abs=0)
        disk = read_checkpoint_info(tmp_path / info["name"])
        assert disk["lr"] == info["lr"] and disk["step"] == info["step"]
        assert disk["optimizer"] == "adamw" and disk["n_examples"] == 10 and disk["seed"] == 0
        assert disk["lora"]["r"] == 4 and disk["lora"]["alpha"] == 8
        assert disk["path"] == str(tmp_path / info["name"])


def test_adapter_loads_into_fresh_model(tmp_path):
    model = tiny_lora()
    examples = make_examples(6)
    warmup(model, examples, tmp_path, WarmupConfig(epochs=2, lr=5e-3, grad_accum=2), **QUICK)
    x = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        trained = model(input_ids=x).logits
        fresh = load_adapter(tiny_base(), tmp_path / "epoch-2")
        fresh.eval()
        loaded = fresh(input_ids=x).logits
        first = load_adapter(tiny_base(), tmp_path / "epoch-1")
        first.eval()
        earlier = first(input_ids=x).logits
    assert torch.equal(trained, loaded)
    assert not torch.allclose(trained, earlier)
    assert (tmp_path / "epoch-2" / "adapter_config.json").is_file()


def test_optimizer_state_is_the_first_adam_step(tmp_path):
    """One step of 2 examples: m = 0.1 g, v = 0.001 g^2 with g the clipped mean-of-examples grad."""
    examples = make_examples(2)
    model = tiny_lora()
    infos = warmup(model, examples, tmp_path, WarmupConfig(epochs=1, grad_accum=2), **QUICK)
    assert infos[0]["step"] == 1
    state = load_optimizer_state(tmp_path / "epoch-1", model)

    ref = tiny_lora()
    ref.train()
    params = [(n, p) for n, p in ref.named_parameters() if p.requires_grad]
    for ex in examples:  # independent loss: the model's own (token mean for one example)
        out = ref(input_ids=torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels]))
        (out.loss / 2).backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for _, p in params))
    scale = min(1.0, 1.0 / (float(norm) + 1e-6))
    assert [n for n, _ in params] == list(state)
    for name, p in params:
        g = p.grad * scale
        torch.testing.assert_close(state[name]["exp_avg"], 0.1 * g, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(state[name]["exp_avg_sq"], 0.001 * g * g, rtol=1e-4, atol=1e-12)


def test_batches_equal_accumulation(tmp_path):
    examples = make_examples(6)
    a, b = tiny_lora(), tiny_lora()
    warmup(a, examples, tmp_path / "a", WarmupConfig(epochs=2, lr=5e-3, batch_size=2, grad_accum=1),
           **QUICK)
    warmup(b, examples, tmp_path / "b", WarmupConfig(epochs=2, lr=5e-3, batch_size=1, grad_accum=2),
           **QUICK)
    ta, tb = adapter_tensors(tmp_path / "a" / "epoch-2"), adapter_tensors(tmp_path / "b" / "epoch-2")
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-6)


def _uninterrupted(path, examples):
    warmup(tiny_lora(dropout=0.1), examples, path, WarmupConfig(epochs=3, lr=5e-3, grad_accum=2),
           **QUICK)
    return adapter_tensors(path / "epoch-3"), load_optimizer_state(path / "epoch-3", tiny_lora())


def test_resume_after_stop_equals_uninterrupted(tmp_path):
    examples = make_examples(6)
    ref_adapter, ref_state = _uninterrupted(tmp_path / "ref", examples)

    out = tmp_path / "run"
    first = warmup(tiny_lora(dropout=0.1), examples, out,
                   WarmupConfig(epochs=3, lr=5e-3, grad_accum=2), stop_after_epoch=2, **QUICK)
    assert [i["epoch"] for i in first] == [1, 2] and not (out / "epoch-3").exists()
    model = tiny_lora(dropout=0.1)
    infos = warmup(model, examples, out, WarmupConfig(epochs=3, lr=5e-3, grad_accum=2), **QUICK)
    assert [i["epoch"] for i in infos] == [1, 2, 3]
    assert_same_tensors(adapter_tensors(out / "epoch-3"), ref_adapter)
    state = load_optimizer_state(out / "epoch-3", model)
    for name in ref_state:
        assert_same_tensors(state[name], ref_state[name])
    ref_infos = completed_checkpoints(tmp_path / "ref")
    assert [i["lr"] for i in infos] == [i["lr"] for i in ref_infos]

    # A finished run: a re-run trains nothing and leaves the last adapter in the model.
    again = tiny_lora(dropout=0.1)
    infos2 = warmup(again, examples, out, WarmupConfig(epochs=3, lr=5e-3, grad_accum=2), **QUICK)
    assert [i["step"] for i in infos2] == [i["step"] for i in infos]
    from peft import get_peft_model_state_dict

    assert_same_tensors({k: v.clone() for k, v in get_peft_model_state_dict(again).items()},
                        ref_adapter)


def test_kill_during_checkpoint_write_then_resume(tmp_path, monkeypatch):
    import qless.warmup as W

    examples = make_examples(6)
    ref_adapter, _ = _uninterrupted(tmp_path / "ref", examples)
    out = tmp_path / "run"
    real = W.save_optimizer_state
    calls = []

    def dies_on_third(directory, model, optimizer):
        calls.append(directory)
        if len(calls) == 3:  # the adapter of epoch 3 is already in the temp folder
            raise KeyboardInterrupt
        return real(directory, model, optimizer)

    monkeypatch.setattr(W, "save_optimizer_state", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        warmup(tiny_lora(dropout=0.1), examples, out, WarmupConfig(epochs=3, lr=5e-3, grad_accum=2),
               **QUICK)
    monkeypatch.setattr(W, "save_optimizer_state", real)
    assert sorted(p.name for p in out.iterdir()) == ["epoch-1", "epoch-2"]

    # What a SIGKILL leaves: a half-written temp folder (no info file). It must be ignored.
    half = out / ".epoch-3.tmp-killed"
    shutil.copytree(out / "epoch-2", half)
    (half / INFO_FILE).unlink()
    assert [i["epoch"] for i in completed_checkpoints(out)] == [1, 2]

    infos = warmup(tiny_lora(dropout=0.1), examples, out,
                   WarmupConfig(epochs=3, lr=5e-3, grad_accum=2), **QUICK)
    assert [i["epoch"] for i in infos] == [1, 2, 3]
    assert not half.exists()
    assert_same_tensors(adapter_tensors(out / "epoch-3"), ref_adapter)


def test_incompatible_folder_is_refused(tmp_path):
    examples = make_examples(4)
    warmup(tiny_lora(), examples, tmp_path, WarmupConfig(epochs=2, lr=1e-3, grad_accum=2),
           stop_after_epoch=1, **QUICK)
    with pytest.raises(WarmupError, match=r"different training run.*lr: folder has 0.001"):
        warmup(tiny_lora(), examples, tmp_path, WarmupConfig(epochs=2, lr=2e-3, grad_accum=2),
               **QUICK)
    with pytest.raises(WarmupError, match="examples_sha1"):
        warmup(tiny_lora(), make_examples(4, seed=1), tmp_path,
               WarmupConfig(epochs=2, lr=1e-3, grad_accum=2), **QUICK)
    with pytest.raises(WarmupError, match="epochs"):
        warmup(tiny_lora(), examples, tmp_path, WarmupConfig(epochs=3, lr=1e-3, grad_accum=2),
               **QUICK)
    other = attach_lora(tiny_base(), r=2, alpha=8, dropout=0.0, seed=0)
    with pytest.raises(WarmupError, match="lora"):
        warmup(other, examples, tmp_path, WarmupConfig(epochs=2, lr=1e-3, grad_accum=2), **QUICK)
    assert [i["epoch"] for i in completed_checkpoints(tmp_path)] == [1]


def test_the_run_records_its_config_and_a_resume_compares_it(tmp_path):
    examples = make_examples(4)
    config = WarmupConfig(epochs=2, lr=1e-3, grad_accum=2, max_grad_norm=0)  # 0: no clipping
    (info,) = warmup(tiny_lora(), examples, tmp_path, config, stop_after_epoch=1, **QUICK)
    recorded = read_checkpoint_info(tmp_path / "epoch-1")["run"]
    assert recorded == info["run"] and {k: recorded[k] for k in asdict(config)} == asdict(config)
    assert recorded["max_grad_norm"] is None  # the config's one spelling of "no clipping"
    assert (recorded["total_steps"], recorded["warmup_steps"]) == (4, 1)
    for change, said in (({"weight_decay": 0.1}, "weight_decay: folder has 0.0, this run has 0.1"),
                         ({"max_grad_norm": 1.0}, "max_grad_norm: folder has None, this run has 1.0"),
                         ({"seed": 1}, "seed: folder has 0, this run has 1")):
        with pytest.raises(WarmupError, match=f"different training run.*{said}"):
            warmup(tiny_lora(), examples, tmp_path, replace(config, **change), **QUICK)
    done = warmup(tiny_lora(), examples, tmp_path, replace(config, max_grad_norm=None), **QUICK)
    assert [i["epoch"] for i in done] == [1, 2]


def test_the_run_records_its_base_model_and_refuses_another(tmp_path):
    examples = make_examples(4)
    source = ModelSource("tiny-a", "fp32")
    infos = warmup(tiny_lora(), examples, tmp_path, WarmupConfig(epochs=2, lr=1e-3, grad_accum=2),
                   stop_after_epoch=1, source=source, **QUICK)
    assert infos[0]["run"]["model"] == {"name_or_path": "tiny-a", "dtype": "fp32", "quant": None}
    for other in (ModelSource("tiny-b", "fp32"), ModelSource("tiny-a", "bf16"), None):
        with pytest.raises(WarmupError, match="different training run.*model"):
            warmup(tiny_lora(), examples, tmp_path, WarmupConfig(epochs=2, lr=1e-3, grad_accum=2),
                   source=other, **QUICK)
    done = warmup(tiny_lora(), examples, tmp_path, WarmupConfig(epochs=2, lr=1e-3, grad_accum=2),
                  source=source, **QUICK)
    assert [i["epoch"] for i in done] == [1, 2]


def test_foreign_epoch_folder_is_refused(tmp_path):
    (tmp_path / "epoch-1").mkdir()
    (tmp_path / "epoch-1" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(WarmupError, match=INFO_FILE):
        warmup(tiny_lora(), make_examples(2), tmp_path, WarmupConfig(epochs=1), **QUICK)


def test_read_checkpoint_info_errors(tmp_path):
    with pytest.raises(CheckpointInfoMissing, match=str(tmp_path / INFO_FILE)) as e:
        read_checkpoint_info(tmp_path)
    assert isinstance(e.value, FileNotFoundError)
    (tmp_path / INFO_FILE).write_text("{not json")
    with pytest.raises(CheckpointInfoError, match="cannot read"):
        read_checkpoint_info(tmp_path)
    good = {"name": "epoch-1", "epoch": 1, "step": 3, "lr": 1e-5, "optimizer": "adamw"}
    (tmp_path / INFO_FILE).write_text(json.dumps({k: v for k, v in good.items() if k != "lr"}))
    with pytest.raises(CheckpointInfoError, match="missing 'lr'"):
        read_checkpoint_info(tmp_path)
    (tmp_path / INFO_FILE).write_text(json.dumps({**good, "step": "3"}))
    with pytest.raises(CheckpointInfoError, match="invalid 'step'"):
        read_checkpoint_info(tmp_path)
    (tmp_path / INFO_FILE).write_text(json.dumps(good))
    assert read_checkpoint_info(tmp_path)["lr"] == 1e-5


def test_bad_examples_and_models(tmp_path):
    no_response = [Ex("a", [1, 2, 3], [-100, -100, -100])]
    with pytest.raises(WarmupError, match="no response tokens"):
        warmup(tiny_lora(), no_response, tmp_path, **QUICK)
    with pytest.raises(WarmupError, match="equal length"):
        warmup(tiny_lora(), [Ex("a", [1, 2, 3], [5, 6])], tmp_path, **QUICK)
    with pytest.raises(WarmupError, match="LoRA"):
        warmup(tiny_base(), make_examples(2), tmp_path, **QUICK)


def test_max_steps_and_progress(tmp_path, capsys):
    # 5 examples, 2 per step: 3 steps an epoch; max_steps 4 ends mid-epoch 2.
    infos = warmup(tiny_lora(), make_examples(5), tmp_path / "a",
                   WarmupConfig(lr=1e-3, grad_accum=2, max_steps=4), progress=False)
    assert [(i["epoch"], i["step"], i["steps_in_epoch"]) for i in infos] == [(1, 3, 3), (2, 4, 1)]
    assert capsys.readouterr().err == ""
    warmup(tiny_lora(), make_examples(2), tmp_path / "b", WarmupConfig(epochs=1, grad_accum=2),
           progress=True)
    err = capsys.readouterr().err
    assert "warmup" in err and "lr=" in err

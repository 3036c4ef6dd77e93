"""qless.model and qless.optimizer_state on a tiny random LLaMA built in memory."""

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qless.model import (
    ModelLoadError,
    ModelSource,
    attach_lora,
    disable_cpu_repacking,
    load_adapter,
    load_model,
)
from qless.optimizer_state import (
    OptimizerStateError,
    load_optimizer_state,
    save_optimizer_state,
    trainable_parameters,
)


def test_load_model_dtype_device_identity(tiny_dir):
    m = load_model(tiny_dir, dtype="fp32", device="cpu")
    assert m.dtype == torch.float32 and not m.training
    assert load_model(tiny_dir).dtype == torch.bfloat16  # bf16 is the default
    ident = ModelSource(tiny_dir, "fp32").identity()
    assert ident["dtype"] == "fp32" and ident["quant"] is None and len(ident["sha256"]) == 64
    assert ident["name"] == str(tiny_dir.resolve())
    assert ModelSource(tiny_dir, "bf16").identity()["sha256"] == ident["sha256"]
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_dir, dtype="fp16")
    with pytest.raises(ModelLoadError):
        load_model(tiny_dir / "missing")


def test_attach_lora_and_adapter_roundtrip(tiny_dir, tmp_path):
    m = attach_lora(load_model(tiny_dir, dtype="fp32"), r=4, alpha=16, dropout=0.1, seed=0)
    names = [n for n, _ in trainable_parameters(m)]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    with torch.no_grad():
        for _, p in trainable_parameters(m):
            p.normal_()
    m.save_pretrained(tmp_path)
    m2 = load_adapter(load_model(tiny_dir, dtype="fp32"), tmp_path)
    a, b = dict(trainable_parameters(m)), dict(trainable_parameters(m2))
    assert list(a) == list(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_adapter(load_model(tiny_dir), tmp_path / "nope")


def _lora_grad(model, x):
    model.zero_grad()
    model(input_ids=x, labels=x).loss.backward()
    return torch.cat([p.grad.float().flatten() for _, p in trainable_parameters(model)])


def test_qlora_nf4_gradients_match_dequantized_model(tiny_dir):
    """The CPU repacking trap: an eval-mode no-grad forward first must not break gradients."""
    try:
        import bitsandbytes as bnb
        q = load_model(tiny_dir, dtype="fp32", quant="nf4", device="cpu")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes 4-bit cannot run here: {type(e).__name__}: {e}")
    dense = load_model(tiny_dir, dtype="fp32", device="cpu")
    n4 = 0
    for name, mod in q.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            n4 += 1
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            dense.get_submodule(name).weight.data.copy_(w)
    assert n4 > 0
    q = attach_lora(q, r=4, alpha=16, seed=1)
    dense = attach_lora(dense, r=4, alpha=16, seed=1)
    g = torch.Generator().manual_seed(0)
    for (_, a), (_, b) in zip(trainable_parameters(q), trainable_parameters(dense)):
        t = torch.randn(a.shape, generator=g) * 0.05
        a.data.copy_(t)
        b.data.copy_(t)
    x = torch.randint(0, 128, (1, 24), generator=g)
    with torch.no_grad():
        q(input_ids=x)  # the first forward: eval mode, no grad (where bnb would repack)
    cos = torch.nn.functional.cosine_similarity(_lora_grad(q, x), _lora_grad(dense, x), 0)
    assert cos >= 0.999
    # and the guard really is what keeps it right
    assert disable_cpu_repacking(q) == n4


# ---- optimizer state ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stepped():
    """A 12-layer LoRA model after two real AdamW steps (string sort != numeric order)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                      max_position_embeddings=32)
    m = attach_lora(LlamaForCausalLM(cfg), r=2, alpha=8, seed=0)
    named = trainable_parameters(m)
    # HF Trainer layout: [decay group, no-decay group], each in model order
    opt = torch.optim.AdamW([{"params": [p for _, p in named], "weight_decay": 0.0},
                             {"params": [], "weight_decay": 0.0}], lr=1e-2,
                            foreach=False)
    x = torch.randint(0, 64, (2, 10))
    for _ in range(2):
        opt.zero_grad()
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
    return m, opt


def _expected(m, opt):
    return {n: opt.state[p] for n, p in trainable_parameters(m)}


def test_trainer_index_layout_maps_by_model_order(stepped, tmp_path):
    m, opt = stepped
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in sd["state"])
    torch.save(sd, tmp_path / "optimizer.pt")
    got = load_optimizer_state(tmp_path, m)
    exp = _expected(m, opt)
    assert list(got) == list(exp)
    for n in exp:
        torch.testing.assert_close(got[n]["exp_avg"], exp[n]["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(got[n]["exp_avg_sq"], exp[n]["exp_avg_sq"], rtol=0, atol=0)
    # the trap: the adapter file's string-sorted order pairs some same-shape tensors wrongly
    names = list(exp)
    sorted_names = sorted(names)
    assert sorted_names != names
    wrong = [(a, b) for a, b in zip(names, sorted_names)
             if a != b and exp[a]["exp_avg"].shape == exp[b]["exp_avg"].shape]
    assert wrong  # a shape check alone would not catch these


def test_name_keyed_bin_and_our_format(stepped, tmp_path):
    m, opt = stepped
    exp = _expected(m, opt)
    sd = {"state": {n.replace("base_model.model.", "").replace(".default", ""): dict(s)
                    for n, s in exp.items()}, "param_groups": []}
    (tmp_path / "hf").mkdir()
    torch.save(sd, tmp_path / "hf" / "optimizer.bin")
    got = load_optimizer_state(tmp_path / "hf", m)
    for n in exp:
        assert torch.equal(got[n]["exp_avg_sq"], exp[n]["exp_avg_sq"])
    out = save_optimizer_state(tmp_path / "ours", m, opt)
    assert out.name == "optimizer_state.safetensors"
    got = load_optimizer_state(tmp_path / "ours", m)
    assert list(got) == list(exp)
    for n in exp:
        assert torch.equal(got[n]["exp_avg"], exp[n]["exp_avg"])


def test_mismatch_errors_name_file_and_parameter(stepped, tmp_path):
    m, opt = stepped
    sd = opt.state_dict()
    first = min(sd["state"])
    sd["state"][first]["exp_avg"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "optimizer.pt")
    name = trainable_parameters(m)[0][0]
    with pytest.raises(OptimizerStateError, match=r"optimizer\.pt: parameter .*exp_avg has shape") as e:
        load_optimizer_state(tmp_path, m)
    assert name in str(e.value) and "\n" not in str(e.value)
    sd = opt.state_dict()
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    torch.save(sd, tmp_path / "optimizer.pt")
    with pytest.raises(OptimizerStateError, match="the model has"):
        load_optimizer_state(tmp_path, m)
    with pytest.raises(OptimizerStateError, match="no optimizer state"):
        load_optimizer_state(tmp_path / "empty", m)


@pytest.mark.slow
def test_builtin_smollm2_loads_and_caches(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("QLESS_CACHE", str(tmp_path))
    from qless.model import load_tokenizer

    m = load_model("smollm2-135m")
    assert m.config.num_hidden_layers == 30 and m.dtype == torch.bfloat16
    t = time.perf_counter()
    m = load_model("smollm2-135m", dtype="fp32")
    assert time.perf_counter() - t < 5
    tok = load_tokenizer("smollm2-135m")
    ids = tok("Hello world")["input_ids"]
    with torch.no_grad():
        logits = m(input_ids=torch.tensor([ids])).logits
    assert np.isfinite(logits.numpy()).all()
    ident = ModelSource("smollm2-135m", "fp32").identity()
    assert ident["name"] == "smollm2-135m" and ident["dtype"] == "fp32" and ident["sha256"]


def test_bitsandbytes_kernel_fetch_message_is_silenced():
    """bitsandbytes' 'Failed to load CPU gemm_4bit_forward' is for a path qless turns off."""
    import subprocess
    import sys

    message = "Failed to load CPU gemm_4bit_forward"
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, check=False)
    ours = subprocess.run([sys.executable, "-c", "import qless.model, peft, bitsandbytes"],
                          capture_output=True, text=True, check=False)
    assert bare.returncode == 0 and ours.returncode == 0, ours.stderr
    assert message not in ours.stderr
    if message not in bare.stderr:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not try the kernel")

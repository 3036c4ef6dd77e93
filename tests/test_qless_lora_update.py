"""qless.lora_update: PEFT's LoRA forward as one recorded node, checked against PEFT itself."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qless.gradients import GradientComputer
from qless.lora_update import lora_layer, recording
from qless.model import attach_lora, load_model
from qless.optimizer_state import trainable_parameters


def lora_model(tiny_dir, dtype, quant=None, seed=1):
    """The tiny LLaMA with LoRA on q,k,v,o, every LoRA weight drawn (B too): all gradients flow."""
    try:
        model = load_model(tiny_dir, dtype=dtype, quant=quant, device="cpu")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes 4-bit cannot run here: {type(e).__name__}: {e}")
    model = attach_lora(model, r=4, alpha=16, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for _, p in trainable_parameters(model):
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("dtype, quant", [("bf16", None), ("fp32", None), ("bf16", "nf4")])
def test_recorded_forward_and_input_gradient_are_peft_bit_for_bit(tiny_dir, dtype, quant):
    """The update in the same operations and order as PEFT's (a 4-bit layer rounds the update
    before the sum), so the output and x's gradient are PEFT's exactly, and the recorded factors
    give the weights' own gradients."""
    model = lora_model(tiny_dir, dtype, quant)
    layer = model.get_submodule("base_model.model.model.layers.1.self_attn.q_proj")
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=g).to(model.dtype)
    dy = torch.randn(2, 7, 64, generator=g).to(model.dtype)

    x_peft = x.clone().requires_grad_()
    y_peft = layer(x_peft)
    y_peft.backward(dy)
    x_ours = x.clone().requires_grad_()
    with recording([(layer, "default")]) as record:
        y_ours = layer(x_ours)
        y_ours.backward(dy, inputs=[x_ours, A, B])
    assert torch.equal(y_ours, y_peft) and y_ours.dtype == model.dtype
    assert torch.equal(x_ours.grad, x_peft.grad)
    for w in (A, B):
        inputs, out_grad = record[w]
        assert inputs.dtype == out_grad.dtype == torch.float32 and inputs.shape[0] == 14
        torch.testing.assert_close(out_grad.T @ inputs, w.grad, rtol=1e-5, atol=1e-6)
    assert "forward" not in layer.__dict__  # PEFT's own forward is back
    torch.testing.assert_close(layer(x), y_peft, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, min_cos", [("fp32", 0.9999), ("bf16", 0.99)])
def test_nf4_batched_gradients_equal_batch1(tiny_dir, dtype, min_cos):
    """A 4-bit base model through the batched path, packed and padded."""
    model = lora_model(tiny_dir, dtype, "nf4")
    g = torch.Generator().manual_seed(0)
    rows = []
    for n in (24, 9, 17, 30):
        ids = torch.randint(0, 128, (n,), generator=g).tolist()
        rows.append(SimpleNamespace(input_ids=ids, labels=[-100] * 3 + ids[3:]))
    for pack in (True, False):
        gc = GradientComputer(model, mode="sgd", token_budget=48, pack=pack)
        got = np.stack([v for _, v in gc.gradients(rows)])
        ref = np.stack([gc.gradient(r) for r in rows])
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert len(gc.batches(rows)) < len(rows) and cos.min() >= min_cos


def test_lora_layer_refuses_what_the_update_does_not_compute(tiny_dir):
    from peft import LoraConfig, get_peft_model

    model = lora_model(tiny_dir, "fp32")
    name = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"
    layer, role, adapter = lora_layer(name, model)
    assert (role, adapter) == ("lora_B", "default")
    assert layer.lora_B["default"].weight is model.get_parameter(name)
    for bad in ("base_model.model.model.embed_tokens.weight", "weight"):
        with pytest.raises(ValueError, match=r"weight: batched gradients need .* plain LoRA layer"):
            lora_layer(bad, model)
    layer.merge()
    with pytest.raises(ValueError, match="not merged"):
        lora_layer(name, model)
    layer.unmerge()
    model.train()  # LoRA dropout on: not what the update computes
    with pytest.raises(ValueError, match="without dropout: put the model in eval mode"):
        with recording([(layer, "default")]):
            pass
    assert "forward" not in layer.__dict__
    dora = get_peft_model(load_model(tiny_dir, dtype="fp32"),
                          LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
    with pytest.raises(ValueError, match="no DoRA"):
        lora_layer(name, dora)

"""PEFT's LoRA update as one autograd Function that records what per-example gradients need.

A PEFT LoRA layer returns base(x) + lora_B(lora_A(dropout(x))) * scaling, x cast to the
adapter's dtype (float32 here: PEFT keeps adapters in float32 under a bf16 model) and the sum
cast back to the base output's dtype (a 4-bit layer casts the update before adding it). Under
`recording(layers)` each layer's forward computes exactly that, with the same operations in the
same order, as one `LoRAUpdate` node instead of PEFT's chain of casts, products, a scaling, a
sum and a cast (each with its own fresh tensor and autograd node), and:
- the float32 copy of x is made once for the layers that read the same x (q, k and v);
- the backward gives the gradient of x (and the base output's, which is the incoming one), and
  records, per LoRA weight, the input x_t and output gradient d_t its per-example gradients are
  made of: lora_A (x, s B^T dy) and lora_B (A x, s dy), s the scaling; the weights themselves
  get no gradient.
Dropout must be off (the model in eval mode, as LESS runs it); it is refused otherwise.
Against PEFT's forward with hooks on every lora_A and lora_B (SmolLM2-135M bf16, r = 8 and 128,
2K-token packed batches, interleaved): the same vectors bit for bit, the same speed (0.93-1.03x
the time), and a peak RSS per batch of 1.75-1.93 GB instead of 2.4-2.6 GB: one float32 copy of
each attention input instead of three, and no lora_B outputs held for the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


def lora_layer(name: str, model) -> tuple[torch.nn.Module, str, str]:
    """The PEFT LoRA layer a trainable parameter belongs to, its role ("lora_A" or "lora_B") and
    adapter; a one-line error unless it is the weight of a plain single-adapter LoRA Linear."""
    from peft.tuners.lora import Linear
    from peft.tuners.lora.bnb import Linear4bit

    parts = name.rsplit(".", 3)  # <layer>.lora_A.<adapter>.weight
    path, role, adapter, leaf = parts if len(parts) == 4 else ("", "", "", "")
    layer = model.get_submodule(path) if path else None
    plain = (
        type(layer) in (Linear, Linear4bit) and leaf == "weight" and role in ("lora_A", "lora_B")
        and list(layer.active_adapters) == [adapter] and adapter in layer.lora_A
        and not layer.merged and not layer.disable_adapters and adapter not in layer.lora_variant
        and all(getattr(layer, k)[adapter].bias is None for k in ("lora_A", "lora_B"))
    )
    if not plain:
        raise ValueError(f"{name}: batched gradients need every trainable parameter to be the "
                         "weight of a bias-free Linear of a plain LoRA layer (one active adapter, "
                         "no DoRA or other variant, not merged); this one is not")
    return layer, role, adapter


class LoRAUpdate(torch.autograd.Function):
    """base + (x32 A^T B^T) * scaling, cast to base's dtype (`round_first`: the update is cast
    before the sum, as PEFT's 4-bit layer does); x32 is x in A's dtype. A and B are inputs only so
    that the node is in the graph wherever the weights are trainable: they get no gradient; their
    per-example gradients' factors go to `record[A]` and `record[B]` as (inputs, output gradients),
    2-D, rows in the flattened token order of x."""

    @staticmethod
    def forward(ctx, x, base, x32, A, B, scaling, round_first, record):
        xa = torch.mm(x32, A.T)
        update = torch.mm(xa, B.T).mul_(scaling)
        flat = base.reshape(update.shape)
        out = flat + update.to(base.dtype) if round_first else update.add_(flat).to(base.dtype)
        ctx.factors = (x32, xa, A, B, scaling, record)
        ctx.x_shape = x.shape
        return out.view(base.shape)

    @staticmethod
    def backward(ctx, dy):
        x32, xa, A, B, scaling, record = ctx.factors
        del ctx.factors
        # A copy even where dy is already float32: dy is also the base output's gradient.
        d_update = dy.reshape(xa.shape[0], -1).to(A.dtype, copy=True).mul_(scaling)
        d_xa = torch.mm(d_update, B)
        record[A], record[B] = (x32, d_xa), (xa, d_update)
        dx = torch.mm(d_xa, A).to(dy.dtype).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return dx, dy, None, None, None, None, None, None


@contextlib.contextmanager
def recording(layers: Sequence[tuple[torch.nn.Module, str]]) -> Iterator[dict]:
    """Within: each (PEFT LoRA layer, adapter) runs its forward as `LoRAUpdate`; yields the dict
    the backward fills, LoRA weight -> (inputs, output gradients). The layers' own forward is
    back on exit."""
    from peft.tuners.lora.bnb import Linear4bit

    record: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = {}
    last: list = [None, None]  # the last input and its float32 copy: q, k and v read the same x

    def forward_of(layer, adapter):
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        scaling, round_first = layer.scaling[adapter], isinstance(layer, Linear4bit)
        dropout = layer.lora_dropout[adapter]
        if dropout.training and getattr(dropout, "p", 0):
            raise ValueError("batched gradients run LoRA without dropout: "
                             "put the model in eval mode")

        def forward(x, *args, **kwargs):
            base = layer.base_layer(x, *args, **kwargs)
            if last[0] is not x:
                last[:] = [x, x.detach().reshape(-1, x.shape[-1]).to(A.dtype)]
            return LoRAUpdate.apply(x, base, last[1], A, B, scaling, round_first, record)
        return forward

    try:
        for layer, adapter in layers:
            layer.forward = forward_of(layer, adapter)
        yield record
    finally:
        for layer, _ in layers:
            layer.__dict__.pop("forward", None)
        last.clear()

"""Packed batches: several examples in one sequence, attention kept inside each example.

`pack_attention(model)` routes the model's attention through `packed_attention`, registered
with transformers' attention interface under "qless-packed-<the model's own implementation>".
A forward given `cu_seq_lens_q` (the examples' boundaries in the packed sequence, as
transformers' varlen flash attention takes them) and `position_ids` restarting at 0 per
example attends causally within each example; any other forward runs the model's own
implementation unchanged (the batch-1 reference path, generation).

On CPU each example's attention is plain bf16/fp32 matmuls with a float32 softmax (as
transformers' eager attention computes it) and a hand-written backward
(`PackedCausalAttention`): at 100-400 tokens, head dim 64, the matmuls alone were 1.4-2.5x
faster than torch's CPU flash-attention kernel forward and backward, and the hand-written
backward takes another ~30% off autograd's graph of the same matmuls (~10% of ingest). On
other devices, and where the model asks for more than plain causal attention (sliding window,
soft-capping, sinks), each example goes to the model's own implementation.
"""

from __future__ import annotations

import functools
import itertools

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "qless-packed-"
# Attention kwargs that change the result beyond plain causal softmax attention.
_NOT_PLAIN = ("sliding_window", "softcap", "s_aux")


def pack_attention(model) -> bool:
    """Route `model`'s attention through `packed_attention`; False (model untouched) where the
    model does not dispatch attention through transformers' attention interface, or runs eager."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = base.config._attn_implementation
    if own.startswith(PREFIX):
        return True
    if not (getattr(base, "_supports_attention_backend", False) and base._can_set_attn_implementation()
            and own in ALL_ATTENTION_FUNCTIONS):  # "eager" is each model's own function, not registered
        return False
    name = PREFIX + own
    AttentionInterface.register(name, functools.partial(packed_attention, ALL_ATTENTION_FUNCTIONS[own]))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
    base.set_attn_implementation(name)
    return True


def packed_attention(own, module, query, key, value, attention_mask, cu_seq_lens_q=None,
                     scaling=None, **kwargs):
    """Per-example causal attention over a packed (1, heads, tokens, head_dim) batch; without
    `cu_seq_lens_q`, the model's own implementation `own`."""
    if cu_seq_lens_q is None:
        return own(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    kwargs.pop("position_ids", None)  # the packed sequence's: an example alone starts at 0 anyway
    bounds = cu_seq_lens_q.tolist()
    lengths = tuple(end - start for start, end in itertools.pairwise(bounds))
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if query.device.type == "cpu" and not any(kwargs.get(k) is not None for k in _NOT_PLAIN):
        return PackedCausalAttention.apply(query, key, value, lengths, scaling), None
    outputs = []
    # split (not slicing): its backward is one concatenation, not a zero-filled copy per example.
    pieces = zip(bounds, query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    for start, q, k, v in pieces:  # with the packed mask's block for this example, where there is one
        end = start + q.shape[2]
        mask = None if attention_mask is None else attention_mask[..., start:end, start:end]
        outputs.append(own(module, q, k, v, mask, scaling=scaling, **kwargs)[0])
    return torch.cat(outputs, 1), None


@functools.lru_cache(maxsize=64)  # a batch's lengths recur in every layer
def _causal_bias(n: int, group: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(group * n, n): 0 where a query may see a key, -inf above the diagonal, per grouped head."""
    hidden = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(hidden, float("-inf")).repeat(group, 1)


class PackedCausalAttention(torch.autograd.Function):
    """softmax(q k^T * scaling, causal) v within each example of a packed batch: query
    (1, heads, tokens, d), key and value (1, kv_heads, tokens, d) (grouped-query heads share a kv
    head), `lengths` the examples' token counts in order. Returns (1, tokens, heads, d), as
    transformers' attention functions do.

    Per example and kv head, one matmul over the group's heads; the softmax is computed in
    float32 and rounded to the inputs' dtype once, as transformers' eager attention does. A
    hand-written backward saves each example's q, k, v and probabilities and writes every
    gradient in place: autograd's graph of the same ops spent ~30% more, in copies, masks and
    casts."""

    @staticmethod
    def forward(ctx, query, key, value, lengths, scaling):
        _, heads, total, d = query.shape
        kv_heads = key.shape[1]
        group = heads // kv_heads
        out = query.new_empty(1, total, heads, d)
        saved, start = [], 0
        for n in lengths:
            q = query[0, :, start:start + n].reshape(kv_heads, group * n, d)
            k = key[0, :, start:start + n].contiguous()
            v = value[0, :, start:start + n].contiguous()
            bias = _causal_bias(n, group, query.dtype, query.device)
            p = torch.softmax(torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scaling), -1)
            out[0, start:start + n].transpose(0, 1).copy_(torch.bmm(p, v).view(heads, n, d))
            saved += [q, k, v, p]
            start += n
        ctx.save_for_backward(*saved)
        ctx.lengths, ctx.scaling = lengths, scaling
        ctx.shapes = (query.shape, key.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (_, heads, total, d), (_, kv_heads, _, _) = ctx.shapes
        group = heads // kv_heads
        saved = ctx.saved_tensors
        # The gradients in the layout the projections produced q, k and v in (token-major).
        dq = grad_out.new_empty(1, total, heads, d)
        dk = grad_out.new_empty(1, total, kv_heads, d)
        dv = torch.empty_like(dk)
        start = 0
        for i, n in enumerate(ctx.lengths):
            q, k, v, p = saved[4 * i:4 * i + 4]
            do = grad_out[0, start:start + n].transpose(0, 1).reshape(kv_heads, group * n, d)
            dv[0, start:start + n].transpose(0, 1).copy_(torch.bmm(p.transpose(1, 2), do))
            ds = torch._softmax_backward_data(torch.bmm(do, v.transpose(1, 2)), p, -1, p.dtype)
            dq[0, start:start + n].transpose(0, 1).copy_(torch.bmm(ds, k).view(heads, n, d))
            dk[0, start:start + n].transpose(0, 1).copy_(torch.bmm(ds.transpose(1, 2), q))
            start += n
        s = ctx.scaling
        return dq.transpose(1, 2).mul_(s), dk.transpose(1, 2).mul_(s), dv.transpose(1, 2), None, None

"""Packed batches: several examples in one sequence, attention kept inside each example.

`pack_attention(model)` routes the model's attention through `packed_attention`, registered
with transformers' attention interface under "qless-packed-<the model's own implementation>".
A forward given `cu_seq_lens_q` (the examples' boundaries in the packed sequence, as
transformers' varlen flash attention takes them) and `position_ids` restarting at 0 per
example attends causally within each example; any other forward runs the model's own
implementation unchanged (the batch-1 reference path, generation).

On CPU each example's attention is plain bf16/fp32 matmuls with a float32 softmax (as
transformers' eager attention computes it): at 100-400 tokens, head dim 64, that is 1.4-2.5x
faster than torch's CPU flash-attention kernel forward and backward
(benchmarks/bench_ingest.py). On other devices, and where the model asks for more than plain
causal attention (sliding window, soft-capping, sinks), each example goes to the model's own
implementation.
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
    lengths = [end - start for start, end in itertools.pairwise(bounds)]
    plain = query.device.type == "cpu" and not any(kwargs.get(k) is not None for k in _NOT_PLAIN)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    outputs = []
    # split (not slicing): its backward is one concatenation, not a zero-filled copy per example.
    pieces = zip(bounds, query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    for start, q, k, v in pieces:
        if plain:
            outputs.append(causal_attention(q, k, v, scaling))
        else:  # the packed mask's block for this example (None where the implementation takes none)
            end = start + q.shape[2]
            mask = None if attention_mask is None else attention_mask[..., start:end, start:end]
            outputs.append(own(module, q, k, v, mask, scaling=scaling, **kwargs)[0])
    return torch.cat(outputs, 1), None


def causal_attention(q, k, v, scaling: float) -> torch.Tensor:
    """softmax(q k^T * scaling, causal) v for one example: q (1, heads, n, d), k and v
    (1, kv_heads, n, d) (grouped-query heads share a kv head). Returns (1, n, heads, d)."""
    _, heads, n, d = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(kv_heads, group * n, d), k[0].transpose(1, 2)).mul_(scaling)
    scores = scores.view(kv_heads, group, n, n).masked_fill_(
        torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    weights = torch.softmax(scores, -1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights.view(kv_heads, group * n, n), v[0]).view(1, heads, n, d).transpose(1, 2)

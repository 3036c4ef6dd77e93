"""qless.packing: one example's matmul attention equals torch's causal attention, and a packed
batch attends within each example only."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qless.packing import PackedCausalAttention, packed_attention


def qkv(n, heads, kv_heads, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, h, n, d, generator=g, dtype=dtype).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def sdpa(q, k, v, scaling):  # torch's, (1, n, heads, d) as transformers' implementations return
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling,
                                          enable_gqa=True).transpose(1, 2)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), kv_heads=st.integers(1, 3),
       group=st.integers(1, 4), d=st.sampled_from([4, 8, 16]), seed=st.integers(0, 2**16))
def test_packed_causal_attention_equals_sdpa_per_example_with_its_gradients(lengths, kv_heads, group, d, seed):
    q, k, v = qkv(sum(lengths), kv_heads * group, kv_heads, d, seed)
    got = PackedCausalAttention.apply(q, k, v, tuple(lengths), d ** -0.5)
    want = torch.cat([sdpa(*(t[:, :, s:s + n] for t in (q, k, v)), d ** -0.5)
                      for s, n in zip(itertools.accumulate(lengths, initial=0), lengths)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), up), torch.autograd.grad(want, (q, k, v), up)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plain", [True, False])
def test_a_packed_batch_attends_within_each_example(plain):
    lengths = [5, 1, 9, 3]
    q, k, v = qkv(sum(lengths), 4, 2, 8, seed=3)
    bounds = torch.tensor([0, 5, 6, 15, 18])

    def own(module, q, k, v, mask, scaling, **kwargs):
        assert mask is None or mask.shape[-1] == q.shape[2]  # the example's block only
        return sdpa(q, k, v, scaling), None

    # A sliding window wider than every example leaves plain causal attention, through `own`.
    extra = {} if plain else {"sliding_window": 64}
    got, _ = packed_attention(own, None, q, k, v, None, cu_seq_lens_q=bounds, **extra)
    assert got.shape == (1, 18, 4, 8)
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        want = sdpa(q[:, :, part], k[:, :, part], v[:, :, part], 8 ** -0.5)
        torch.testing.assert_close(got[:, part], want, rtol=1e-5, atol=1e-5)
        start += n


def test_without_boundaries_the_models_own_attention_runs():
    q, k, v = qkv(6, 2, 1, 4, seed=0)
    calls = []

    def own(module, q, k, v, mask, scaling=None, **kwargs):
        calls.append((module, mask, kwargs))
        return "own", None

    assert packed_attention(own, "m", q, k, v, "mask", dropout=0.0)[0] == "own"
    assert calls == [("m", "mask", {"dropout": 0.0})]

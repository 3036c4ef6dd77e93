"""gradstore.kernels against plain-numpy references (unpack bits/levels, then matmul).

The packing helpers here are written from the layout in gradstore/encodings.py alone, so
these tests do not depend on gradstore.quant.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradstore import kernels
from gradstore.encodings import parse_encoding
from gradstore.errors import SchemaMismatchError

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---- independent packing / unpacking (numpy only) -------------------------------------


def row_bytes(dim, bits):
    return ((dim * bits + 7) // 8 + 7) // 8 * 8


def pack_sign(s, dim):
    """s: (n, dim) of +/-1 -> packed bits (bit 1 = +1), little bit order, zero padding."""
    bits = np.zeros((s.shape[0], row_bytes(dim, 1) * 8), np.uint8)
    bits[:, :dim] = s > 0
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_sign(p, dim):
    return np.unpackbits(p, axis=1, bitorder="little")[:, :dim].astype(np.int64) * 2 - 1


def pack_levels(lv, bits, dim):
    """lv: (n, dim) signed levels -> level + 2**(k-1) in k-bit fields, lowest bits first."""
    o = 1 << (bits - 1)
    nf = 8 // bits
    width = row_bytes(dim, bits)
    u = np.full((lv.shape[0], width * nf), o, np.int64)  # padding holds level 0
    u[:, :dim] = lv + o
    u = u.reshape(lv.shape[0], width, nf)
    out = np.zeros((lv.shape[0], width), np.int64)
    for t in range(nf):
        out |= u[:, :, t] << (bits * t)
    return out.astype(np.uint8)


def unpack_levels(p, bits, dim):
    nf = 8 // bits
    fields = [(p.astype(np.int64) >> (bits * t)) & ((1 << bits) - 1) for t in range(nf)]
    return np.stack(fields, axis=2).reshape(p.shape[0], -1)[:, :dim] - (1 << (bits - 1))


def rand_signs(rng, n, dim):
    return np.where(rng.random((n, dim)) < 0.5, -1, 1)


def rand_levels(rng, n, dim, bits):
    L = 2 ** (bits - 1) - 1
    return rng.integers(-L, L + 1, size=(n, dim))


def readonly(x):
    y = np.frombuffer(x.tobytes(), dtype=x.dtype).reshape(x.shape)
    assert not y.flags.writeable
    return y


def unaligned(x):
    """The same bytes at an address that is odd (so not 8-aligned for a uint64 view)."""
    raw = np.empty(x.nbytes + 9, np.uint8)
    base = raw.ctypes.data
    start = 1 if base % 8 == 0 else (9 - base % 8) % 8 or 1
    y = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    y[...] = x
    assert y.ctypes.data % 8 != 0
    return y


def variants(x):
    return [x, readonly(x), unaligned(x)]


dims = st.integers(1, 300)
counts = st.integers(1, 9)


def test_packing_helpers_round_trip():
    rng = np.random.default_rng(0)
    for bits in (8, 4, 2):
        lv = rand_levels(rng, 3, 37, bits)
        assert (unpack_levels(pack_levels(lv, bits, 37), bits, 37) == lv).all()
    s = rand_signs(rng, 3, 37)
    assert (unpack_sign(pack_sign(s, 37), 37) == s).all()


# ---- sign_dot ----------------------------------------------------------------------------


@SETTINGS
@given(na=counts, nb=counts, dim=dims, seed=st.integers(0, 2**32 - 1))
def test_sign_dot_matches_numpy(na, nb, dim, seed):
    rng = np.random.default_rng(seed)
    sa, sb = rand_signs(rng, na, dim), rand_signs(rng, nb, dim)
    a, b = pack_sign(sa, dim), pack_sign(sb, dim)
    got = kernels.sign_dot(a, b, dim)
    assert got.dtype == np.int32 and got.shape == (na, nb)
    assert (got == sa @ sb.T).all()


def test_sign_dot_readonly_unaligned_and_large():
    rng = np.random.default_rng(1)
    dim = 8192 - 64 + 5
    sa, sb = rand_signs(rng, 11, dim), rand_signs(rng, 6, dim)
    ref = sa @ sb.T
    for a in variants(pack_sign(sa, dim)):
        for b in variants(pack_sign(sb, dim)):
            assert (kernels.sign_dot(a, b, dim) == ref).all()


def test_sign_dot_self_is_dim_and_empty():
    rng = np.random.default_rng(2)
    a = pack_sign(rand_signs(rng, 5, 70), 70)
    assert (np.diag(kernels.sign_dot(a, a, 70)) == 70).all()
    assert kernels.sign_dot(a[:0], a, 70).shape == (0, 5)


# ---- int_dot -----------------------------------------------------------------------------


@SETTINGS
@given(na=counts, nb=counts, dim=dims, bits=st.sampled_from([8, 4, 2]),
       seed=st.integers(0, 2**32 - 1))
def test_int_dot_matches_numpy(na, nb, dim, bits, seed):
    rng = np.random.default_rng(seed)
    la, lb = rand_levels(rng, na, dim, bits), rand_levels(rng, nb, dim, bits)
    got = kernels.int_dot(pack_levels(la, bits, dim), pack_levels(lb, bits, dim), bits, dim)
    assert got.dtype == np.int32 and got.shape == (na, nb)
    assert (got == la @ lb.T).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_int_dot_extremes_readonly_unaligned(bits):
    # 64-byte chunks plus a tail, row blocks of 4 plus 1, query blocks of 4 plus 3
    rng = np.random.default_rng(bits)
    dim = 4096 + 3 * (8 // bits) * 8 + 1
    L = 2 ** (bits - 1) - 1
    la = rand_levels(rng, 9, dim, bits)
    la[0] = L
    la[1] = -L
    lb = rand_levels(rng, 7, dim, bits)
    lb[0] = L
    lb[1] = -L
    ref = la @ lb.T
    for a in variants(pack_levels(la, bits, dim)):
        for b in variants(pack_levels(lb, bits, dim)):
            assert (kernels.int_dot(a, b, bits, dim) == ref).all()


def test_int_dot_noncontiguous_input():
    rng = np.random.default_rng(3)
    la = rand_levels(rng, 10, 200, 8)
    pa = pack_levels(la, 8, 200)
    got = kernels.int_dot(pa[::2], pa, 8, 200)
    assert (got == la[::2] @ la.T).all()


# ---- float_dot ---------------------------------------------------------------------------


def float_rows(rng, n, dim, name):
    """(packed rows, levels as float64) for one encoding."""
    enc = parse_encoding(name)
    if enc.kind == "f32" or enc.kind == "f16":
        dt = "<f4" if enc.kind == "f32" else "<f2"
        x = rng.standard_normal((n, dim)).astype(dt)
        pad = np.zeros((n, enc.row_bytes(dim) // x.itemsize), dt)
        pad[:, :dim] = x
        return pad.view(np.uint8), x.astype(np.float64)
    if enc.kind == "sign":
        s = rand_signs(rng, n, dim)
        return pack_sign(s, dim), s.astype(np.float64)
    lv = rand_levels(rng, n, dim, enc.bits)
    return pack_levels(lv, enc.bits, dim), lv.astype(np.float64)


ENCODINGS = ["f32", "f16", "absmax8", "absmean4", "absmax2", "sign1"]


@SETTINGS
@given(n=counts, nq=st.integers(1, 5), dim=dims, name=st.sampled_from(ENCODINGS),
       seed=st.integers(0, 2**32 - 1))
def test_float_dot_matches_numpy(n, nq, dim, name, seed):
    rng = np.random.default_rng(seed)
    rows, lv = float_rows(rng, n, dim, name)
    q = rng.standard_normal((nq, dim)).astype(np.float32)
    got = kernels.float_dot(rows, name, dim, q)
    assert got.dtype == np.float32 and got.shape == (n, nq)
    np.testing.assert_allclose(got, lv @ q.T.astype(np.float64), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ENCODINGS)
def test_float_dot_blocks_readonly_unaligned(name):
    rng = np.random.default_rng(4)
    dim = 77
    n = kernels._FLOAT_BLOCK + 3  # crosses a block boundary
    rows, lv = float_rows(rng, n, dim, name)
    q = rng.standard_normal((3, dim)).astype(np.float32)
    ref = lv @ q.T.astype(np.float64)
    for r in variants(rows):
        got = kernels.float_dot(r, parse_encoding(name), dim, q)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    one = kernels.float_dot(rows[:2], name, dim, q[0])
    np.testing.assert_allclose(one[:, 0], ref[:2, 0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", ["f32", "f16", "absmax8", "sign1"])
def test_float_dot_gives_equal_rows_equal_results(name):
    # an equal row at every position of the 4-row tile and in the tail, next to other rows
    rng = np.random.default_rng(5)
    dim = 8203  # 512 chunks of 16 and a tail of 11
    rows, _ = float_rows(rng, 11, dim, name)
    rows[[0, 3, 5, 6, 10]] = rows[1]
    got = kernels.float_dot(rows, name, dim, rng.standard_normal((6, dim)).astype(np.float32))
    assert (got[[0, 3, 5, 6, 10]] == got[1]).all()


# ---- int queries (float queries as two int8 limbs on the integer kernel) ------------------

INT_ENCODINGS = ["absmax8", "absmean4", "absmax2", "sign1"]


@SETTINGS
@given(n=counts, nq=st.integers(1, 6), dim=dims, name=st.sampled_from(INT_ENCODINGS),
       scale=st.sampled_from([1e-6, 1.0, 1e6]), seed=st.integers(0, 2**32 - 1))
def test_int_queries_match_numpy_within_the_rounding_bound(n, nq, dim, name, scale, seed):
    rng = np.random.default_rng(seed)
    rows, lv = float_rows(rng, n, dim, name)
    q = rng.standard_normal((nq, dim)) * scale
    q[0, : dim // 2] = 0.0  # some exact zeros
    iq = kernels.IntQueries(q, name, dim)
    got = iq.dot(rows)
    ref = lv @ q.T
    # Q = rint(q / step) moves each coordinate by at most step / 2, step = max|q| / (127 * 128)
    step = np.abs(q).max(axis=1) / (127 * 128)
    bound = np.abs(lv).sum(axis=1)[:, None] * step[None, :] / 2
    assert got.shape == (n, nq) and got.dtype == np.float64
    assert (np.abs(got - ref) <= bound * (1 + 1e-9) + 1e-300).all()
    # the two limbs are exact: with integer queries inside the 15-bit range nothing rounds
    qi = rng.integers(-127 * 128, 127 * 128 + 1, (nq, dim)).astype(np.float64)
    qi[:, 0] = 127 * 128  # max|Q| at the limit: the step is exactly 1
    np.testing.assert_array_equal(kernels.IntQueries(qi, name, dim).dot(rows), lv @ qi.T)


def test_int_queries_zero_query_readonly_unaligned_and_errors():
    rng = np.random.default_rng(1)
    dim = 300
    rows, lv = float_rows(rng, 7, dim, "absmax4")
    q = np.vstack([np.zeros(dim), rng.standard_normal(dim)])
    iq = kernels.IntQueries(q, "absmax4", dim)
    bound = np.abs(lv).sum(axis=1) * np.abs(q[1]).max() / (127 * 128) / 2
    for r in variants(rows):
        got = iq.dot(r)
        assert (got[:, 0] == 0).all()
        assert (np.abs(got[:, 1] - lv @ q[1]) <= bound * (1 + 1e-9)).all()
    with pytest.raises(SchemaMismatchError, match="IntQueries: f16 rows are floats; use float_dot"):
        kernels.IntQueries(q, "f16", dim)
    with pytest.raises(SchemaMismatchError, match="queries: not all values are finite"):
        kernels.IntQueries(np.full((1, dim), np.inf), "absmax4", dim)
    with pytest.raises(SchemaMismatchError, match="rows of 152 bytes cannot hold 300 values of 8 bits"):
        kernels.IntQueries(q, "absmax8", dim).dot(rows)
    with pytest.raises(SchemaMismatchError, match="160 bytes per row, but absmax4 at dim 300 stores 152"):
        kernels.IntQueries(q, "absmax4", dim).dot(np.zeros((2, 160), np.uint8))


def test_single_threaded_kernels_equal_the_parallel_ones():
    rng = np.random.default_rng(2)
    dim = 515
    q = rng.standard_normal((5, dim))
    f32, _ = float_rows(rng, 13, dim, "f32")
    a8, _ = float_rows(rng, 13, dim, "absmax8")
    s1, _ = float_rows(rng, 13, dim, "sign1")
    subs = kernels.SignSubtasks(s1[:7], [0, 3, 7], dim)
    iq = kernels.IntQueries(q, "absmax8", dim)

    def run():
        return [kernels.float_dot(f32, "f32", dim, q), iq.dot(a8), subs.means(s1)]

    parallel = run()
    with kernels.single_threaded():
        single = run()
    for p, s in zip(parallel, single):
        np.testing.assert_array_equal(p, s)


@SETTINGS
@given(n=st.integers(1, 40), dim=dims, name=st.sampled_from(ENCODINGS), data=st.data())
def test_rows_at_positions_score_as_the_copied_rows(n, dim, name, data):
    # a rerank scores a stored block's picked rows in place: equal to scoring rows[at], bit for bit
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    rows, _ = float_rows(rng, n, dim, name)
    at = np.array(data.draw(st.lists(st.integers(0, n - 1), max_size=12)), np.int64)
    q = rng.standard_normal((5, dim))
    np.testing.assert_array_equal(kernels.float_dot(rows, name, dim, q, at),
                                  kernels.float_dot(rows[at], name, dim, q))
    if name in INT_ENCODINGS:
        iq = kernels.IntQueries(q, name, dim)
        np.testing.assert_array_equal(iq.dot(rows, at), iq.dot(rows[at]))
        with kernels.single_threaded():
            np.testing.assert_array_equal(iq.dot(rows, at), iq.dot(rows[at]))


def test_positions_outside_the_rows_are_refused():
    rows, _ = float_rows(np.random.default_rng(0), 4, 64, "absmax8")
    q = np.ones((1, 64))
    for bad in ([4], [-1], [[0, 1]]):
        with pytest.raises(SchemaMismatchError, match=r"at: expected 1-D row positions in 0\.\.3"):
            kernels.IntQueries(q, "absmax8", 64).dot(rows, bad)
        with pytest.raises(SchemaMismatchError, match=r"at: expected 1-D row positions in 0\.\.3"):
            kernels.float_dot(rows, "absmax8", 64, q, bad)


# ---- subtask means -----------------------------------------------------------------------

subtask_sizes = st.lists(st.integers(1, 6), min_size=1, max_size=5)


@SETTINGS
@given(n=counts, sizes=subtask_sizes, dim=dims, seed=st.integers(0, 2**32 - 1))
def test_sign_subtask_means_matches_numpy(n, sizes, dim, seed):
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    sr, sv = rand_signs(rng, n, dim), rand_signs(rng, int(starts[-1]), dim)
    got = kernels.sign_subtask_means(pack_sign(sr, dim), pack_sign(sv, dim), starts, dim)
    dots = (sr @ sv.T) / dim
    ref = np.stack([dots[:, starts[s]:starts[s + 1]].mean(axis=1)
                    for s in range(len(sizes))], axis=1)
    assert got.dtype == np.float32 and got.shape == (n, len(sizes))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def int_means_reference(lr, rn, lv, vn, starts):
    dots = (lr @ lv.T).astype(np.float64)
    denom = np.outer(rn.astype(np.float64), vn.astype(np.float64))
    cos = np.divide(dots, denom, out=np.zeros_like(dots), where=denom != 0)
    return np.stack([cos[:, starts[s]:starts[s + 1]].mean(axis=1)
                     for s in range(len(starts) - 1)], axis=1)


@SETTINGS
@given(n=counts, sizes=subtask_sizes, dim=dims, bits=st.sampled_from([8, 4, 2]),
       seed=st.integers(0, 2**32 - 1))
def test_int_subtask_means_matches_numpy(n, sizes, dim, bits, seed):
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    nv = int(starts[-1])
    lr, lv = rand_levels(rng, n, dim, bits), rand_levels(rng, nv, dim, bits)
    lr[0] = 0  # an all-zero row: norm 0, cosine 0
    rn = np.sqrt((lr.astype(np.float64) ** 2).sum(1)).astype(np.float32)
    vn = np.sqrt((lv.astype(np.float64) ** 2).sum(1)).astype(np.float32)
    vn[rng.random(nv) < 0.2] = 0  # a val with norm 0 counts as cosine 0
    got = kernels.int_subtask_means(pack_levels(lr, bits, dim), rn, pack_levels(lv, bits, dim),
                                    vn, starts, bits, dim)
    assert got.dtype == np.float32 and got.shape == (n, len(sizes))
    np.testing.assert_allclose(got, int_means_reference(lr, rn, lv, vn, starts),
                               rtol=1e-5, atol=1e-6)
    assert (got[0] == 0).all()


def test_subtask_means_mmlu_shape_readonly_unaligned():
    # 285 vals in 57 subtasks of unequal sizes (one of size 1), d not a multiple of 64
    rng = np.random.default_rng(5)
    sizes = np.full(57, 5)
    sizes[0], sizes[1], sizes[2], sizes[3] = 1, 9, 2, 8
    assert sizes.sum() == 285
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    nv = int(starts[-1])
    dim = 1000
    sr, sv = rand_signs(rng, 13, dim), rand_signs(rng, nv, dim)
    dots = (sr @ sv.T) / dim
    ref = np.stack([dots[:, starts[s]:starts[s + 1]].mean(1) for s in range(57)], axis=1)
    for r in variants(pack_sign(sr, dim)):
        for v in variants(pack_sign(sv, dim)):
            got = kernels.sign_subtask_means(r, v, starts, dim)
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    lr, lv = rand_levels(rng, 13, dim, 8), rand_levels(rng, nv, dim, 8)
    rn = np.sqrt((lr ** 2).sum(1)).astype(np.float32)
    vn = np.sqrt((lv ** 2).sum(1)).astype(np.float32)
    ref = int_means_reference(lr, rn, lv, vn, starts)
    for r in variants(pack_levels(lr, 8, dim)):
        got = kernels.int_subtask_means(r, readonly(rn), readonly(pack_levels(lv, 8, dim)),
                                        vn, starts, 8, dim)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)



# ---- weighted subtask sums ---------------------------------------------------------------


def weighted_reference(sr, sv, w, starts):
    """float64 sum over each subtask of w[j] * <row, v_j> (+/-1 dot)."""
    terms = (sr @ sv.T).astype(np.float64) * w.astype(np.float64)
    return np.stack([terms[:, starts[s]:starts[s + 1]].sum(axis=1)
                     for s in range(len(starts) - 1)], axis=1)


def assert_weighted_close(got, sr, sv, w, starts):
    ref = weighted_reference(sr, sv, w, starts)
    # float64 sum rounded once to float32; scale bounds the terms when they cancel
    scale = weighted_reference(np.abs(sr), np.abs(sv), np.abs(w), starts)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert (np.abs(got - ref) <= 1e-6 * np.abs(ref) + 1e-12 * scale + 1e-30).all()


@st.composite
def weighted_case(draw):
    sizes = draw(subtask_sizes)
    nv = sum(sizes)
    w = draw(st.lists(st.floats(-1e3, 1e3, width=32), min_size=nv, max_size=nv))
    return sizes, np.array(w, np.float32)


@SETTINGS
@given(n=counts, case=weighted_case(), dim=dims, seed=st.integers(0, 2**32 - 1))
def test_sign_subtask_weighted_matches_numpy(n, case, dim, seed):
    # unequal and size-1 subtasks, negative and zero weights, read-only inputs
    sizes, w = case
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    sr, sv = rand_signs(rng, n, dim), rand_signs(rng, int(starts[-1]), dim)
    pr, pv = pack_sign(sr, dim), pack_sign(sv, dim)
    for r, v, ww in [(pr, pv, w), (readonly(pr), readonly(pv), readonly(w))]:
        got = kernels.sign_subtask_weighted(r, v, ww, starts, dim)
        assert_weighted_close(got, sr, sv, w, starts)


@SETTINGS
@given(n=counts, sizes=subtask_sizes, dim=dims, seed=st.integers(0, 2**32 - 1))
def test_sign_subtask_weighted_generalizes_means(n, sizes, dim, seed):
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    a = pack_sign(rand_signs(rng, n, dim), dim)
    v = pack_sign(rand_signs(rng, int(starts[-1]), dim), dim)
    counts_ = np.diff(starts)
    w = np.repeat(1.0 / (counts_ * dim), counts_).astype(np.float32)
    np.testing.assert_allclose(kernels.sign_subtask_weighted(a, v, w, starts, dim),
                               kernels.sign_subtask_means(a, v, starts, dim),
                               rtol=1e-6, atol=1e-7)


def test_sign_subtask_weighted_mmlu_shape_readonly_unaligned():
    rng = np.random.default_rng(6)
    sizes = np.full(57, 5)
    sizes[0], sizes[1], sizes[2], sizes[3] = 1, 9, 2, 8
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    nv = int(starts[-1])
    dim = 8192 - 64 + 5
    sr, sv = rand_signs(rng, 9, dim), rand_signs(rng, nv, dim)  # 9 rows: blocks of 4 + 1
    w = rng.standard_normal(nv).astype(np.float32)
    w[::7] *= -100.0
    for r in variants(pack_sign(sr, dim)):
        for v in variants(pack_sign(sv, dim)):
            for ww in (w, readonly(w), w.astype(np.float64), list(w)):
                got = kernels.sign_subtask_weighted(r, v, ww, starts, dim)
                assert_weighted_close(got, sr, sv, w, starts)
    empty = kernels.sign_subtask_weighted(pack_sign(sr, dim)[:0], pack_sign(sv, dim), w,
                                          starts, dim)
    assert empty.dtype == np.float32 and empty.shape == (0, 57)


def test_sign_subtask_weighted_errors():
    a = np.zeros((2, 8), np.uint8)
    st2 = np.array([0, 1, 2])
    for bad, match in [(np.ones(3, np.float32), "1-D float array of 2"),
                       (np.ones((2, 1), np.float32), "1-D float array of 2"),
                       (np.array(["a", "b"]), "1-D float array of 2"),
                       (np.array([1.0, np.nan], np.float32), "value 1 is not finite"),
                       (np.array([-np.inf, 1.0]), "value 0 is not finite"),
                       (np.array([1.0, 1e300]), "value 1 is not finite in float32")]:
        with pytest.raises(SchemaMismatchError, match=match):
            kernels.sign_subtask_weighted(a, a, bad, st2, 64)
    with pytest.raises(SchemaMismatchError, match="empty"):
        kernels.sign_subtask_weighted(a, a, np.ones(2), np.array([0, 0, 2]), 64)
    with pytest.raises(SchemaMismatchError, match="row widths differ"):
        kernels.sign_subtask_weighted(a, np.zeros((2, 16), np.uint8), np.ones(2), st2, 64)


# ---- errors ------------------------------------------------------------------------------


def test_errors_are_clear():
    a = np.zeros((2, 16), np.uint8)
    with pytest.raises(SchemaMismatchError, match="row widths differ"):
        kernels.sign_dot(a, np.zeros((2, 8), np.uint8), 64)
    with pytest.raises(SchemaMismatchError, match="multiple of 8"):
        kernels.sign_dot(np.zeros((2, 12), np.uint8), np.zeros((2, 12), np.uint8), 64)
    with pytest.raises(SchemaMismatchError, match="cannot hold"):
        kernels.int_dot(a, a, 8, 17)
    with pytest.raises(SchemaMismatchError, match="bits 8, 4 or 2"):
        kernels.int_dot(a, a, 3, 16)
    with pytest.raises(SchemaMismatchError, match="uint8"):
        kernels.sign_dot(a.astype(np.int64), a, 64)
    with pytest.raises(SchemaMismatchError, match="empty"):
        kernels.sign_subtask_means(a, a, np.array([0, 0, 2]), 64)
    with pytest.raises(SchemaMismatchError, match="starts"):
        kernels.sign_subtask_means(a, a, np.array([0, 1]), 64)
    with pytest.raises(SchemaMismatchError, match="norms"):
        kernels.int_subtask_means(a, np.ones(3), a, np.ones(2), np.array([0, 2]), 8, 16)
    with pytest.raises(SchemaMismatchError, match="queries"):
        kernels.float_dot(a, "absmax8", 16, np.zeros((1, 15), np.float32))
    with pytest.raises(SchemaMismatchError, match="stores"):
        kernels.float_dot(a, "sign1", 64, np.zeros((1, 64), np.float32))


# ---- the portable (non-VNNI) loop --------------------------------------------------------

_FALLBACK = """
import numpy as np
from gradstore import kernels
assert not kernels.HAS_VNNI
rng = np.random.default_rng(0)
for bits in (8, 4, 2):
    L = 2 ** (bits - 1) - 1
    for dim in (1, 301):
        la = rng.integers(-L, L + 1, (6, dim)); lb = rng.integers(-L, L + 1, (5, dim))
        o = 1 << (bits - 1); nf = 8 // bits; w = ((dim * bits + 7) // 8 + 7) // 8 * 8
        def pack(lv):
            u = np.full((lv.shape[0], w * nf), o, np.int64); u[:, :dim] = lv + o
            u = u.reshape(lv.shape[0], w, nf)
            return sum(u[:, :, t] << (bits * t) for t in range(nf)).astype(np.uint8)
        assert (kernels.int_dot(pack(la), pack(lb), bits, dim) == la @ lb.T).all(), (bits, dim)
print("ok")
"""


def test_portable_int_loop_without_vnni(tmp_path):
    if not kernels.HAS_VNNI:
        pytest.skip("this CPU already runs the portable loop in every other test")
    env = dict(os.environ, GRADSTORE_NO_VNNI="1", NUMBA_CACHE_DIR=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", _FALLBACK], check=False, env=env,
                         capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"

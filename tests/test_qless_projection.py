"""Seeded Rademacher projections: JL property, determinism, exact values, sparse vs dense."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qless.projection import (
    DenseRademacher,
    SparseRademacher,
    make_projection,
    splitmix64,
)

M64 = (1 << 64) - 1
GOLDEN, C1, C2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def py_splitmix(x: int) -> int:
    """splitmix64 finalizer of x + golden in plain Python ints: an independent reference."""
    z = (x + GOLDEN) & M64
    z = ((z ^ (z >> 30)) * C1) & M64
    z = ((z ^ (z >> 27)) * C2) & M64
    return z ^ (z >> 31)


def py_key(seed: int, domain: int, k: int = 0) -> int:
    return py_splitmix(py_splitmix(py_splitmix(seed) ^ domain) ^ k)


def test_splitmix_matches_python_ints_and_known_value():
    xs = np.array([0, 1, 2, 12345, M64], dtype=np.uint64)
    assert [int(v) for v in splitmix64(xs)] == [py_splitmix(int(x)) for x in xs]
    # The first output of the reference splitmix64 generator seeded with 0.
    assert py_splitmix(0) == 0xE220A8397B1DCDAF


def test_sparse_exact_values_tiny_case():
    D, d, seed = 5, 4, 7
    key = py_key(seed, 0x5350415253450000, 0)
    expected = np.zeros((D, d), dtype=np.float32)
    for j in range(D):
        z = py_splitmix((key + j * GOLDEN) & M64)
        expected[j, ((z >> 32) * d) >> 32] = 1.0 if z & 1 else -1.0
    P = SparseRademacher(D, dim=d, seed=seed)
    np.testing.assert_array_equal(P.project(np.eye(D, dtype=np.float32)), expected)


def test_dense_exact_values_tiny_case():
    D, d, seed = 11, 10, 3
    key = py_key(seed, 0x44454E5345000000, 0)
    wpr = -(-d // 8)
    expected = np.zeros((D, d), dtype=np.float64)
    for j in range(D):
        for c in range(d):
            z = py_splitmix((key + ((j // 8) * wpr + c // 8) * GOLDEN) & M64)
            bit = (z >> (8 * (c % 8) + j % 8)) & 1
            expected[j, c] = (1.0 if bit else -1.0) / np.sqrt(d)
    P = DenseRademacher(D, dim=d, seed=seed)
    np.testing.assert_allclose(P.rows(0, D), expected, rtol=1e-6)
    np.testing.assert_allclose(P.project(np.eye(D, dtype=np.float32)), expected, rtol=1e-5)
    Pm = DenseRademacher(D, dim=d, seed=seed, materialize=True)
    np.testing.assert_allclose(Pm.project(np.eye(D, dtype=np.float32)), expected, rtol=1e-6)


def test_dense_chunked_equals_one_shot():
    D, d = 1003, 136
    P = DenseRademacher(D, dim=d, seed=1)
    full = P.rows(0, D)
    parts = np.concatenate([P.rows(0, 5), P.rows(5, 8), P.rows(8, 517), P.rows(517, D)])
    np.testing.assert_array_equal(full, parts)
    x = np.random.default_rng(0).standard_normal((3, D)).astype(np.float32)
    ref = x.astype(np.float64) @ full.astype(np.float64)
    np.testing.assert_allclose(P.project(x), ref, atol=1e-4)  # numba kernel
    for chunk in (8, 64, 1000):
        Pc = DenseRademacher(D, dim=d, seed=1, chunk_rows=chunk, materialize=True)
        np.testing.assert_allclose(Pc.project(x), ref, atol=1e-4)


@pytest.mark.parametrize("cls", [SparseRademacher, DenseRademacher])
def test_determinism_and_spec_roundtrip(cls):
    D = 3001
    x = np.random.default_rng(1).standard_normal((2, D)).astype(np.float32)
    a, b = cls(D, dim=256, seed=5), cls(D, dim=256, seed=5)
    np.testing.assert_array_equal(a.project(x), b.project(x))
    spec = json.loads(json.dumps(a.spec()))
    assert {"kind", "seed", "dim", "input_dim"} <= set(spec)
    np.testing.assert_array_equal(make_projection(spec).project(x), a.project(x))
    assert not np.array_equal(cls(D, dim=256, seed=6).project(x), a.project(x))
    # torch in, torch out; a 1-D vector is one row
    t = a.project(torch.from_numpy(x))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), a.project(x), rtol=1e-6, atol=1e-5)
    assert a.project(x[0]).shape == (1, 256)
    with pytest.raises(ValueError, match="length 3001"):
        a.project(x[:, :10])


def test_make_projection_rejects_unknown():
    with pytest.raises(ValueError, match="unknown projection kind"):
        make_projection({"kind": "gaussian", "seed": 0, "dim": 8, "input_dim": 8})


def _inner_product_errors(P, x):
    y = P.project(x).astype(np.float64)
    xx = x.astype(np.float64)
    G, H = xx @ xx.T, y @ y.T
    norms = np.sqrt(np.outer(np.diag(G), np.diag(G)))
    return (H - G) / norms  # error relative to |x_i||x_j|: JL says O(1/sqrt(d))


def test_jl_inner_products_sparse():
    D, d = 100_000, 8192
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, D)).astype(np.float32)
    x[1] = 0.6 * x[0] + 0.8 * x[1]  # a correlated pair
    err = _inner_product_errors(SparseRademacher(D, dim=d, seed=0), x)
    assert np.abs(err).max() < 6 / np.sqrt(d)  # 1/sqrt(8192) = 0.011
    for nnz in (4,):
        err = _inner_product_errors(SparseRademacher(D, dim=d, seed=0, nnz=nnz), x)
        assert np.abs(err).max() < 6 / np.sqrt(d)


def test_jl_inner_products_dense_and_agreement_with_sparse():
    D, d = 100_000, 8192
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, D)).astype(np.float32)
    x[1] = 0.6 * x[0] + 0.8 * x[1]
    dense = _inner_product_errors(DenseRademacher(D, dim=d, seed=0), x)
    sparse = _inner_product_errors(SparseRademacher(D, dim=d, seed=0), x)
    assert np.abs(dense).max() < 6 / np.sqrt(d)
    # statistically the same: both errors at the JL scale, similar spread
    ratio = np.std(dense) / np.std(sparse)
    assert 0.3 < ratio < 3
    # and the cosines they report agree
    yd = DenseRademacher(D, dim=d, seed=0).project(x[:2])
    ys = SparseRademacher(D, dim=d, seed=0).project(x[:2])
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert abs(cos(yd[0], yd[1]) - 0.6) < 0.05
    assert abs(cos(ys[0], ys[1]) - 0.6) < 0.05


@pytest.mark.parametrize("nnz", [1, 3])
def test_sparse_column_chunks_give_the_same_sums(monkeypatch, nnz):
    """Chunks of 7 columns (not dividing 100) equal one whole-row step, bit for bit, and the
    explicit matrix product."""
    from qless import projection

    x = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    P = SparseRademacher(100, dim=16, seed=5, nnz=nnz)
    whole = P.project(x)
    monkeypatch.setattr(projection, "CHUNK", 7)
    np.testing.assert_array_equal(P.project(x), whole)
    matrix = np.zeros((100, 16))
    for k in range(nnz):
        b, s = P.hash(k, 0, 100)
        np.add.at(matrix, (np.arange(100), b), s)
    np.testing.assert_allclose(whole, x.astype(np.float64) @ matrix / nnz**0.5, rtol=1e-6, atol=1e-6)


# -- a row projected piece by piece (the fused gradient path: one LoRA module at a time) --

PROJECTIONS = {
    "sparse nnz 1": lambda D, d: SparseRademacher(D, dim=d, seed=3),
    "sparse nnz 2": lambda D, d: SparseRademacher(D, dim=d, seed=3, nnz=2),
    "dense (numba)": lambda D, d: DenseRademacher(D, dim=d, seed=3),
    "dense (materialized)": lambda D, d: DenseRademacher(D, dim=d, seed=3, chunk_rows=16, materialize=True),
}


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(sorted(PROJECTIONS)), n=st.integers(1, 4), D=st.integers(1, 300),
       d=st.integers(2, 40), chunk=st.sampled_from([7, 16, 1 << 14]), data=st.data())
def test_accumulate_over_column_pieces_equals_project(kind, n, D, d, chunk, data):
    """Any split of the columns (ranges off the groups of 8 and the column chunks included),
    accumulated piece by piece, gives `project` of the whole row."""
    from qless import projection

    P = PROJECTIONS[kind](D, d)
    x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal((n, D)).astype(np.float32)
    cuts = sorted(data.draw(st.lists(st.integers(0, D), max_size=6)))
    old, projection.CHUNK = projection.CHUNK, chunk  # chunks that do and do not divide the pieces
    try:
        whole = P.project(x)
        out = P.accumulator(n, "cpu")
        for a, b in zip([0] + cuts, cuts + [D]):
            P.accumulate(out, torch.from_numpy(x[:, a:b]), a)
        pieces = P.finish(out)
    finally:
        projection.CHUNK = old
    assert pieces.dtype == torch.float32 and pieces.shape == (n, d)
    np.testing.assert_allclose(pieces.numpy(), whole, rtol=1e-6, atol=1e-6 * np.abs(whole).max())


def test_accumulate_rejects_a_range_outside_the_row():
    P = SparseRademacher(10, dim=4)
    out = P.accumulator(1, "cpu")
    with pytest.raises(ValueError, match="column range"):
        P.accumulate(out, torch.zeros(1, 4), 8)
    with pytest.raises(ValueError, match="column range"):
        P.accumulate(out, torch.zeros(4), 0)

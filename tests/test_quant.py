import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gradstore import InvalidVectorError, SchemaMismatchError, parse_encoding
from gradstore.encodings import all_names
from gradstore.quant import (
    QuantizedRows,
    dequantize,
    quantize,
    quantize_reference,
    set_scale,
    unpack_levels,
)

QUANTIZED = [n for n in all_names() if n.startswith("abs")]
GLOBAL = [f"{n}-global" for n in QUANTIZED]
EVERY = all_names() + GLOBAL
PADDING_BYTE = {8: 0x80, 4: 0x88, 2: 0xAA}  # level 0 = the offset 2**(k-1) in every field


# Subnormals to 1e37: large, yet a row's length still fits float32 (that limit is tested apart).
wide = st.floats(-(2.0**123), 2.0**123, width=32)


@st.composite
def matrices(draw, elements=wide, max_rows=5, max_dim=70):
    """Float32 (n, d) matrices, some rows all zero, d rarely a multiple of 8."""
    n = draw(st.integers(0, max_rows))
    d = draw(st.integers(1, max_dim))
    x = draw(arrays(np.float32, (n, d), elements=elements))
    zero_rows = draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=2)) if n else []
    x[zero_rows] = 0
    return x


# Away from float32's subnormals, where a scale of max|x| / L loses its precision.
moderate = st.one_of(st.just(0.0), st.floats(2**-10, 1e3, width=32),
                     st.floats(-1e3, -(2**-10), width=32))


def cosines(a, b):
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (a @ b.T) / np.outer(na, nb)
    return np.nan_to_num(c)


# --- the fast path against the reference -------------------------------------------------

@pytest.mark.parametrize("name", EVERY)
@settings(max_examples=40, deadline=None)
@given(x=matrices())
def test_fast_path_matches_reference(name, x):
    enc = parse_encoding(name)
    # the same s for both: the set scale is tested on its own below
    scale = set_scale(x, enc) if enc.global_scale and x.any() else None
    fast = quantize(x, enc, global_scale=scale)
    ref = quantize_reference(x, enc, global_scale=scale)
    assert fast.payload.dtype == np.uint8
    assert fast.payload.shape == (len(x), enc.row_bytes(x.shape[1]))
    assert fast.scale.dtype == np.float32 and fast.norm.dtype == np.float32
    np.testing.assert_array_equal(fast.payload, ref.payload)
    # atol: a scale in float32's subnormal range keeps only a few bits
    np.testing.assert_allclose(fast.scale, ref.scale, rtol=1e-6, atol=1e-43)
    np.testing.assert_allclose(fast.norm, ref.norm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", GLOBAL)
@settings(max_examples=20, deadline=None)
@given(x=matrices(elements=moderate))
def test_global_encoding_takes_the_set_scale_of_x(name, x):
    base = name.removesuffix("-global")
    s = set_scale(x, base)
    np.testing.assert_array_equal(quantize(x, name).payload,
                                  quantize(x, base, global_scale=s).payload)


# --- exact layout ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,x,expected", [
    ("absmax8", [127, -127, 0], [0xFF, 0x01, 0x80] + [0x80] * 5),
    ("absmax4", [7, -7, 0], [0x1F, 0x88] + [0x88] * 6),
    ("absmax2", [1, -1, 0, 1, 1], [0xE7, 0xAB] + [0xAA] * 6),
    ("sign1", [1, -1, 0, 2, -0.0], [0x09] + [0] * 7),
])
def test_packed_bytes_follow_the_layout(name, x, expected):
    q = quantize(np.array([x], np.float32), name)
    assert q.payload.tolist() == [expected]
    assert quantize_reference(np.array([x], np.float32), name).payload.tolist() == [expected]


@pytest.mark.parametrize("name,width", [("f32", "<f4"), ("f16", "<f2")])
def test_float_rows_are_little_endian_unit_vectors(name, width):
    x = np.array([[3, 4, 0]], np.float32)
    q = quantize(x, name)
    assert q.payload.shape == (1, 16 if name == "f32" else 8)
    np.testing.assert_array_equal(q.payload[0].view(width)[:3], np.array([0.6, 0.8, 0], width))
    assert not q.payload[0, 3 * np.dtype(width).itemsize:].any()
    assert q.scale.tolist() == [5.0]


@pytest.mark.parametrize("name", all_names())
@pytest.mark.parametrize("dim", [1, 5, 13, 37, 61, 67])
def test_padding_holds_the_neutral_value(name, dim):
    enc = parse_encoding(name)
    x = np.random.default_rng(dim).standard_normal((3, dim)).astype(np.float32) + 5
    payload = quantize(x, enc).payload
    rb = enc.row_bytes(dim)
    assert payload.shape == (3, rb) and rb % 8 == 0
    if enc.is_float:
        assert not payload[:, dim * enc.bits // 8:].any()
    elif enc.kind == "sign":
        bits = np.unpackbits(payload, axis=1, bitorder="little")
        assert bits[:, :dim].all() and not bits[:, dim:].any()
    else:
        slots = rb * 8 // enc.bits  # read every field of the row, the padding ones too
        assert not unpack_levels(payload, enc, slots)[:, dim:].any()
        assert (payload[:, (dim * enc.bits + 7) // 8:] == PADDING_BYTE[enc.bits]).all()


# --- round trips and invariants -----------------------------------------------------------

@pytest.mark.parametrize("name", QUANTIZED)
@settings(max_examples=40, deadline=None)
@given(x=matrices(elements=moderate))
def test_round_trip_error_is_within_half_a_step(name, x):
    enc = parse_encoding(name)
    q = quantize(x, enc)
    back = dequantize(q.payload, q.scale, enc, x.shape[1])
    step = q.scale[:, None].astype(np.float64)  # = |x| * s / L
    err = np.abs(back.astype(np.float64) - x)
    unclipped = np.abs(x) <= step * (enc.levels + 0.5)
    tol = step / 2 * (1 + 1e-5) + 1e-6 * np.abs(x) + 1e-30
    assert (err <= tol)[unclipped].all()
    if enc.kind == "absmax":
        assert unclipped.all()


@pytest.mark.parametrize("name,rel", [("f32", 1e-6), ("f16", 2 ** -10)])
@settings(max_examples=40, deadline=None)
@given(x=matrices(elements=moderate))
def test_float_round_trip(name, rel, x):
    q = quantize(x, name)
    back = dequantize(q.payload, q.scale, name, x.shape[1])
    length = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    assert (np.abs(back - x) <= rel * length + 1e-30).all()


@settings(max_examples=40, deadline=None)
@given(x=matrices(elements=moderate))
def test_sign_round_trip_recovers_the_signs(x):
    q = quantize(x, "sign1")
    back = dequantize(q.payload, q.scale, "sign1", x.shape[1])
    levels = unpack_levels(q.payload, "sign1", x.shape[1])
    np.testing.assert_array_equal(levels, np.where(x > 0, 1, -1))
    length = np.linalg.norm(x.astype(np.float64), axis=1)
    np.testing.assert_allclose(np.linalg.norm(back, axis=1), length, rtol=1e-5)


@pytest.mark.parametrize("name", QUANTIZED + GLOBAL)
@settings(max_examples=25, deadline=None)
@given(x=matrices(), factor=st.sampled_from([0.1, 0.5, 1.0, 3.0]))
def test_levels_stay_within_range(name, x, factor):
    enc = parse_encoding(name)
    # a global scale below a row's own s makes that row clip
    s = set_scale(x, enc) * factor if enc.global_scale and x.any() else None
    levels = unpack_levels(quantize(x, enc, global_scale=s).payload, enc, x.shape[1])
    assert (np.abs(levels) <= enc.levels).all()
    np.testing.assert_array_equal(levels, np.rint(levels))


@pytest.mark.parametrize("name", EVERY)
@settings(max_examples=25, deadline=None)
@given(x=matrices())
def test_norm_is_the_norm_of_the_stored_levels(name, x):
    q = quantize(x, name)
    levels = unpack_levels(q.payload, name, x.shape[1]).astype(np.float64)
    np.testing.assert_allclose(q.norm, np.linalg.norm(levels, axis=1), rtol=1e-6)


@pytest.mark.parametrize("name", EVERY)
@settings(max_examples=20, deadline=None)
@given(a=matrices(elements=moderate, max_dim=40), data=st.data())
def test_cosine_from_levels_equals_cosine_of_dequantized(name, a, data):
    d = a.shape[1]
    b = data.draw(arrays(np.float32, (3, d), elements=moderate))
    qa, qb = quantize(a, name), quantize(b, name)
    la, lb = unpack_levels(qa.payload, name, d), unpack_levels(qb.payload, name, d)
    with np.errstate(invalid="ignore", divide="ignore"):
        from_levels = np.nan_to_num((la.astype(np.float64) @ lb.T) / np.outer(qa.norm, qb.norm))
    expected = cosines(dequantize(qa.payload, qa.scale, name, d).astype(np.float64),
                       dequantize(qb.payload, qb.scale, name, d).astype(np.float64))
    # an all-zero row dequantizes to 0, yet in sign1 it stores all -1 levels with norm sqrt(d)
    both = np.outer(a.any(axis=1), b.any(axis=1))
    np.testing.assert_allclose(from_levels[both], expected[both], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", EVERY)
@pytest.mark.parametrize("quantizer", [quantize, quantize_reference])
def test_all_zero_rows(name, quantizer):
    enc = parse_encoding(name)
    x = np.zeros((2, 13), np.float32)
    x[1, 4] = 2.0
    q = quantizer(x, enc)
    assert q.scale[0] == 0
    assert q.norm[0] == (math.sqrt(13) if enc.kind == "sign" else 0)
    if enc.is_float or enc.kind == "sign":
        assert not q.payload[0].any()
    else:
        assert (q.payload[0] == PADDING_BYTE[enc.bits]).all()
    assert not dequantize(q.payload, q.scale, enc, 13)[0].any()


def test_empty_input_gives_empty_rows():
    for name in EVERY:
        q = quantize(np.zeros((0, 9), np.float32), name)
        assert q.payload.shape == (0, parse_encoding(name).row_bytes(9))
        assert q.scale.shape == q.norm.shape == (0,)
        assert dequantize(q.payload, q.scale, name, 9).shape == (0, 9)


# --- rounding and clipping ----------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("quantizer", [quantize, quantize_reference])
def test_absmax_ties_round_to_even(bits, quantizer):
    L = 2 ** (bits - 1) - 1
    # max|x| = 2L puts u*L/s at x/2, so odd x land exactly on halves
    halves = np.arange(-2 * L + 1, 2 * L, 2, dtype=np.float32)
    x = np.concatenate([[2 * L], halves]).astype(np.float32)[None, :]
    levels = unpack_levels(quantizer(x, f"absmax{bits}").payload, f"absmax{bits}", x.shape[1])
    expected = np.concatenate([[L], 2 * np.round(halves / 4)])  # the even neighbour of x/2
    np.testing.assert_array_equal(levels[0], expected)
    assert (levels[0, 1:] % 2 == 0).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("quantizer", [quantize, quantize_reference])
def test_absmean_ties_round_to_even_and_clip(bits, quantizer):
    L = 2 ** (bits - 1) - 1
    halves = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5]
    d = 16
    # the last entry makes sum|x| = L * d, so u*L/s = x exactly
    x = np.array([halves + [0.0] * 9 + [L * d - sum(abs(h) for h in halves)]], np.float32)
    assert np.abs(x).sum() == L * d
    name = f"absmean{bits}"
    levels = unpack_levels(quantizer(x, name).payload, name, d)
    expected = np.clip([0, 2, 2, 0, -2, -2] + [0] * 9 + [L], -L, L)
    np.testing.assert_array_equal(levels[0], expected)


@pytest.mark.parametrize("quantizer", [quantize, quantize_reference])
def test_absmean_clips_above_the_mean_to_L(quantizer):
    x = np.array([[10, 1, -1, 0, -9]], np.float32)  # mean|x| = 4.2
    levels = unpack_levels(quantizer(x, "absmean4").payload, "absmean4", 5)
    np.testing.assert_array_equal(levels[0], [7, 2, -2, 0, -7])  # 10*7/4.2 and 9*7/4.2 clip
    ternary = unpack_levels(quantizer(x, "absmean2").payload, "absmean2", 5)
    np.testing.assert_array_equal(ternary[0], [1, 0, 0, 0, -1])


@pytest.mark.parametrize("bits", [8, 4, 2])
@settings(max_examples=25, deadline=None)
@given(x=matrices(elements=moderate))
def test_absmean_clips_exactly_the_large_coordinates(bits, x):
    enc = parse_encoding(f"absmean{bits}")
    levels = unpack_levels(quantize(x, enc).payload, enc, x.shape[1])
    mean = np.abs(x.astype(np.float64)).mean(axis=1, keepdims=True)
    # |u| * L / s beyond L - 1/2 rounds to L or beyond, so clips to L
    big = np.abs(x) * enc.levels > mean * (enc.levels - 0.5) * (1 + 1e-9)
    np.testing.assert_array_equal(levels[big], (np.sign(x) * enc.levels)[big])


# --- global scale -------------------------------------------------------------------------

def test_set_scale_is_max_or_mean_of_u_over_the_set():
    x = np.array([[3, 4, 0], [0, 0, 0], [1, -1, 1]], np.float32)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    assert set_scale(x, "absmax8") == pytest.approx(np.abs(u).max(), rel=1e-12)
    assert set_scale(x, "absmean4-global") == pytest.approx(np.abs(u).mean(), rel=1e-7)
    assert set_scale(np.zeros((2, 3), np.float32), "absmax2") == 0.0
    assert set_scale(np.zeros((0, 3), np.float32), "absmean2") == 0.0


@pytest.mark.parametrize("name", ["f32", "f16", "sign1"])
def test_set_scale_refuses_encodings_without_a_scale(name):
    with pytest.raises(SchemaMismatchError, match="no scale"):
        set_scale(np.ones((1, 3), np.float32), name)
    with pytest.raises(SchemaMismatchError, match="no global scale"):
        quantize(np.ones((1, 3), np.float32), name, global_scale=0.5)


@pytest.mark.parametrize("quantizer", [quantize, quantize_reference])
def test_global_scale_is_used_for_every_row(quantizer):
    x = np.array([[3, 4, 0, 0], [0.3, 0, 0, 0.4], [1, 1, 1, 1]], np.float32)
    q = quantizer(x, "absmax4", global_scale=0.5)
    np.testing.assert_allclose(q.scale, np.linalg.norm(x, axis=1) * 0.5 / 7, rtol=1e-6)
    levels = unpack_levels(q.payload, "absmax4", 4)
    # u = (.6, .8) -> 8.4, 11.2 -> clipped; u = .5 -> exactly L
    np.testing.assert_array_equal(levels, [[7, 7, 0, 0], [7, 0, 0, 7], [7, 7, 7, 7]])


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_global_scale_is_refused(bad):
    with pytest.raises(ValueError, match="global_scale"):
        quantize(np.ones((1, 3), np.float32), "absmax8", global_scale=bad)


def test_zero_global_scale_only_fits_an_all_zero_set():
    x = np.zeros((2, 3), np.float32)
    assert not quantize(x, "absmax8", global_scale=0.0).scale.any()
    x[1, 2] = 1
    with pytest.raises(ValueError, match="row 1"):
        quantize(x, "absmax8", global_scale=0.0)


# --- inputs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", EVERY)
def test_read_only_inputs_work(name):
    x = np.random.default_rng(1).standard_normal((4, 21)).astype(np.float32)
    x.setflags(write=False)
    q = quantize(x, name)
    np.testing.assert_array_equal(q.payload, quantize_reference(x, name).payload)
    frozen = np.frombuffer(q.payload.tobytes(), np.uint8)
    assert not frozen.flags.writeable
    levels = unpack_levels(frozen.reshape(q.payload.shape), name, 21)
    np.testing.assert_array_equal(levels, unpack_levels(frozen, name, 21))  # a flat buffer too
    np.testing.assert_array_equal(dequantize(frozen, q.scale, name, 21),
                                  dequantize(q.payload, q.scale, name, 21))


def test_encoding_objects_and_names_are_interchangeable():
    x = np.random.default_rng(2).standard_normal((3, 10)).astype(np.float32)
    by_name = quantize(x, "absmean4")
    by_enc = quantize(x, parse_encoding("absmean4"))
    assert isinstance(by_enc, QuantizedRows)
    np.testing.assert_array_equal(by_name.payload, by_enc.payload)


def test_float64_and_strided_input_are_accepted():
    x = np.random.default_rng(3).standard_normal((6, 30))
    q = quantize(x[::2, ::3], "absmax8")
    as_f32 = np.ascontiguousarray(x[::2, ::3], dtype=np.float32)
    np.testing.assert_array_equal(q.payload, quantize(as_f32, "absmax8").payload)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["f32", "absmax8", "absmean2-global", "sign1"])
@pytest.mark.parametrize("quantizer", [quantize, quantize_reference])
def test_nan_or_inf_row_is_named(bad_value, name, quantizer):
    x = np.ones((6, 9), np.float32)
    x[3, 5] = bad_value
    x[5, 0] = bad_value
    with pytest.raises(InvalidVectorError, match=r"^row 3 holds NaN or inf$"):
        quantizer(x, name)


@pytest.mark.parametrize("quantizer", [quantize, quantize_reference])
def test_a_length_beyond_float32_is_refused_where_the_scale_would_hold_it(quantizer):
    x = np.array([[1, 1], [3e38, -3e38]], np.float32)
    for name in ("f32", "f16"):
        with pytest.raises(InvalidVectorError, match="row 1 has a scale of 4.24e[+]38"):
            quantizer(x, name)
    # these scales never exceed max|x|: max|x| / 127 and the root mean square
    np.testing.assert_allclose(quantizer(x, "absmax8").scale, [1 / 127, 3e38 / 127], rtol=1e-6)
    np.testing.assert_allclose(quantizer(x, "sign1").scale, [1, 3e38], rtol=1e-6)


def test_set_scale_names_the_bad_row():
    x = np.ones((3, 4), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(InvalidVectorError, match="row 2"):
        set_scale(x, "absmean8")


@pytest.mark.parametrize("bad", [np.ones(5, np.float32), np.ones((2, 0), np.float32),
                                 np.ones((2, 3), np.int32), np.ones((1, 2, 3), np.float32)])
def test_malformed_vectors_are_refused(bad):
    with pytest.raises(SchemaMismatchError, match="shape"):
        quantize(bad, "absmax8")


@pytest.mark.parametrize("payload,dim", [(np.zeros((2, 8), np.uint8), 20),
                                         (np.zeros((2, 24), np.int8), 20),
                                         (np.zeros(12, np.uint8), 10)])
def test_malformed_payload_is_refused(payload, dim):
    with pytest.raises(SchemaMismatchError, match="uint8"):
        unpack_levels(payload, "absmax8", dim)


def test_scale_must_match_the_rows():
    q = quantize(np.ones((2, 4), np.float32), "absmax8")
    with pytest.raises(SchemaMismatchError, match="one per row"):
        dequantize(q.payload, q.scale[:1], "absmax8", 4)

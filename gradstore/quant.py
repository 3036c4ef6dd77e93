"""Quantizers and bit packing: float32 rows in, packed rows plus per-row scale and norm out.

Every row x is first L2-normalised, u = x / |x|, so only its direction is quantized; ``scale``
restores the length (dequantized = level * scale) and ``norm`` is the L2 norm of the stored
levels, so cosine needs no scale at all: cos(a, b) = <la, lb> / (norm_a * norm_b).

Encodings, most precise first (bytes per row at d = 8192):
- ``f32`` (32 KiB): u as float32; lossless but for float32 rounding, the master for requantize.
- ``f16`` (16 KiB): u as float16; relative error <= 2**-11 per coordinate, half the I/O of f32.
- ``absmax8/4/2`` (8 / 4 / 2 KiB): levels -L..L with s = max|u|, so nothing clips and the largest
  coordinate is exact, but one outlier coarsens the step for the whole row.
- ``absmean8/4/2``: s = mean|u|, a finer step for the bulk of the coordinates, but coordinates
  beyond about s clip to +/-L. At 2 bits the levels are ternary, {-1, 0, +1}.
- ``sign1`` (1 KiB): the sign bit only; scans by XOR + popcount, the cheapest, the coarsest.
``-global`` quantizes every row of a set with one s (QLESS's choice) instead of the row's own.

Layout (see encodings.py): rows padded to a multiple of 8 bytes, padding holds level 0; k-bit
levels are stored as ``level + 2**(k-1)``, 8/k fields per byte, lowest bits first; sign1 bit j is
x_j > 0 in little bit order; f32/f16 are little-endian floats.

``quantize`` is the numba fast path; ``quantize_reference`` is a plain numpy version kept only to
test it against. Both compute in float64 and sum each row in order, so they agree bit for bit.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from .encodings import QUANT_KINDS, Encoding, parse_encoding
from .errors import InvalidVectorError, SchemaMismatchError

_PARALLEL_MIN_SIZE = 1 << 18  # entries of x; about 32 rows of d = 8192


class QuantizedRows(NamedTuple):
    """Packed rows (uint8, (n, row_bytes)) with their float32 scale (n,) and level norm (n,).

    Centered rows also carry `extra` (float32 (n, 2)): CENTERED_COLUMNS, exact float norms.
    """

    payload: np.ndarray
    scale: np.ndarray
    norm: np.ndarray
    extra: np.ndarray | None = None

    def take(self, index) -> "QuantizedRows":
        """The rows at `index` (a slice or an index array), copied."""
        return QuantizedRows(self.payload[index].copy(), self.scale[index].copy(), self.norm[index].copy(),
                             None if self.extra is None else self.extra[index].copy())

    @staticmethod
    def concat(parts: "list[QuantizedRows]") -> "QuantizedRows":
        """Rows of `parts` one after another (all centered or none)."""
        extras = [p.extra for p in parts]
        return QuantizedRows(np.concatenate([p.payload for p in parts]),
                             np.concatenate([p.scale for p in parts]),
                             np.concatenate([p.norm for p in parts]),
                             None if extras[0] is None else np.concatenate(extras))


# Per-row exact values a centered row keeps beside its quantized residual direction.
CENTERED_COLUMNS = ("res_norm", "full_norm")  # |x - c|, |x|


def quantize(x: np.ndarray, enc: Encoding | str,
             global_scale: float | None = None) -> QuantizedRows:
    """Quantize the rows of x (float, (n, d)) into `enc`.

    For absmax/absmean, `global_scale` (a set-wide s from `set_scale`) replaces each row's own s;
    a ``-global`` encoding given no `global_scale` takes the set scale of x itself.
    Raises InvalidVectorError naming the first row that holds NaN or inf (or whose scale float32
    cannot hold), SchemaMismatchError for an x that is not 2-D float or a global scale given to
    an encoding without one, ValueError for a negative or non-finite global scale.
    """
    enc = _encoding(enc)
    x = _as_rows(x)
    with _threads_for(x.size):
        return _quantize(x, enc, global_scale)


def _quantize(x: np.ndarray, enc: Encoding, global_scale: float | None) -> QuantizedRows:
    n, d = x.shape
    sumsq, absmax, abssum = _row_stats(x)
    _refuse_bad_rows(sumsq)
    length = np.sqrt(sumsq)
    s = _checked_global_scale(enc, global_scale, length)
    payload = np.zeros((n, enc.row_bytes(d)), np.uint8)
    if enc.is_float:
        u = np.zeros((n, d), np.float32)
        _normalize(x, length, u)
        if enc.kind == "f16":
            half = u.astype(np.float16)
            payload.view("<f2")[:, :d] = half
            u[...] = half  # the norm must be that of the stored, rounded levels
        else:
            payload.view("<f4")[:, :d] = u
        return QuantizedRows(payload, _float32_scale(length),
                             np.sqrt(_row_stats(u)[0]).astype(np.float32))
    if enc.kind == "sign":
        _pack_signs(x, payload)
        return QuantizedRows(payload, _float32_scale(length / math.sqrt(d)),
                             np.full(n, math.sqrt(d), np.float32))
    if s is None and enc.global_scale:
        s = SetScale(enc)._add_stats(length, absmax, abssum, x.size).value
    # u*L/s is evaluated as (x * num) / den: the same value in exact arithmetic, but x * num is
    # exact in float64, so a coordinate that sits exactly on a half rounds as a half (to even)
    # instead of drifting across it through the rounding of u and s.
    L = enc.levels
    if s is not None:
        num, den = float(L), length * s
    elif enc.kind == "absmax":
        num, den = float(L), absmax
    else:
        num, den = float(L * d), abssum
    level_sumsq = np.zeros(n, np.int64)
    _pack_levels(x, num, den, enc.bits, payload, level_sumsq)
    return QuantizedRows(payload, _float32_scale(den / num),
                         np.sqrt(level_sumsq).astype(np.float32))


def quantize_centered(x: np.ndarray, centroid: np.ndarray, enc: Encoding | str,
                      quantizer=None) -> QuantizedRows:
    """Quantize the residuals x - c in `enc`'s base encoding, keeping exact norms (`extra`).

    Then <x, v> = <c, v> + |x - c| <R, v> with only the unit residual R approximated, and
    cos(x, v) divides by the exact |x| |v|. `quantizer` defaults to `quantize`.
    """
    enc = _encoding(enc)
    x = _as_rows(x)
    c = np.asarray(centroid, np.float32)
    if c.shape != (x.shape[1],) or not np.isfinite(c).all():
        raise SchemaMismatchError(f"centroid must be {x.shape[1]} finite floats, got shape {c.shape}")
    base = Encoding(enc.kind, enc.bits, enc.global_scale, centered=False)
    residual = x - c
    rows = (quantizer or quantize)(residual, base)
    extra = np.stack([np.linalg.norm(residual.astype(np.float64), axis=1),
                      np.linalg.norm(x.astype(np.float64), axis=1)], axis=1)
    return QuantizedRows(rows.payload, rows.scale, rows.norm, extra.astype(np.float32))


def quantize_reference(x: np.ndarray, enc: Encoding | str,
                       global_scale: float | None = None) -> QuantizedRows:
    """The same as `quantize`, in plain vectorised numpy; slow, for testing the fast path."""
    enc = _encoding(enc)
    x = _as_rows(x)
    n, d = x.shape
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise InvalidVectorError(f"row {int(np.argmin(finite))} holds NaN or inf")
    x64 = x.astype(np.float64)
    # cumsum adds strictly left to right, as the kernels do; np.sum's pairwise order could
    # round differently and move a coordinate that sits on a half to the other level.
    length = np.sqrt(np.cumsum(x64 * x64, axis=1)[:, -1])
    safe_length = np.where(length > 0, length, 1.0)[:, None]
    s = _checked_global_scale(enc, global_scale, length)
    rb = enc.row_bytes(d)
    if enc.is_float:
        u = (x64 / safe_length).astype(np.float32)
        u[length == 0] = 0  # all bytes zero, even for a row of -0.0
        levels = u.astype("<f4" if enc.kind == "f32" else "<f2")
        payload = np.zeros((n, rb), np.uint8)
        payload[:, :levels.itemsize * d] = levels.view(np.uint8)
        norm = np.sqrt((levels.astype(np.float64) ** 2).sum(axis=1))
        return QuantizedRows(payload, _float32_scale(length), norm.astype(np.float32))
    if enc.kind == "sign":
        bits = np.zeros((n, rb * 8), np.uint8)
        bits[:, :d] = x > 0
        return QuantizedRows(np.packbits(bits, axis=1, bitorder="little"),
                             _float32_scale(length / np.sqrt(d)),
                             np.full(n, np.sqrt(d), np.float32))
    L = enc.levels
    u = x64 / safe_length
    if s is None and enc.global_scale:
        s = (float(np.abs(u).max() if enc.kind == "absmax" else np.abs(u).mean())
             if u.size else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0/0 on all-zero rows, zeroed below
        if s is not None:
            s_row = np.full(n, s)
            t = x64 * L / (length * s_row)[:, None]
        elif enc.kind == "absmax":
            s_row = np.abs(u).max(axis=1)
            t = x64 * L / np.abs(x64).max(axis=1, keepdims=True)
        else:
            s_row = np.abs(u).mean(axis=1)
            t = x64 * (L * d) / np.cumsum(np.abs(x64), axis=1)[:, -1:]
        levels = np.clip(np.rint(t), -L, L)
    levels[length == 0] = 0
    levels = levels.astype(np.int64)
    per_byte = 8 // enc.bits
    fields = np.full((n, rb * per_byte), 2 ** (enc.bits - 1), np.int64)
    fields[:, :d] += levels
    shifts = np.arange(per_byte) * enc.bits
    payload = (fields.reshape(n, rb, per_byte) << shifts).sum(axis=2).astype(np.uint8)
    scale = length * s_row / L
    norm = np.sqrt((levels ** 2).sum(axis=1))
    return QuantizedRows(payload, _float32_scale(scale), norm.astype(np.float32))


def unpack_levels(payload: np.ndarray, enc: Encoding | str, dim: int) -> np.ndarray:
    """The stored levels of packed rows as float32 (n, dim), without the scale."""
    enc = _encoding(enc)
    payload = _as_payload(payload, enc, dim)
    n, row_bytes = payload.shape
    # Every branch copies: the payload may be a view of an LMDB buffer that dies with its
    # transaction.
    if enc.kind == "f32":
        return payload.view("<f4")[:, :dim].astype(np.float32)
    if enc.kind == "f16":
        return payload.view("<f2")[:, :dim].astype(np.float32)
    if enc.kind == "sign":
        bits = np.unpackbits(payload, axis=1, count=dim, bitorder="little")
        return bits.astype(np.float32) * 2 - 1
    per_byte = 8 // enc.bits
    shifts = (np.arange(per_byte) * enc.bits).astype(np.uint8)
    fields = (payload[:, :, None] >> shifts) & np.uint8(2 ** enc.bits - 1)
    levels = fields.reshape(n, row_bytes * per_byte)[:, :dim].astype(np.float32)
    return levels - 2 ** (enc.bits - 1)


def dequantize(payload: np.ndarray, scale: np.ndarray, enc: Encoding | str, dim: int) -> np.ndarray:
    """Packed rows back to float32 vectors (n, dim): level * scale, which approximates x."""
    levels = unpack_levels(payload, enc, dim)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.shape != (levels.shape[0],):
        raise SchemaMismatchError(
            f"scale has shape {scale.shape}, expected ({levels.shape[0]},): one per row")
    return levels * scale[:, None]


class SetScale:
    """The set-wide s of a ``-global`` encoding, streamed over batches: max|u| (absmax) or
    mean|u| (absmean) over every coordinate of every row added, u = x / |x|.

    QLESS (`quantize_gradients.py`, `compute_scale_factor`) takes one s for the training set
    over all its checkpoints and one per task over all checkpoints; requantize adds every
    checkpoint's rows of a set to one SetScale. (QLESS quantizes the raw projected gradients;
    here, as everywhere in the store, each row is normalized first.)
    """

    def __init__(self, enc: Encoding | str):
        self.enc = _encoding(enc)
        if self.enc.kind not in QUANT_KINDS:
            raise SchemaMismatchError(f"encoding {self.enc.name} has no scale; only absmax and absmean do")
        self._max = 0.0
        self._sum = 0.0
        self._size = 0

    def add(self, x: np.ndarray) -> "SetScale":
        x = _as_rows(x)
        with _threads_for(x.size):
            sumsq, absmax, abssum = _row_stats(x)
        _refuse_bad_rows(sumsq)
        return self._add_stats(np.sqrt(sumsq), absmax, abssum, x.size)

    def _add_stats(self, length: np.ndarray, absmax: np.ndarray, abssum: np.ndarray,
                   size: int) -> "SetScale":
        nonzero = length > 0  # a zero row has u = 0: it adds nothing to the max or the sum
        self._max = max(self._max, float((absmax[nonzero] / length[nonzero]).max(initial=0.0)))
        self._sum += float((abssum[nonzero] / length[nonzero]).sum())
        self._size += size
        return self

    @property
    def value(self) -> float:
        if self.enc.kind == "absmax":
            return self._max
        return self._sum / self._size if self._size else 0.0


def set_scale(x: np.ndarray, enc: Encoding | str) -> float:
    """The set-wide s of a ``-global`` encoding over the rows of x alone (see SetScale)."""
    return SetScale(enc).add(x).value


def _encoding(enc: Encoding | str) -> Encoding:
    return parse_encoding(enc) if isinstance(enc, str) else enc


def _as_rows(x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.dtype.kind != "f":
        raise SchemaMismatchError(
            f"vectors must be a float array of shape (n, dim) with dim >= 1,"
            f" got {arr.dtype} of shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _as_payload(payload: np.ndarray, enc: Encoding, dim: int) -> np.ndarray:
    arr = np.ascontiguousarray(payload)
    rb = enc.row_bytes(dim) if dim >= 1 else 0
    # A flat buffer (np.frombuffer over a stored block) is taken as whole rows.
    if arr.ndim == 1 and rb and arr.size % rb == 0:
        arr = arr.reshape(-1, rb)
    if arr.dtype != np.uint8 or arr.ndim != 2 or rb == 0 or arr.shape[1] != rb:
        raise SchemaMismatchError(
            f"{enc.name} rows of dim {dim} are uint8 (n, {rb}),"
            f" got {arr.dtype} of shape {arr.shape}")
    return arr


def _refuse_bad_rows(sumsq: np.ndarray) -> None:
    # A float32 row squares and sums to a finite float64 unless it holds NaN or inf.
    bad = np.flatnonzero(~np.isfinite(sumsq))
    if bad.size:
        raise InvalidVectorError(f"row {int(bad[0])} holds NaN or inf")


def _float32_scale(scale: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = scale.astype(np.float32)
    # A row of finite float32s can still be longer than float32 holds; its scale would be inf.
    bad = np.flatnonzero(np.isinf(out))
    if bad.size:
        raise InvalidVectorError(
            f"row {int(bad[0])} has a scale of {scale[bad[0]]:.3g}, beyond float32's range")
    return out


@contextmanager
def _threads_for(size: int):
    """Run small inputs on one thread: waking numba's pool costs more than it saves there,
    and on a busy machine a two-thread launch can stall for milliseconds."""
    if size >= _PARALLEL_MIN_SIZE:
        yield
        return
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # per calling thread, so concurrent callers are unaffected
    try:
        yield
    finally:
        numba.set_num_threads(threads)


def _checked_global_scale(enc: Encoding, given: float | None, length: np.ndarray) -> float | None:
    if given is None:
        return None
    if enc.kind not in QUANT_KINDS:
        raise SchemaMismatchError(f"encoding {enc.name} takes no global scale")
    s = float(given)
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"global_scale must be finite and >= 0, got {given!r}")
    if s == 0 and (length > 0).any():
        # s = 0 is the scale of an all-zero set; any other row would divide by it.
        raise ValueError(f"global_scale 0 cannot quantize row {int(np.argmax(length > 0))},"
                         " which is not all zeros")
    return s


# The kernels run without fastmath: reassociating the row sums or the rounding would break the
# bit-for-bit agreement with the reference that the tests hold them to.

@njit(parallel=True, cache=True, nogil=True)
def _row_stats(x):
    """Per row, in float64: sum of squares, max |x_j|, sum |x_j| (each summed left to right)."""
    n, d = x.shape
    sumsq = np.empty(n)
    absmax = np.empty(n)
    abssum = np.empty(n)
    for i in prange(n):
        q = 0.0
        m = 0.0
        a = 0.0
        for j in range(d):
            v = abs(np.float64(x[i, j]))
            q += v * v
            a += v
            m = max(m, v)
        sumsq[i] = q
        absmax[i] = m
        abssum[i] = a
    return sumsq, absmax, abssum


@njit(parallel=True, cache=True, nogil=True)
def _normalize(x, length, out):
    n, d = x.shape
    for i in prange(n):
        if length[i] > 0:
            for j in range(d):
                out[i, j] = np.float64(x[i, j]) / length[i]


@njit(parallel=True, cache=True, nogil=True)
def _pack_signs(x, out):
    n, d = x.shape
    for i in prange(n):
        for b in range(out.shape[1]):
            byte = 0
            for f in range(8):
                j = b * 8 + f
                if j < d and x[i, j] > 0:
                    byte |= 1 << f
            out[i, b] = byte


@njit(parallel=True, cache=True, nogil=True)
def _pack_levels(x, num, den, bits, out, level_sumsq):
    """Level = clip(rint(x * num / den), -L, L) per coordinate, packed 8 // bits to a byte."""
    n, d = x.shape
    lim = (1 << (bits - 1)) - 1
    offset = 1 << (bits - 1)
    per_byte = 8 // bits
    for i in prange(n):
        acc = 0
        for b in range(out.shape[1]):
            byte = 0
            for f in range(per_byte):
                j = b * per_byte + f
                level = 0
                if j < d and den[i] > 0:
                    t = np.rint(np.float64(x[i, j]) * num / den[i])
                    level = int(min(max(t, -lim), lim))
                    acc += level * level
                byte |= (level + offset) << (f * bits)
            out[i, b] = byte
        level_sumsq[i] = acc

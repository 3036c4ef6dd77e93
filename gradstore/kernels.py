"""Numba kernels over packed rows: XOR-popcount, packed k-bit dot, float queries x packed rows.

Rows are uint8 arrays ``(n, row_bytes)`` in the layout of :mod:`gradstore.encodings`
(``row_bytes`` a multiple of 8). They may be read-only (``np.frombuffer`` over an LMDB
buffer) and need not be aligned; every kernel accepts both.

Implementations and their trade-offs:

- ``sign_dot`` / ``sign_subtask_weighted`` / ``sign_subtask_means``:
  ``<s_a, s_b> = dim - 2 popcount(a XOR b)`` over uint64 words, LLVM ``ctpop`` (vectorized
  to ``vpopcntq`` where the CPU has it). Four rows share each load of a query word. A row
  block that is not 8-byte aligned is viewed as unaligned uint64 (measured as fast as an
  aligned copy on x86, so no copy is made).
  ``sign_subtask_weighted`` sums each subtask's contiguous vals with per-val weights (float64).
  ``sign_subtask_means`` (equal weights) counts instead: for subtask s of n_s rows, let
  cnt_j be how many of its rows have bit j set, stored as bit_length(n_s) bit planes P_k;
  then sum_v popcount(g ^ v) = sum_j cnt_j + n_s popcount(g) - 2 sum_k 2^k popcount(g & P_k),
  so a subtask of 5 rows costs 3 AND-popcount passes instead of 5 XOR-popcount passes
  (exact; MMLU's 285 rows in 57 subtasks: 171 passes + 1 instead of 285).
- ``int_dot`` / ``int_subtask_means`` (bits 8, 4, 2): the query side is unpacked once into
  signed int8 level planes; a row's fields stay unsigned (``u = level + o``, ``o = 2**(k-1)``)
  and ``<l_a, l_b> = sum(u_a * l_b) - o * sum(l_b)``. The product sum is a hand-written
  LLVM loop over 64-byte chunks, 4 rows x 4 queries per step: ``vpdpbusd`` (AVX-512 VNNI,
  u8 x s8 -> int32) where the CPU has it, else plain widening multiplies. Padding fields
  hold level 0, so they add nothing.
- ``float_dot``: float rows go straight to BLAS; packed rows are unpacked block by block
  (numba, parallel) to float32 and multiplied with BLAS; sign rows use
  ``<s, q> = 2 sum_{bit=1} q - sum q``.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import llvmlite.binding as _llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .encodings import Encoding, parse_encoding
from .errors import SchemaMismatchError

__all__ = [
    "HAS_VNNI",
    "IntQueries",
    "SignSubtasks",
    "float_dot",
    "int_dot",
    "int_subtask_means",
    "sign_dot",
    "sign_subtask_means",
    "sign_subtask_weighted",
    "single_threaded",
]

_JIT = {"nogil": True, "fastmath": True, "cache": True}
_PJIT = {"parallel": True, **_JIT}
# Float sums without fastmath: every row's sum keeps one order (see _make_fdot).
_SJIT = {"nogil": True, "cache": True}
_SPJIT = {"parallel": True, **_SJIT}


def _host_has_vnni() -> bool:
    # GRADSTORE_NO_VNNI=1 forces the portable loop (read at import: numba caches per
    # CPU, so set it together with a fresh NUMBA_CACHE_DIR when testing the fallback).
    if os.environ.get("GRADSTORE_NO_VNNI"):
        return False
    try:
        features = _llvm.get_host_cpu_features()
        return bool(features.get("avx512vnni")) and bool(features.get("avx512bw"))
    except RuntimeError:
        return False


HAS_VNNI = _host_has_vnni()

_local = threading.local()


@contextmanager
def single_threaded():
    """In this block, on this thread, `SignSubtasks.means`, `IntQueries.dot` and `float_dot`
    over float rows run on the calling thread alone: for a caller that spreads blocks over its
    own threads. (A numba parallel launch per block of 64-256 rows cost 7x the CPU of the work
    on a busy 2-core box: threads spinning at the barrier; measured in bench_plans.)"""
    before = getattr(_local, "single", False)
    _local.single = True
    try:
        yield
    finally:
        _local.single = before


def _single() -> bool:
    return getattr(_local, "single", False)

# ----------------------------------------------------------------------------------------
# LLVM building blocks
# ----------------------------------------------------------------------------------------


@intrinsic
def _popcount(typingctx, x):
    """popcount of one integer (LLVM ctpop)."""
    if isinstance(x, types.Integer):

        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return x(x), codegen
    return None


_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V64I8 = ir.VectorType(_I8, 64)
_V16I32 = ir.VectorType(_I32, 16)
_V64I32 = ir.VectorType(_I32, 64)


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _row_pointer(context, builder, aty, arr_a, rows_ty, rows, r: int):
    """Pointer to the first byte of row rows[r] of the 2-D array a (rows: a UniTuple of ints)."""
    i = context.cast(builder, builder.extract_value(rows, r), rows_ty.dtype, types.intp)
    return cgutils.get_item_pointer(context, builder, aty, arr_a, [i, ir.Constant(_I64, 0)])


def _make_udot(R: int, C: int):
    """An intrinsic ``f(a, rows, planes, j, nchunks) -> UniTuple(int32, R*C)``.

    Entry ``r*C + c`` is ``sum_p sum_t field_t(a[rows[r], p]) * planes[j+c, t, p]`` over the
    first ``nchunks * 64`` bytes, fields unsigned k-bit (k = 8 / planes.shape[1], so k = 1 reads
    sign bits as 0 / 1) and planes signed int8. Rows of ``a`` and ``planes`` must be C-contiguous in their last axis.
    """

    @intrinsic
    def udot(typingctx, a, rows, planes, j, nchunks):
        ret = types.UniTuple(types.int32, R * C)
        sig = ret(a, rows, planes, j, nchunks)

        def codegen(context, builder, signature, args):
            aty, ity, pty, jty, nty = signature.args
            av, iv, pv, jv, nv = args
            arr_a = context.make_array(aty)(context, builder, av)
            arr_p = context.make_array(pty)(context, builder, pv)
            jv = context.cast(builder, jv, jty, types.intp)
            nv = context.cast(builder, nv, nty, types.intp)
            zero = ir.Constant(_I64, 0)
            nfields = builder.extract_value(arr_p.shape, 1)

            def row_ptr(r):
                return _row_pointer(context, builder, aty, arr_a, ity, iv, r)

            def plane_ptr(c, t):
                idx = [builder.add(jv, ir.Constant(_I64, c)), ir.Constant(_I64, t), zero]
                return cgutils.get_item_pointer(context, builder, pty, arr_p, idx)

            vnni = HAS_VNNI
            acc_ty = _V16I32 if vnni else _V64I32
            accs = [cgutils.alloca_once_value(builder, ir.Constant(acc_ty, None))
                    for _ in range(R * C)]
            if vnni:
                dp = _declare(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I32,
                              [_V16I32, _V16I32, _V16I32])

            def mac(acc, x, y):
                if vnni:
                    return builder.call(dp, [acc, builder.bitcast(x, _V16I32),
                                             builder.bitcast(y, _V16I32)])
                return builder.add(acc, builder.mul(builder.zext(x, _V64I32),
                                                    builder.sext(y, _V64I32)))

            def emit(bits):
                nf = 8 // bits
                pas = [row_ptr(r) for r in range(R)]
                pqs = [[plane_ptr(c, t) for t in range(nf)] for c in range(C)]
                mask = ir.Constant(_V64I8, [(1 << bits) - 1] * 64)
                with cgutils.for_range(builder, nv) as loop:
                    off = builder.mul(loop.index, ir.Constant(_I64, 64))
                    rows = [builder.load(builder.bitcast(builder.gep(p, [off]),
                                                         _V64I8.as_pointer()), align=1)
                            for p in pas]
                    for t in range(nf):
                        if bits == 8:
                            fields = rows
                        else:
                            sh = ir.Constant(_V64I8, [bits * t] * 64)
                            fields = [builder.and_(builder.lshr(x, sh), mask) for x in rows]
                        for c in range(C):
                            q = builder.load(builder.bitcast(builder.gep(pqs[c][t], [off]),
                                                             _V64I8.as_pointer()), align=1)
                            for r in range(R):
                                k = r * C + c
                                builder.store(mac(builder.load(accs[k]), fields[r], q), accs[k])

            with builder.if_else(builder.icmp_signed("==", nfields, ir.Constant(_I64, 1))) as (
                    is8, not8):
                with is8:
                    emit(8)
                with not8:
                    is4 = builder.icmp_signed("==", nfields, ir.Constant(_I64, 2))
                    with builder.if_else(is4) as (then4, not4):
                        with then4:
                            emit(4)
                        with not4:
                            is2 = builder.icmp_signed("==", nfields, ir.Constant(_I64, 4))
                            with builder.if_else(is2) as (then2, then1):
                                with then2:
                                    emit(2)
                                with then1:
                                    emit(1)
            red = _declare(builder, f"llvm.vector.reduce.add.v{acc_ty.count}i32", _I32,
                           [acc_ty])
            vals = [builder.call(red, [builder.load(acc)]) for acc in accs]
            return context.make_tuple(builder, ret, vals)

        return sig, codegen

    return udot


_udot44 = _make_udot(4, 4)
_udot41 = _make_udot(4, 1)
_udot14 = _make_udot(1, 4)
_udot11 = _make_udot(1, 1)

_F32 = ir.FloatType()
_V16F32 = ir.VectorType(_F32, 16)
_V16F16 = ir.VectorType(ir.HalfType(), 16)


def _make_fdot(R: int, C: int):
    """An intrinsic ``f(a, rows, q, j, n, half) -> UniTuple(float32, R*C)``.

    Entry ``r*C + c`` is ``sum_{t < n} row_t * q[j+c, t]``, row ``rows[r]`` of the uint8 array ``a``
    read as float32 (``half`` 0) or float16 (``half`` 1) values, ``q`` float32. The order of
    the sum is fixed and the same for every row, whatever R and C (16 lanes of FMAs over
    64-byte chunks, an ordered lane reduction, then the tail in order), so equal rows get
    bit-identical results wherever they sit in a block (BLAS does not promise that).
    """

    @intrinsic
    def fdot(typingctx, a, rows, q, j, n, half):
        ret = types.UniTuple(types.float32, R * C)
        sig = ret(a, rows, q, j, n, half)

        def codegen(context, builder, signature, args):
            aty, ity, qty, jty, nty, hty = signature.args
            av, iv, qv, jv, nv, hv = args
            arr_a = context.make_array(aty)(context, builder, av)
            arr_q = context.make_array(qty)(context, builder, qv)
            jv = context.cast(builder, jv, jty, types.intp)
            nv = context.cast(builder, nv, nty, types.intp)
            hv = context.cast(builder, hv, hty, types.intp)
            zero = ir.Constant(_I64, 0)
            fma_v = _declare(builder, "llvm.fma.v16f32", _V16F32, [_V16F32] * 3)
            fma_s = _declare(builder, "llvm.fma.f32", _F32, [_F32] * 3)
            red = _declare(builder, "llvm.vector.reduce.fadd.v16f32", _F32, [_F32, _V16F32])
            q_ptrs = [cgutils.get_item_pointer(
                context, builder, qty, arr_q, [builder.add(jv, ir.Constant(_I64, c)), zero])
                for c in range(C)]
            raw_rows = [_row_pointer(context, builder, aty, arr_a, ity, iv, r) for r in range(R)]
            nch = builder.sdiv(nv, ir.Constant(_I64, 16))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F32, None))
                    for _ in range(R * C)]
            tails = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))
                     for _ in range(R * C)]

            def emit(elem, vec):
                ptrs = [builder.bitcast(p, elem.as_pointer()) for p in raw_rows]

                def load_row(p, off, ty):
                    x = builder.load(builder.bitcast(builder.gep(p, [off]), ty.as_pointer()), align=1)
                    return x if elem is _F32 else builder.fpext(x, _V16F32 if ty is vec else _F32)

                with cgutils.for_range(builder, nch) as loop:
                    off = builder.mul(loop.index, ir.Constant(_I64, 16))
                    rows = [load_row(p, off, vec) for p in ptrs]
                    for c in range(C):
                        qc = builder.load(builder.bitcast(builder.gep(q_ptrs[c], [off]),
                                                          _V16F32.as_pointer()), align=1)
                        for r in range(R):
                            k = r * C + c
                            builder.store(builder.call(fma_v, [rows[r], qc, builder.load(accs[k])]),
                                          accs[k])
                t0 = builder.mul(nch, ir.Constant(_I64, 16))
                with cgutils.for_range_slice(builder, t0, nv, ir.Constant(_I64, 1)) as (t, _):
                    rows = [load_row(p, t, elem) for p in ptrs]
                    for c in range(C):
                        qc = builder.load(builder.gep(q_ptrs[c], [t]), align=1)
                        for r in range(R):
                            k = r * C + c
                            builder.store(builder.call(fma_s, [rows[r], qc, builder.load(tails[k])]),
                                          tails[k])

            with builder.if_else(builder.icmp_signed("==", hv, zero)) as (is32, is16):
                with is32:
                    emit(_F32, _V16F32)
                with is16:
                    emit(ir.HalfType(), _V16F16)
            # No fast-math flags: the lane reduction runs in order, the same for every row.
            vals = [builder.fadd(builder.call(red, [ir.Constant(_F32, 0.0), builder.load(accs[k])]),
                                 builder.load(tails[k])) for k in range(R * C)]
            return context.make_tuple(builder, ret, vals)

        return sig, codegen

    return fdot


_fdot44 = _make_fdot(4, 4)
_fdot41 = _make_fdot(4, 1)
_fdot14 = _make_fdot(1, 4)
_fdot11 = _make_fdot(1, 1)

# ----------------------------------------------------------------------------------------
# Inner helpers (serial; called inside the parallel loops)
# ----------------------------------------------------------------------------------------

_RB = 4  # rows per block


@njit(**_JIT)
def _sign_block(a, i0, b, dim, out):
    """out[r, j] = <a[i0 + r], b[j]> (+/-1 dot) for r < out.shape[0]; a, b uint64 words."""
    nw = a.shape[1]
    nb = b.shape[0]
    if out.shape[0] == 4:
        for j in range(nb):
            c0 = np.uint64(0)
            c1 = np.uint64(0)
            c2 = np.uint64(0)
            c3 = np.uint64(0)
            for w in range(nw):
                y = b[j, w]
                c0 += _popcount(a[i0, w] ^ y)
                c1 += _popcount(a[i0 + 1, w] ^ y)
                c2 += _popcount(a[i0 + 2, w] ^ y)
                c3 += _popcount(a[i0 + 3, w] ^ y)
            out[0, j] = dim - 2 * np.int64(c0)
            out[1, j] = dim - 2 * np.int64(c1)
            out[2, j] = dim - 2 * np.int64(c2)
            out[3, j] = dim - 2 * np.int64(c3)
    else:
        for r in range(out.shape[0]):
            for j in range(nb):
                c = np.uint64(0)
                for w in range(nw):
                    c += _popcount(a[i0 + r, w] ^ b[j, w])
                out[r, j] = dim - 2 * np.int64(c)


@njit(**_JIT)
def _int_tail(a, i, planes, j, p0, bits):
    """sum over bytes p >= p0 of the field products (the part the 64-byte loop left)."""
    nf = planes.shape[1]
    mask = (1 << bits) - 1
    s = np.int32(0)
    for p in range(p0, a.shape[1]):
        x = np.int32(a[i, p])
        for t in range(nf):
            s += ((x >> (bits * t)) & mask) * np.int32(planes[j, t, p])
    return s


@njit(**_JIT)
def _int_block(a, at, k0, planes, qcorr, bits, out):
    """out[r, j] = <levels(a[at[k0 + r]]), levels(query j)> for r < out.shape[0]."""
    nb = planes.shape[0]
    nbytes = a.shape[1]
    nch = nbytes // 64
    p0 = nch * 64
    R = out.shape[0]
    if R == 4:
        j = 0
        while j + 4 <= nb:
            t = _udot44(a, (at[k0], at[k0 + 1], at[k0 + 2], at[k0 + 3]), planes, j, nch)
            for r in range(4):
                for c in range(4):
                    out[r, j + c] = t[r * 4 + c] - qcorr[j + c]
            j += 4
        while j < nb:
            t1 = _udot41(a, (at[k0], at[k0 + 1], at[k0 + 2], at[k0 + 3]), planes, j, nch)
            for r in range(4):
                out[r, j] = t1[r] - qcorr[j]
            j += 1
    else:
        for r in range(R):
            j = 0
            while j + 4 <= nb:
                t4 = _udot14(a, (at[k0 + r],), planes, j, nch)
                for c in range(4):
                    out[r, j + c] = t4[c] - qcorr[j + c]
                j += 4
            while j < nb:
                out[r, j] = _udot11(a, (at[k0 + r],), planes, j, nch)[0] - qcorr[j]
                j += 1
    if p0 < nbytes:
        for r in range(R):
            for j in range(nb):
                out[r, j] += _int_tail(a, at[k0 + r], planes, j, p0, bits)


@njit(**_SJIT)
def _float_block(a, at, k0, q, n, half, out):
    """out[r, j] = <float row a[at[k0 + r]], q[j]> over the first n values, for r < out.shape[0]."""
    nq = q.shape[0]
    if out.shape[0] == 4:
        j = 0
        while j + 4 <= nq:
            t = _fdot44(a, (at[k0], at[k0 + 1], at[k0 + 2], at[k0 + 3]), q, j, n, half)
            for r in range(4):
                for c in range(4):
                    out[r, j + c] = t[r * 4 + c]
            j += 4
        while j < nq:
            t1 = _fdot41(a, (at[k0], at[k0 + 1], at[k0 + 2], at[k0 + 3]), q, j, n, half)
            for r in range(4):
                out[r, j] = t1[r]
            j += 1
    else:
        for r in range(out.shape[0]):
            j = 0
            while j + 4 <= nq:
                t4 = _fdot14(a, (at[k0 + r],), q, j, n, half)
                for c in range(4):
                    out[r, j + c] = t4[c]
                j += 4
            while j < nq:
                out[r, j] = _fdot11(a, (at[k0 + r],), q, j, n, half)[0]
                j += 1


# ----------------------------------------------------------------------------------------
# Parallel kernels
# ----------------------------------------------------------------------------------------


@njit(**_SPJIT)
def _float_dot_kernel(a, at, q, n, half):
    """Rows a[at[k]], in place: at lists the rows to score (all of a, or a rerank's picks)."""
    na = at.shape[0]
    out = np.empty((na, q.shape[0]), np.float32)
    for blk in prange((na + _RB - 1) // _RB):
        k0 = blk * _RB
        k1 = min(k0 + _RB, na)
        _float_block(a, at, k0, q, n, half, out[k0:k1])
    return out


@njit(**_SJIT)
def _float_dot_serial(a, at, q, n, half):
    """_float_dot_kernel on the calling thread alone (see single_threaded)."""
    na = at.shape[0]
    out = np.empty((na, q.shape[0]), np.float32)
    for k0 in range(0, na, _RB):
        _float_block(a, at, k0, q, n, half, out[k0:min(k0 + _RB, na)])
    return out


@njit(**_PJIT)
def _sign_dot_kernel(a, b, dim):
    na = a.shape[0]
    out = np.empty((na, b.shape[0]), np.int32)
    for blk in prange((na + _RB - 1) // _RB):
        i0 = blk * _RB
        i1 = min(i0 + _RB, na)
        _sign_block(a, i0, b, dim, out[i0:i1])
    return out


@njit(**_PJIT)
def _sign_weighted_kernel(a, b, starts, weights, dim):
    """out[i, s] = sum_{starts[s] <= j < starts[s+1]} weights[j] * <a[i], b[j]> (float64 sum)."""
    na = a.shape[0]
    nb = b.shape[0]
    ns = starts.shape[0] - 1
    out = np.empty((na, ns), np.float32)
    for blk in prange((na + _RB - 1) // _RB):
        i0 = blk * _RB
        i1 = min(i0 + _RB, na)
        dots = np.empty((i1 - i0, nb), np.int32)
        _sign_block(a, i0, b, dim, dots)
        for r in range(i1 - i0):
            for s in range(ns):
                acc = 0.0
                for j in range(starts[s], starts[s + 1]):
                    acc += weights[j] * dots[r, j]
                out[i0 + r, s] = acc
    return out


@njit(**_JIT)
def _sign_counts_tile(a, i0, planes, plane_off, csum, counts, dim, out):
    """out[i0 + r, s] for the (up to 4) rows from i0: see _sign_counts_kernel."""
    nw = a.shape[1]
    ns = counts.shape[0]
    npl = planes.shape[0]
    m = min(_RB, a.shape[0] - i0)
    acc = np.zeros((_RB, npl), np.int64)
    ones = np.zeros(_RB, np.int64)
    for r in range(m):
        c = np.uint64(0)
        for w in range(nw):
            c += _popcount(a[i0 + r, w])
        ones[r] = np.int64(c)
    if m == 4:
        for p in range(npl):
            c0 = np.uint64(0)
            c1 = np.uint64(0)
            c2 = np.uint64(0)
            c3 = np.uint64(0)
            for w in range(nw):
                y = planes[p, w]
                c0 += _popcount(a[i0, w] & y)
                c1 += _popcount(a[i0 + 1, w] & y)
                c2 += _popcount(a[i0 + 2, w] & y)
                c3 += _popcount(a[i0 + 3, w] & y)
            acc[0, p] = np.int64(c0)
            acc[1, p] = np.int64(c1)
            acc[2, p] = np.int64(c2)
            acc[3, p] = np.int64(c3)
    else:
        for r in range(m):
            for p in range(npl):
                c = np.uint64(0)
                for w in range(nw):
                    c += _popcount(a[i0 + r, w] & planes[p, w])
                acc[r, p] = np.int64(c)
    for r in range(m):
        for s in range(ns):
            t = np.int64(0)
            for k in range(plane_off[s], plane_off[s + 1]):
                t += acc[r, k] << (k - plane_off[s])
            mismatches = csum[s] + counts[s] * ones[r] - 2 * t
            out[i0 + r, s] = (counts[s] * dim - 2 * mismatches) / (counts[s] * np.float64(dim))


@njit(**_PJIT)
def _sign_counts_kernel(a, planes, plane_off, csum, counts, dim):
    """out[i, s] = mean over subtask s of <a[i], v> / dim, from bit-sliced vote counts."""
    out = np.empty((a.shape[0], counts.shape[0]), np.float32)
    for blk in prange((a.shape[0] + _RB - 1) // _RB):
        _sign_counts_tile(a, blk * _RB, planes, plane_off, csum, counts, dim, out)
    return out


@njit(**_JIT)
def _sign_counts_serial(a, planes, plane_off, csum, counts, dim):
    """_sign_counts_kernel on the calling thread alone (see single_threaded)."""
    out = np.empty((a.shape[0], counts.shape[0]), np.float32)
    for blk in range((a.shape[0] + _RB - 1) // _RB):
        _sign_counts_tile(a, blk * _RB, planes, plane_off, csum, counts, dim, out)
    return out


def _count_planes(vals: np.ndarray, starts: np.ndarray, counts: np.ndarray):
    """Bit planes of each subtask's per-bit vote counts (uint64 words), plane offsets, sum of counts."""
    bits = np.unpackbits(vals, axis=1, bitorder="little").astype(np.int64)
    planes, offsets, csum = [], [0], []
    for s in range(len(counts)):
        cnt = bits[starts[s]:starts[s + 1]].sum(axis=0)
        for k in range(int(counts[s]).bit_length()):
            planes.append(np.packbits(((cnt >> k) & 1).astype(np.uint8), bitorder="little"))
        offsets.append(len(planes))
        csum.append(int(cnt.sum()))
    return (np.ascontiguousarray(np.stack(planes)).view(np.uint64), np.array(offsets, np.int64),
            np.array(csum, np.int64))


@njit(**_PJIT)
def _int_dot_kernel(a, at, planes, qcorr, bits):
    """Rows a[at[k]], in place: at lists the rows to score (all of a, or a rerank's picks)."""
    na = at.shape[0]
    out = np.empty((na, planes.shape[0]), np.int32)
    for blk in prange((na + _RB - 1) // _RB):
        k0 = blk * _RB
        k1 = min(k0 + _RB, na)
        _int_block(a, at, k0, planes, qcorr, bits, out[k0:k1])
    return out


@njit(**_JIT)
def _int_dot_serial(a, at, planes, qcorr, bits):
    """_int_dot_kernel on the calling thread alone (see single_threaded)."""
    na = at.shape[0]
    out = np.empty((na, planes.shape[0]), np.int32)
    for k0 in range(0, na, _RB):
        _int_block(a, at, k0, planes, qcorr, bits, out[k0:min(k0 + _RB, na)])
    return out


@njit(**_PJIT)
def _int_means_kernel(a, row_norm, planes, qcorr, val_norm, sub, counts, bits):
    na = a.shape[0]
    nb = planes.shape[0]
    ns = counts.shape[0]
    out = np.empty((na, ns), np.float32)
    every = np.arange(na)
    for blk in prange((na + _RB - 1) // _RB):
        i0 = blk * _RB
        i1 = min(i0 + _RB, na)
        dots = np.empty((i1 - i0, nb), np.int32)
        _int_block(a, every, i0, planes, qcorr, bits, dots)
        for r in range(i1 - i0):
            acc = np.zeros(ns, np.float64)
            rn = np.float64(row_norm[i0 + r])
            if rn != 0.0:
                for j in range(nb):
                    vn = np.float64(val_norm[j])
                    if vn != 0.0:
                        acc[sub[j]] += dots[r, j] / (rn * vn)
            for s in range(ns):
                out[i0 + r, s] = acc[s] / counts[s]
    return out


@njit(**_PJIT)
def _unpack_kbit(a, bits, dim, out):
    """out[i, :dim] = signed levels of packed k-bit rows a[i]."""
    nf = 8 // bits
    mask = (1 << bits) - 1
    off = np.float32(1 << (bits - 1))
    for i in prange(a.shape[0]):
        for p in range(a.shape[1]):
            x = np.int32(a[i, p])
            for t in range(nf):
                k = p * nf + t
                if k < dim:
                    out[i, k] = np.float32((x >> (bits * t)) & mask) - off


@njit(**_PJIT)
def _unpack_sign(a, dim, out):
    """out[i, :dim] = bits of a[i] as 0.0 / 1.0 (little bit order)."""
    for i in prange(a.shape[0]):
        for p in range(a.shape[1]):
            x = np.int32(a[i, p])
            for t in range(8):
                k = p * 8 + t
                if k < dim:
                    out[i, k] = np.float32((x >> t) & 1)


# ----------------------------------------------------------------------------------------
# Input checks and views
# ----------------------------------------------------------------------------------------


def _rows(x, name: str, dim: int, bits: int) -> np.ndarray:
    """Check a packed row array; return it C-contiguous uint8 (no copy when it already is)."""
    x = np.asarray(x)
    if x.dtype != np.uint8 or x.ndim != 2:
        raise SchemaMismatchError(
            f"{name}: expected packed rows as a 2-D uint8 array, got {x.dtype} {x.shape}")
    if x.shape[1] % 8:
        raise SchemaMismatchError(f"{name}: row_bytes {x.shape[1]} is not a multiple of 8")
    need = (dim * bits + 7) // 8
    if x.shape[1] < need:
        raise SchemaMismatchError(
            f"{name}: rows of {x.shape[1]} bytes cannot hold {dim} values of {bits} bits")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return x


def _positions(at, n: int) -> np.ndarray:
    """int64 row positions to score: all n rows when at is None, else at, checked in 0..n-1."""
    if at is None:
        return np.arange(n, dtype=np.int64)
    at = np.ascontiguousarray(at, dtype=np.int64)
    if at.ndim != 1 or (len(at) and not (0 <= at.min() and at.max() < n)):
        raise SchemaMismatchError(f"at: expected 1-D row positions in 0..{n - 1}, got {np.shape(at)}"
                                  f" with values {at.min() if at.size else ''}..{at.max() if at.size else ''}")
    return at


def _words(x: np.ndarray) -> np.ndarray:
    """uint64 view of C-contiguous uint8 rows; unaligned memory stays unaligned (no copy)."""
    return x.view(np.uint64)


def _check_pair(a, b):
    if a.shape[1] != b.shape[1]:
        raise SchemaMismatchError(
            f"row widths differ: {a.shape[1]} vs {b.shape[1]} bytes (different dim or encoding)")


def _check_bits(bits: int) -> int:
    if bits not in (8, 4, 2):
        raise SchemaMismatchError(f"int kernels take bits 8, 4 or 2, got {bits}")
    return int(bits)


def _query_planes(b: np.ndarray, bits: int):
    """Signed int8 levels of packed rows b, as (nb, 8/bits, row_bytes) planes + o * sum."""
    nf = 8 // bits
    mask = (1 << bits) - 1
    o = 1 << (bits - 1)
    planes = np.empty((b.shape[0], nf, b.shape[1]), np.int8)
    for t in range(nf):
        planes[:, t, :] = (((b >> (bits * t)) & mask).astype(np.int16) - o).astype(np.int8)
    qcorr = (o * planes.astype(np.int64).sum(axis=(1, 2))).astype(np.int32)
    return planes, qcorr


def _subtasks(starts, nvals: int):
    starts = np.asarray(starts, dtype=np.int64)
    if starts.ndim != 1 or len(starts) < 2:
        raise SchemaMismatchError("starts: expected S + 1 offsets, S >= 1")
    if starts[0] != 0 or starts[-1] != nvals:
        raise SchemaMismatchError(
            f"starts must run from 0 to the number of vals ({nvals}), got {starts[0]}..{starts[-1]}")
    counts = np.diff(starts)
    if (counts <= 0).any():
        s = int(np.flatnonzero(counts <= 0)[0])
        raise SchemaMismatchError(f"subtask {s} is empty (starts must strictly increase)")
    sub = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return sub, counts.astype(np.int64)


def _weights(x, n: int) -> np.ndarray:
    """Check per-val weights (1-D, length n, finite); return them float32, C-contiguous."""
    x = np.asarray(x)
    if x.ndim != 1 or x.shape[0] != n or x.dtype.kind not in "fiu":
        raise SchemaMismatchError(
            f"weights: expected a 1-D float array of {n} values, got {x.dtype} {x.shape}")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        raise SchemaMismatchError(f"weights: value {j} is not finite in float32 ({x[j]})")
    return x


def _norms(x, n: int, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if x.shape[0] != n:
        raise SchemaMismatchError(f"{name}: expected {n} norms, got {x.shape[0]}")
    return x


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def sign_dot(a, b, dim: int) -> np.ndarray:
    """int32 (na, nb): <+/-1 levels of a[i], +/-1 levels of b[j]> = dim - 2 popcount(a ^ b)."""
    a = _rows(a, "a", dim, 1)
    b = _rows(b, "b", dim, 1)
    _check_pair(a, b)
    return _sign_dot_kernel(_words(a), _words(b), int(dim))


def int_dot(a, b, bits: int, dim: int) -> np.ndarray:
    """int32 (na, nb): <levels(a[i]), levels(b[j])> for packed k-bit rows (k = 8, 4, 2)."""
    bits = _check_bits(bits)
    a = _rows(a, "a", dim, bits)
    b = _rows(b, "b", dim, bits)
    _check_pair(a, b)
    planes, qcorr = _query_planes(b, bits)
    return _int_dot_kernel(a, _positions(None, a.shape[0]), planes, qcorr, bits)


def sign_subtask_weighted(rows, vals, weights, starts, dim: int) -> np.ndarray:
    """float32 (n, S): sum over v in vals[starts[s]:starts[s+1]] of weights[v] * <row, v> (sign1).

    ``<row, v> = dim - 2 popcount(row ^ v)`` is the +/-1 dot; ``weights`` is float32
    ``(n_vals,)``, finite (any sign). The sum is taken in float64, then rounded to float32.
    """
    rows = _rows(rows, "rows", dim, 1)
    vals = _rows(vals, "vals", dim, 1)
    _check_pair(rows, vals)
    _subtasks(starts, vals.shape[0])
    w = _weights(weights, vals.shape[0]).astype(np.float64)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    return _sign_weighted_kernel(_words(rows), _words(vals), starts, w, int(dim))


class SignSubtasks:
    """Task sign rows grouped into subtasks, prepared once (bit-sliced vote counts) for
    `means` over many blocks of train rows."""

    def __init__(self, vals, starts, dim: int):
        self.vals = _rows(vals, "vals", dim, 1)
        self.dim = int(dim)
        _, self.counts = _subtasks(starts, self.vals.shape[0])
        self.planes, self.offsets, self.csum = _count_planes(self.vals, np.asarray(starts, np.int64),
                                                             self.counts)

    def means(self, rows) -> np.ndarray:
        """float32 (n, S): mean over v in subtask s of <row, v> / dim."""
        rows = _rows(rows, "rows", self.dim, 1)
        _check_pair(rows, self.vals)
        kernel = _sign_counts_serial if _single() else _sign_counts_kernel
        return kernel(_words(rows), self.planes, self.offsets, self.csum, self.counts,
                                   self.dim)


def sign_subtask_means(rows, vals, starts, dim: int) -> np.ndarray:
    """float32 (n, S): mean over v in vals[starts[s]:starts[s+1]] of <row, v> / dim (sign1)."""
    return SignSubtasks(vals, starts, dim).means(rows)


def int_subtask_means(rows, row_norm, vals, val_norm, starts, bits: int, dim: int) -> np.ndarray:
    """float32 (n, S): mean over v in subtask s of <row, v> / (|row| |v|); 0 where a norm is 0."""
    bits = _check_bits(bits)
    rows = _rows(rows, "rows", dim, bits)
    vals = _rows(vals, "vals", dim, bits)
    _check_pair(rows, vals)
    row_norm = _norms(row_norm, rows.shape[0], "row_norm")
    val_norm = _norms(val_norm, vals.shape[0], "val_norm")
    sub, counts = _subtasks(starts, vals.shape[0])
    planes, qcorr = _query_planes(vals, bits)
    return _int_means_kernel(rows, row_norm, planes, qcorr, val_norm, sub, counts, bits)


_FLOAT_BLOCK = 1024  # packed rows unpacked to float32 at a time (32 MiB at d = 8192)


def float_dot(rows, enc: Encoding | str, dim: int, queries, at=None) -> np.ndarray:
    """float32 (n, q): <levels(row_i), query_j> for rows of any encoding (no scale applied).

    ``queries`` is float (q, dim), or (dim,) for a single query (the result is then (n, 1)).
    ``at`` (row positions) scores just rows[at], in that order, without copying them out.
    Float rows are read in place; packed rows are unpacked to float32 block by block. Each
    row's sum has one fixed order, so equal rows get equal results (see _make_fdot).
    """
    if isinstance(enc, str):
        enc = parse_encoding(enc)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise SchemaMismatchError(f"queries: expected shape (q, {dim}), got {np.shape(queries)}")
    rows = _rows(rows, "rows", dim, enc.bits)
    if rows.shape[1] != enc.row_bytes(dim):
        raise SchemaMismatchError(
            f"rows: {rows.shape[1]} bytes per row, but {enc.name} at dim {dim} stores "
            f"{enc.row_bytes(dim)}")
    q = np.ascontiguousarray(q)
    positions = _positions(at, rows.shape[0])
    if enc.is_float:
        kernel = _float_dot_serial if _single() else _float_dot_kernel
        return kernel(rows, positions, q, int(dim), int(enc.kind == "f16"))
    if at is not None:  # packed rows are unpacked block by block anyway: gather only when asked
        rows = rows[positions]
    n = rows.shape[0]
    out = np.empty((n, q.shape[0]), np.float32)
    buf = np.empty((min(n, _FLOAT_BLOCK), dim), np.float32)
    for i0 in range(0, n, _FLOAT_BLOCK):
        blk = rows[i0:i0 + _FLOAT_BLOCK]
        m = blk.shape[0]
        if enc.kind == "sign":
            _unpack_sign(blk, dim, buf[:m])
        else:
            _unpack_kbit(blk, enc.bits, dim, buf[:m])
        out[i0:i0 + m] = _float_dot_kernel(buf[:m].view(np.uint8), _positions(None, m), q, int(dim), 0)
    if enc.kind == "sign":  # <s, q> = 2 sum_{bit=1} q - sum q
        out *= 2.0
        out -= q.astype(np.float64).sum(axis=1).astype(np.float32)
    return out


_LIMB = 128
_LIMB_MAX = 127 * _LIMB  # |Q| <= 127 * 128: hi in -127..127, lo in -64..64, both int8


class IntQueries:
    """Float queries prepared for packed k-bit or sign rows, to run on the integer kernel.

    Each query q is rounded to integers Q = rint(q / step), step = max|q| / (127 * 128)
    (15 bits; the rounding moves <row, q> by at most step / 2 * sum|levels|), and split
    into two int8 limbs Q = 128 hi + lo; one VNNI pass over a block of rows multiplies it by
    the 2q limb vectors. Integer sums are exact, so equal rows get equal results.
    """

    def __init__(self, queries, enc: Encoding | str, dim: int):
        if isinstance(enc, str):
            enc = parse_encoding(enc)
        if enc.is_float:
            raise SchemaMismatchError(f"IntQueries: {enc.name} rows are floats; use float_dot")
        q = np.asarray(queries, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != dim:
            raise SchemaMismatchError(f"queries: expected shape (q, {dim}), got {np.shape(queries)}")
        if not np.isfinite(q).all():
            raise SchemaMismatchError("queries: not all values are finite")
        self.enc, self.dim, self.nq = enc, int(dim), q.shape[0]
        amax = np.abs(q).max(axis=1, initial=0.0)
        self.step = np.where(amax > 0, amax / _LIMB_MAX, 1.0)
        big = np.rint(q / self.step[:, None]).astype(np.int64)
        hi = np.rint(big / _LIMB).astype(np.int64)
        limbs = np.concatenate([hi, big - _LIMB * hi])
        nf = 8 // enc.bits
        row_bytes = enc.row_bytes(dim)
        padded = np.zeros((2 * self.nq, row_bytes * nf), np.int8)
        padded[:, :dim] = limbs
        self.planes = np.ascontiguousarray(padded.reshape(2 * self.nq, row_bytes, nf).transpose(0, 2, 1))
        if enc.kind == "sign":  # fields are bits u, levels 2u - 1: <l, Q> = 2 <u, Q> - sum Q
            self.qcorr = np.zeros(2 * self.nq, np.int32)
            self.sums = big.sum(axis=1)
        else:  # fields u = level + o: <l, Q> = <u, Q> - o sum Q
            self.qcorr = ((1 << (enc.bits - 1)) * limbs.sum(axis=1)).astype(np.int32)

    def dot(self, rows, at=None) -> np.ndarray:
        """float64 (n, q): <levels(row_i), query_j>, to the 15-bit rounding of the queries.

        ``at`` (row positions) scores just rows[at], in that order, without copying them out.
        """
        rows = _rows(rows, "rows", self.dim, self.enc.bits)
        if rows.shape[1] != self.planes.shape[2]:
            raise SchemaMismatchError(
                f"rows: {rows.shape[1]} bytes per row, but {self.enc.name} at dim {self.dim} stores "
                f"{self.planes.shape[2]}")
        kernel = _int_dot_serial if _single() else _int_dot_kernel
        d = kernel(rows, _positions(at, rows.shape[0]), self.planes, self.qcorr, self.enc.bits)
        t = _LIMB * d[:, :self.nq].astype(np.int64) + d[:, self.nq:]
        if self.enc.kind == "sign":
            t = 2 * t - self.sums
        return t * self.step
